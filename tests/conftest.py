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


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory, tiny_base_dir):
    """What `dvc repro base prepare quantize` leaves, for the tiny model: prepared probe
    data and the 4-bit model with an fp32 compute dtype (the multi-run equality is an fp32 one)."""
    from qlora_diag.data.splits import prepare_dataset
    from qlora_diag.models.loading import load_tokenizer
    from qlora_diag.models.quantization.save import quantize_and_save

    root = tmp_path_factory.mktemp("bench")
    prepare_dataset(source="embedded:probe", n_train=24, n_eval=8, max_length=96, seed=0,
                    tokenizer=load_tokenizer(tiny_base_dir), out_dir=root / "data")
    quantize_and_save(tiny_base_dir, root / "quantized", quant_type="nf4", double_quant=True,
                      compute_dtype="float32")
    # what prepare writes beside the prepared data: compare.max_new_tokens resolved, as the
    # timed train.py processes read it (tiny_params_file's setting, 4)
    from qlora_diag.data.resolved import write_resolved

    write_resolved(root / "resolved.json", {"setting": 4, "value": 4, "train_response_p95": 4,
                                            "rule": "fixture"})
    return root
