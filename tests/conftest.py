"""Shared fixtures: a tiny random Llama with the real SmolLM2 tokenizer, materialized once."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory) -> Path:
    """models/base for ``embedded:tiny-llama`` (2 layers, hidden 64, SmolLM2 tokenizer)."""
    from qlora_diag.models.loading import materialize_base

    out = tmp_path_factory.mktemp("tiny") / "base"
    materialize_base("embedded:tiny-llama", out, dtype="bfloat16")
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_base_dir):
    from qlora_diag.models.loading import load_tokenizer

    return load_tokenizer(tiny_base_dir)


@pytest.fixture()
def tiny_model(tiny_base_dir):
    from qlora_diag.models.loading import load_base

    return load_base(tiny_base_dir, "bfloat16")
