"""End to end: the real pipeline with real `dvc` on a tiny configuration in a temporary git repo.

One scratch project serves every test in this module (building it is the expensive part):
- `dvc repro` runs every stage and writes every output of SPEC.md;
- a second `dvc repro` is a no-op;
- `dvc exp run -S lora.r=2` re-trains only what depends on lora.r, and `dvc metrics diff`
  shows the headline metrics change.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from qlora_diag.core import schemas
from qlora_diag.core.config import load_params, run_name
from qlora_diag.tools.scratch import dvc, make_scratch_project, scratch_env
from qlora_diag.tools.smoke import SMOKE_PARAMS

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SPEC_METRIC_KEYS = ("eval_loss_lora", "eval_loss_qlora", "eval_loss_gap", "exact_match_lora",
                    "exact_match_qlora", "token_match_rate", "cos_sim_mean", "subspace_sim_mean",
                    "noise_floor_cos_sim", "peak_mem_mb_lora", "peak_mem_mb_qlora",
                    "weights_mb_lora", "weights_mb_qlora", "step_time_ratio")


def expected_runs(p) -> list[str]:
    runs = [run_name(m, r, p.lora.targets, p.seed) for m in ("lora", "qlora") for r in p.sweep.ranks]
    runs += [run_name(m, p.lora.r, p.lora.targets, s) for m in ("lora", "qlora") for s in p.sweep.seeds]
    runs += [run_name(m, p.lora.r, t, p.seed) for m in ("lora", "qlora") for t in p.sweep.targets]
    return runs


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    dest = make_scratch_project(REPO, tmp_path_factory.mktemp("e2e") / "proj",
                                {"base.model": "embedded:tiny-llama", **SMOKE_PARAMS})
    proc = dvc(dest, "repro", check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return dest


def test_repro_writes_every_output(project):
    p = load_params(project / "params.yaml")
    for run in expected_runs(p):
        assert (project / "models/adapters" / run / "adapter_model.safetensors").is_file(), run
        assert (project / "reports/train" / run / "run.json").is_file(), run
    metrics = json.loads((project / "reports/metrics.json").read_text())
    missing = [k for k in SPEC_METRIC_KEYS if k not in metrics]
    assert not missing, missing
    assert list(metrics) == list(schemas.METRICS_KEYS)
    assert len(pd.read_csv(project / "reports/ranks.csv")) == len(p.sweep.ranks)
    assert len(pd.read_csv(project / "reports/modules.csv")) == 1 + len(p.sweep.targets)
    assert len(pd.read_csv(project / "reports/layers.csv")) > 0
    assert sorted(f.name for f in (project / "reports/figures").glob("*.png"))
    report = (project / "reports/report.md").read_text()
    for marker in ("H1", "H2", "H3"):
        assert marker in report
    for placeholder in ("TODO", "TBD", "[FILL"):
        assert placeholder not in report


def test_every_output_has_its_schema(project):
    """What the real stages wrote matches qlora_diag.core.schemas, which the readers require."""
    rep = project / "reports"
    for name, schema in (("quantization.csv", schemas.QUANTIZATION_COLUMNS),
                         ("ranks.csv", schemas.RANKS_COLUMNS),
                         ("modules.csv", schemas.MODULES_COLUMNS),
                         ("layers.csv", schemas.LAYERS_COLUMNS),
                         ("compare/pairs.csv", schemas.PAIRS_COLUMNS),
                         ("compare/function.csv", schemas.FUNCTION_COLUMNS),
                         ("compare/per_task.csv", schemas.PER_TASK_COLUMNS),
                         ("compare/seeds.csv", schemas.SEEDS_COLUMNS)):
        assert list(pd.read_csv(rep / name).columns) == list(schema), name
    for name, schema in (("data.json", schemas.DATA_KEYS),
                         ("quantization.json", schemas.QUANTIZATION_KEYS),
                         ("metrics.json", schemas.METRICS_KEYS),
                         ("compare/headline.json", schemas.HEADLINE_KEYS),
                         ("compare/setup.json", schemas.SETUP_KEYS)):
        assert list(json.loads((rep / name).read_text())) == list(schema), name
    p = load_params(project / "params.yaml")
    for run in expected_runs(p):
        assert list(json.loads((rep / "train" / run / "run.json").read_text())) == list(
            schemas.RUN_KEYS), run
        for line in (rep / "train" / run / "generations.jsonl").read_text().splitlines():
            assert list(json.loads(line)) == list(schemas.GENERATION_KEYS), run


def test_dvc_shows_only_the_headline_metrics(project):
    """`dvc exp show` / `dvc metrics show` list reports/metrics.json alone: 15 numbers."""
    shown = json.loads(dvc(project, "metrics", "show", "--json").stdout)
    files = {path: m["data"] for rev in shown.values() for path, m in rev["data"].items()}
    assert list(files) == ["reports/metrics.json"], list(files)
    assert sorted(files["reports/metrics.json"]) == sorted(schemas.METRICS_KEYS)


def test_adapter_loads_on_the_base(project):
    from peft import PeftModel

    from qlora_diag.models.loading import load_base

    p = load_params(project / "params.yaml")
    run = run_name("qlora", p.lora.r, p.lora.targets, p.seed)
    model = PeftModel.from_pretrained(load_base(project / "models/base", "float32"),
                                      project / "models/adapters" / run)
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_second_repro_is_a_noop(project):
    proc = dvc(project, "repro")
    assert "Running stage" not in proc.stdout, proc.stdout


def test_exp_run_retrains_only_what_depends_on_lora_r(project):
    env = scratch_env()
    subprocess.run(["git", "add", "-A"], cwd=project, check=True, env=env)
    subprocess.run(["git", "commit", "-qm", "reference run"], cwd=project, check=True, env=env)
    proc = dvc(project, "exp", "run", "-S", "lora.r=2", check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ran = {line.split("'")[1] for line in proc.stdout.splitlines() if line.startswith("Running stage")}
    assert not any(s.startswith(("train_lora@", "train_qlora@")) for s in ran), ran
    assert {"seeds_lora@1", "seeds_qlora@1", "modules_lora@kv", "modules_qlora@kv", "compare"} <= ran
    diff = dvc(project, "metrics", "diff", "--json")
    changed = json.loads(diff.stdout)["reports/metrics.json"]
    assert "eval_loss_gap" in changed or "cos_sim_mean" in changed, changed
