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


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """The uninterrupted `dvc repro` of the tiny pipeline of tests/test_interruptions.py (its
    OVERRIDES) in a scratch project, and how long each stage took in it. Session-scoped: the
    end-to-end tests that compare with an uninterrupted run (test_interruptions, test_lockfile)
    share this one run instead of paying for one each."""
    from test_interruptions import OVERRIDES, run_repro

    from qlora_diag.tools.scratch import make_scratch_project

    project = make_scratch_project(REPO, tmp_path_factory.mktemp("ref") / "proj", OVERRIDES)
    r = run_repro(project)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    durations = {s: b - a for s, (a, b) in r.seen.items()}
    return project, durations
