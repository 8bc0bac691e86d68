"""The design study's pure parts: the seeds a planned interval needs (against t-table values),
one-factor-at-a-time recipes named by their whole content, and a table merged across runs."""
import dataclasses

import pytest

from qlora_diag.core.config import load_params
from qlora_diag.tools.design_study import (
    _apply,
    merge_rows,
    read_rows,
    recipe_name,
    recipes,
    seeds_for_half_width,
    write_tables,
)

STUDIED = ("train.lr_scheduler", "train.max_steps", "data.n_eval", "lora.dropout")


@pytest.mark.parametrize("sd, expected", [
    # t(0.975, 2) = 4.303: 4.303 * 0.024 / sqrt 3 = 0.0596 > 0.05; t(0.975, 3) = 3.182:
    # 3.182 * 0.024 / 2 = 0.0382 <= 0.05
    (0.024, 4),
    # t(0.975, 17) = 2.110: 2.110 * 0.102 / sqrt 18 = 0.0507 > 0.05; t(0.975, 18) = 2.101:
    # 2.101 * 0.102 / sqrt 19 = 0.0492 <= 0.05
    (0.102, 19),
    (0.0, 2),
])
def test_seeds_for_half_width_against_t_table(sd, expected):
    assert seeds_for_half_width(sd) == expected


def _value(p, dotted):
    section, field = dotted.split(".")
    return getattr(getattr(p, section), field)


def test_recipes_vary_one_factor_and_are_named_by_content(repo_params):
    p = load_params(repo_params)
    variants = [_apply(p, o) for o in recipes(p)]
    assert variants[0] == p  # the params.yaml recipe comes first
    names = [recipe_name(v) for v in variants]
    assert len(set(names)) == len(names)
    for v in variants[1:]:
        changed = [k for k in STUDIED if _value(v, k) != _value(p, k)]
        assert len(changed) == 1, (recipe_name(v), changed)
    # the factors: both schedules, 1x/2x/4x steps, 1x/4x eval split, dropout on/off
    assert {v.train.lr_scheduler for v in variants} >= {"linear", "constant_with_warmup"}
    assert {v.train.max_steps for v in variants} == {p.train.max_steps * k for k in (1, 2, 4)}
    assert {v.data.n_eval for v in variants} == {p.data.n_eval, 4 * p.data.n_eval}
    assert {v.lora.dropout == 0 for v in variants} == {True, False}


def test_a_study_merges_into_the_earlier_table(tmp_path):
    old = [{"recipe": "a", "gap_sd": "0.1"}, {"recipe": "b", "gap_sd": "0.2"}]
    new = [{"recipe": "b", "gap_sd": 0.05}, {"recipe": "c", "gap_sd": 0.3}]
    assert merge_rows(old, new) == [old[0], new[0], new[1]]

    rows = [{"recipe": r, "gap_mean": 0.1, "gap_sd": 0.02, "seeds_for_pm_0.05": 4,
             "wall_s_per_paired_seed": 40.0, "torch_threads": 2, "load_avg_1min": "1.0 -> 1.5",
             "gaps": "+0.1"} for r in ("linear, 20 steps", "constant, 20 steps")]
    write_tables(rows, ["linear, 80 steps"], tmp_path, "note", default="linear, 20 steps")
    md = (tmp_path / "design_study.md").read_text()
    assert "| **linear, 20 steps** (params.yaml) |" in md
    assert "| constant, 20 steps |" in md
    assert "Not run (study cut short): linear, 80 steps." in md
    # the CSV reads back for the next merge
    assert [r["recipe"] for r in read_rows(tmp_path / "design_study.csv")] == \
        ["linear, 20 steps", "constant, 20 steps"]


@pytest.fixture
def repo_params():
    from pathlib import Path

    return Path(__file__).resolve().parents[1] / "params.yaml"


def test_apply_overrides_dotted_keys(repo_params):
    p = load_params(repo_params)
    q = _apply(p, {"train.max_steps": 7, "lora.dropout": 0.0})
    assert (q.train.max_steps, q.lora.dropout) == (7, 0.0)
    assert dataclasses.replace(q.train, max_steps=p.train.max_steps) == p.train
