"""Run names: run_name builds them, parse_run_name reads them back (the loss-curve figure)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from qlora_diag.core.config.choices import MAX_SEED
from qlora_diag.core.errors import UserError
from qlora_diag.core.run_names import RunParts, parse_run_name, run_name

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("parts, name", [
    (("qlora", 8, "qv", 42), "qlora-r8-qv-s42"),
    (("lora", 16, "q_proj,v_proj", 0), "lora-r16-q_proj,v_proj-s0"),
    (("lora", 2, "attn.c_proj,attn.c_attn", MAX_SEED),
     "lora-r2-attn.c_proj,attn.c_attn-s4294967295"),
    (("lora", 1, "all_linear", 12), "lora-r1-all_linear-s12"),
    (("qlora", 4, "s1", 1), "qlora-r4-s1-s1"),         # targets that look like a seed
    (("qlora", 4, "r8", 7), "qlora-r4-r8-s7"),         # ... and like a rank
    (("lora", 10, "dense,query_key_value", 3), "lora-r10-dense,query_key_value-s3"),
    (("qlora", 8, "qv", 42, 1), "qlora-r8-qv-s42-d1"),  # same-init control: data order of seed 1
    (("lora", 4, "s1", 0, 7), "lora-r4-s1-s0-d7"),
])
def test_known_names_both_ways(parts, name):
    assert run_name(*parts) == name
    assert parse_run_name(name) == RunParts(*parts)
    assert parse_run_name(name).method == parts[0] and parse_run_name(name).seed == parts[3]


# Every targets value the config accepts has this form (checks.targets_problem).
targets = st.from_regex(r"[A-Za-z0-9_.]+(,[A-Za-z0-9_.]+)*", fullmatch=True)


@given(st.sampled_from(["lora", "qlora"]), st.integers(1, 10**6), targets,
       st.integers(0, MAX_SEED))
def test_round_trip(method, rank, targets, seed):
    assert parse_run_name(run_name(method, rank, targets, seed)) == (method, rank, targets, seed,
                                                                     None)
    assert run_name(method, rank, targets, seed, seed) == run_name(method, rank, targets, seed)


@given(st.sampled_from(["lora", "qlora"]), st.integers(1, 10**6), targets,
       st.integers(0, MAX_SEED), st.integers(0, MAX_SEED))
def test_round_trip_with_a_data_seed(method, rank, targets, seed, data_seed):
    parts = parse_run_name(run_name(method, rank, targets, seed, data_seed))
    assert parts == (method, rank, targets, seed, None if data_seed == seed else data_seed)


def test_a_data_seed_equal_to_the_seed_is_not_a_name():
    with pytest.raises(UserError, match="the run is qlora-r8-qv-s42$"):
        parse_run_name("qlora-r8-qv-s42-d42")


@pytest.mark.parametrize("name", ["qlora-r8-qv", "qlora-r08-qv-s42", "qlora-r8-qv-s042",
                                  "qlora-r8-q-v-s42", "qlora_r8_qv_s42", "qlora-8-qv-s42", "",
                                  "qlora-r8-qv-s42-d", "qlora-r8-qv-s42-d01"])
def test_other_names_are_rejected_naming_the_form(name):
    with pytest.raises(UserError) as exc:
        parse_run_name(name)
    assert str(exc.value) == (f"{name!r} is not a run name; run names are "
                              "<method>-r<rank>-<targets>-s<seed>[-d<data seed>], e.g. "
                              "qlora-r8-qv-s42")


def test_dvc_yaml_outs_are_run_names():
    """The training stages' outs spell run names by hand; with values substituted they parse."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    values = {"item.rank": "4", "lora.r": "8", "lora.targets": "qv", "item.targets": "attn_mlp",
              "seed": "42", "item.seed": "3", "sweep.setting_seeds[0]": "1",
              "sweep.setting_seeds[1]": "2", "sweep.seeds[0]": "3"}
    outs = [o for s in stages.values() for o in s.get("outs", [])
            if isinstance(o, str) and o.startswith(("models/adapters/", "reports/train/"))]
    assert len(outs) == 32  # 4 grouped stages x 3 seed slots x 2 outs + 2 seeds and 2 control
    # stages x 2 outs
    for out in outs:
        name = re.sub(r"\$\{([\w.\[\]]+)\}", lambda m: values[m.group(1)], out.split("/")[-1])
        assert run_name(*parse_run_name(name)) == name


def test_train_stage_outs_name_exactly_the_seeds_its_cmd_trains():
    """A grouped stage trains the seeds of ``--seeds``; its outs must name each of them (an
    adapter and a report directory per seed), no more: a seed slot added to the cmd but not to
    the outs would leave that run outside DVC."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    checked = 0
    for name, stage in stages.items():
        m = re.search(r"--seeds (\S+)", stage["cmd"])
        if not m:
            continue
        seeds = m.group(1).split(",")
        d = re.search(r"--data-seed (\S+)", stage["cmd"])  # the control: -d<data seed> in names
        seeds = [f"{s}-d{d.group(1)}" for s in seeds] if d else seeds
        outs = [o for o in stage["outs"] if isinstance(o, str)]
        for kind in ("models/adapters/", "reports/train/"):
            named = [o.rsplit("-s", 1)[1] for o in outs if o.startswith(kind)]
            assert named == seeds, (name, kind, named, seeds)
        checked += 1
    assert checked == 8
