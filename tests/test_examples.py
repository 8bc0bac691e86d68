"""Per-example eval records: the per-example loss split, examples.jsonl of a training run, its
reader, and the paired records the verdicts are computed from."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from qlora_diag.core.errors import UserError
from qlora_diag.core.examples import example_rows, mean_loss, read_examples, write_examples
from qlora_diag.core.schemas import EXAMPLE_KEYS
from qlora_diag.report.paired import paired_seed_records
from qlora_diag.train.losses import evaluate_examples, evaluate_loss

# Rows sharing prompt prefixes (evaluation packs them as a prefix tree) and one sharing nothing.
ROWS = [
    {"input_ids": list(range(10, 30)), "n_prompt": 12},
    {"input_ids": list(range(10, 18)) + [900, 901, 902, 903, 904], "n_prompt": 10},
    {"input_ids": list(range(10, 22)) + [77, 78], "n_prompt": 13},
    {"input_ids": list(range(40, 52)), "n_prompt": 5},
    {"input_ids": list(range(40, 44)) + [5, 6, 7], "n_prompt": 5},
]


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_per_example_nll_equals_each_example_scored_alone(tiny_model, batch_size):
    """Known answer: example i's nll sum is the HF loss of that example alone (the mean over its
    response tokens) times its response token count, whatever the batching."""
    tiny_model.float()
    r = evaluate_examples(tiny_model, ROWS, batch_size, pad_id=2)
    for i, row in enumerate(ROWS):
        ids = torch.tensor([row["input_ids"]])
        labels = ids.clone()
        labels[0, :row["n_prompt"]] = -100
        n = len(row["input_ids"]) - row["n_prompt"]
        with torch.no_grad():
            alone = float(tiny_model(input_ids=ids, labels=labels).loss) * n
        assert r.n_tokens_per[i] == n
        assert r.nll_sums[i] == pytest.approx(alone, rel=1e-4)
    assert r.n_tokens == sum(r.n_tokens_per)
    assert r.loss == pytest.approx(math.fsum(r.nll_sums) / r.n_tokens, rel=1e-6)
    assert evaluate_loss(tiny_model, ROWS, batch_size, pad_id=2) == (r.loss, r.n_tokens)


def _row(i, nll=1.5, n=3, em=1, out="x", family="sort"):
    return {"id": f"e{i}", "family": family, "nll_sum": nll, "n_tokens": n,
            "exact_match": em, "output": out}


def test_example_rows_mark_the_examples_not_generated():
    records = [{"id": f"e{i}", "task": "sort" if i else "count"} for i in range(3)]
    gens = [{"id": "e0", "exact_match": True, "output": "a"}, {"id": "e1", "exact_match": False,
                                                                "output": "b"}]
    rows = example_rows(records, [1.0, 2.0, 3.0], [1, 2, 3], gens)
    assert [tuple(r) for r in rows] == [EXAMPLE_KEYS] * 3
    assert [(r["family"], r["exact_match"], r["output"]) for r in rows] == [
        ("count", 1, "a"), ("sort", 0, "b"), ("sort", None, None)]
    assert mean_loss(rows) == pytest.approx(1.0)  # (1 + 2 + 3) / (1 + 2 + 3)
    with pytest.raises(ValueError, match="generation 1"):
        example_rows(records, [1.0] * 3, [1] * 3, [gens[0], {**gens[1], "id": "e2"}])


def test_read_examples_round_trip_and_clear_errors(tmp_path):
    path = tmp_path / "examples.jsonl"
    rows = [_row(0), _row(1, em=None, out=None)]
    write_examples(path, rows)
    assert read_examples(path) == rows
    bad = {
        "missing key(s) output": {k: v for k, v in _row(0).items() if k != "output"},
        "nll_sum = -1": _row(0, nll=-1),
        "n_tokens = 0": _row(0, n=0),
        "exact_match = 2": _row(0, em=2),
        "exact_match = None with output = 'x'": _row(0, em=None),
    }
    for message, row in bad.items():
        path.write_text(json.dumps(_row(5)) + "\n" + json.dumps(row) + "\n")
        with pytest.raises(UserError, match=f"line 2: .*{re.escape(message)}"):
            read_examples(path, fix="rerun train")
    path.write_text(json.dumps(_row(0)) + "\n" + json.dumps(_row(0)) + "\n")
    with pytest.raises(UserError, match="appears twice"):
        read_examples(path)
    with pytest.raises(UserError, match="not found"):
        read_examples(tmp_path / "none.jsonl")


def test_paired_seed_records_split_loss_and_exact_match():
    lora = [_row(0, nll=1.0, n=2, em=1), _row(1, nll=2.0, n=4, em=0),
            _row(2, nll=3.0, n=1, em=None, out=None)]
    qlora = [_row(0, nll=1.5, n=2, em=0), _row(1, nll=2.5, n=4, em=0),
             _row(2, nll=3.0, n=1, em=None, out=None)]
    loss = paired_seed_records(lora, qlora, seed=7)
    assert loss.seed == 7 and loss.n_examples == 3
    a, w = loss.terms("eval_loss")
    assert a.sum() / w.sum() == pytest.approx(1.0 / 7)  # (0.5 + 0.5 + 0) / (2 + 4 + 1)
    em = paired_seed_records(lora, qlora, seed=7, quantity="exact_match")
    assert em.n_examples == 2  # the generated examples only
    a, w = em.terms("exact_match")
    assert np.array_equal(a, [-100.0, 0.0])

    with pytest.raises(UserError, match="eval example 1 differs"):
        paired_seed_records(lora, [qlora[0], _row(1, n=5), qlora[2]], seed=7)
    with pytest.raises(UserError, match="3 eval examples and the QLoRA run 2"):
        paired_seed_records(lora, qlora[:2], seed=7)
    with pytest.raises(UserError, match="generated by one run and not the other"):
        paired_seed_records(lora, [*qlora[:2], _row(2, n=1)], seed=7)
    assert paired_seed_records(lora[2:], qlora[2:], seed=1, quantity="exact_match") is None
