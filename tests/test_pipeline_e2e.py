"""End to end: the real pipeline with real `dvc` on a tiny configuration in a temporary git repo.

One scratch project serves every test in this module (building it is the expensive part):
- `dvc repro` runs every stage and writes every output of SPEC.md;
- a second `dvc repro` is a no-op;
- `dvc plots show` writes, without a warning, a page that renders offline in headless Chromium
  with every declared curve, table and figure on it;
- `dvc exp run -S lora.r=2` re-trains only what depends on lora.r, and `dvc metrics diff`
  shows the headline metrics change.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from qlora_diag.core import schemas
from qlora_diag.core.config import load_params, run_name
from qlora_diag.core.examples import mean_loss, read_examples
from qlora_diag.tools.scratch import dvc, make_scratch_project, scratch_env
from qlora_diag.tools.smoke import SMOKE_PARAMS

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SPEC_METRIC_KEYS = ("eval_loss_lora", "eval_loss_qlora", "eval_loss_gap", "exact_match_lora",
                    "exact_match_qlora", "token_match_rate", "cos_sim_mean", "subspace_sim_mean",
                    "noise_floor_cos_sim", "peak_mem_mb_lora", "peak_mem_mb_qlora",
                    "weights_mb_lora", "weights_mb_qlora", "step_time_ratio")


def expected_runs(p) -> list[str]:
    per_setting = [p.seed, *p.sweep.setting_seeds]
    runs = [run_name(m, r, p.lora.targets, s) for m in ("lora", "qlora") for r in p.sweep.ranks
            for s in per_setting]
    runs += [run_name(m, p.lora.r, p.lora.targets, s) for m in ("lora", "qlora") for s in p.sweep.seeds]
    runs += [run_name(m, p.lora.r, t, s) for m in ("lora", "qlora") for t in p.sweep.targets
             for s in per_setting]
    runs += [run_name(m, p.lora.r, p.lora.targets, p.seed, p.sweep.seeds[0])
             for m in ("lora", "qlora")]  # the same-init control
    return runs


@pytest.fixture(scope="module")
def first_repro(tmp_path_factory):
    """The scratch project after its first `dvc repro`, and that command's output."""
    dest = make_scratch_project(REPO, tmp_path_factory.mktemp("e2e") / "proj",
                                {"base.model": "embedded:tiny-llama", **SMOKE_PARAMS})
    proc = dvc(dest, "repro", check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return dest, proc


@pytest.fixture(scope="module")
def project(first_repro):
    return first_repro[0]


def test_stage_output_holds_no_known_library_noise(first_repro):
    """Every stage of the first run: the two messages core/logs.py silences never reach the
    user (tests/test_logs.py shows they appear without it), and nothing else is lost: the
    stages' own summary lines are there."""
    _, proc = first_repro
    out = proc.stdout + proc.stderr
    assert "kernels-community" not in out
    assert "is_gradient_checkpointing" not in out
    assert "FutureWarning" not in out
    assert "quantize: " in out and "base: " in out


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
                         ("compare/seeds.csv", schemas.SEEDS_COLUMNS),
                         ("compare/floors.csv", schemas.FLOORS_COLUMNS),
                         ("compare/function_floors.csv", schemas.FUNCTION_FLOORS_COLUMNS)):
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
        # examples.jsonl: every eval example, summing to the run's eval loss
        rows = read_examples(rep / "train" / run / "examples.jsonl")
        assert mean_loss(rows) == pytest.approx(
            json.loads((rep / "train" / run / "run.json").read_text())["eval_loss"], rel=1e-6)
    for case in schemas.EXAMPLE_CASES:
        assert read_examples(rep / "compare" / "examples" / f"{case}.jsonl"), case


def test_dvc_shows_only_the_headline_metrics(project):
    """`dvc exp show` / `dvc metrics show` list reports/metrics.json alone: 15 numbers."""
    shown = json.loads(dvc(project, "metrics", "show", "--json").stdout)
    files = {path: m["data"] for rev in shown.values() for path, m in rev["data"].items()}
    assert list(files) == ["reports/metrics.json"], list(files)
    assert sorted(files["reports/metrics.json"]) == sorted(schemas.METRICS_KEYS)
    # the nested detail stays a plain output
    assert (project / "reports/data.json").is_file()
    assert (project / "reports/quantization.json").is_file()


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




def chromium() -> str:
    """The Chromium binary. CI must check the page (.ci/run installs the Debian package), so
    there a missing browser fails the test; elsewhere it is skipped with the reason."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        reason = ("chromium not found: the dvc plots page is checked in headless Chromium "
                  "(Debian: apt-get install chromium)")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return exe


def run_chromium(exe: str, page: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium on ``page``; virtual time lets vega-embed's asynchronous rendering
    finish before the DOM is dumped or the screenshot taken (without waiting in real time)."""
    return subprocess.run([exe, "--headless=new", "--no-sandbox", "--disable-gpu",
                           "--enable-logging=stderr", "--v=0", "--virtual-time-budget=20000",
                           *args, page.as_uri()], capture_output=True, text=True, timeout=180)


def plot_sections(dom: str) -> dict[str, str]:
    """``{div id: its HTML}`` of the page's top-level plot divs (DVC gives each an id from its
    plot id; vega-embed's and the images' inner divs have none). Script bodies are dropped: the
    inlined libraries contain HTML fragments of their own."""
    dom = re.sub(r"<script\b.*?</script>", "", dom, flags=re.S)
    starts = [(m.start(), m.group(1)) for m in re.finditer(r'<div id="([^"]+)"', dom)]
    ends = [s for s, _ in starts[1:]] + [len(dom)]
    return {name: dom[s:e] for (s, name), e in zip(starts, ends)}


def drawn_marks(section: str) -> list[dict[str, str]]:
    """Vega's accessibility label of every mark item in ``section``, e.g. ``"step: 3; loss:
    10.75; rev: workspace"``, as ``{"step": "3", "loss": "10.75", "rev": "workspace"}``."""
    marks = []
    for label in re.findall(r'aria-label="([^"]*)"', section):
        pairs = [part.split(": ", 1) for part in label.split("; ")]
        if all(len(pair) == 2 for pair in pairs):
            marks.append(dict(pairs))
    return marks


def is_drawn(marks: list[dict[str, str]], x, y: float, series: str | None = None) -> bool:
    """Whether some mark shows the value ``x`` with the number ``y`` (and ``series``)."""
    def close(text: str) -> bool:
        try:
            return math.isclose(float(text), y, rel_tol=1e-6, abs_tol=1e-12)
        except ValueError:
            return False
    return any(str(x) in m.values() and (series is None or series in m.values())
               and any(close(v) for v in m.values()) for m in marks)


def test_plots_page_renders_offline_with_every_curve_and_figure(project, tmp_path):
    exe = chromium()
    p = load_params(project / "params.yaml")
    out = tmp_path / "plots"  # outside the project: nothing to commit by accident
    proc = dvc(project, "plots", "show", "-o", str(out), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "WARNING" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    index = out / "index.html"
    html = index.read_text()
    # vega, vega-lite and vega-embed come inlined from .dvc/plots/offline.html, not from a CDN
    assert not re.search(r"<script[^>]*\bsrc\s*=", html), "a script is loaded from a URL"
    assert "cdn.jsdelivr.net" not in html

    dump = run_chromium(exe, index, "--dump-dom")
    assert dump.returncode == 0, dump.stderr[-3000:]
    assert "Uncaught" not in dump.stderr, [ln for ln in dump.stderr.splitlines() if "Uncaught" in ln]
    sections = plot_sections(dump.stdout)

    # training curves of the headline pair: each run's last dvclive point (read from its TSV)
    # is on its plot; DVC names each series by its path below the common reports/train/
    for plot_id, split in (("train_loss", "train"), ("eval_loss", "eval")):
        marks = drawn_marks(sections[plot_id])
        for method in ("lora", "qlora"):
            run = run_name(method, p.lora.r, p.lora.targets, p.seed)
            curve = pd.read_csv(project / "reports/train" / run / "plots/metrics" / split / "loss.tsv",
                                sep="\t")
            last = curve.loc[curve["step"].idxmax()]
            assert is_drawn(marks, int(last["step"]), last["loss"],
                            f"{run}/plots/metrics/{split}/loss.tsv"), (plot_id, run, marks)
    # rank sweep: one line per column, each ending at the largest rank
    ranks = pd.read_csv(project / "reports/ranks.csv")
    marks = drawn_marks(sections["reports_ranks_csv"])
    last = ranks.loc[ranks["rank"].idxmax()]
    for col in ("eval_loss_gap", "cos_sim_mean", "token_match_rate"):
        assert is_drawn(marks, int(last["rank"]), last[col], col), (col, marks)
    # module sweep: one bar per target preset
    modules = pd.read_csv(project / "reports/modules.csv")
    marks = drawn_marks(sections["reports_modules_csv"])
    for row in modules.itertuples():
        assert is_drawn(marks, row.targets, row.eval_loss_gap), (row.targets, marks)
    # per layer and module: one point per row and column
    layers = pd.read_csv(project / "reports/layers.csv")
    marks = drawn_marks(sections["reports_layers_csv"])
    for row in layers.itertuples():
        for col in ("cos_sim", "subspace_sim"):
            assert is_drawn(marks, row.layer, getattr(row, col), col), (row, col)
    # every figure of the plot stage, as a copy of its file
    figures = sorted((project / "reports/figures").glob("*.png"))
    assert figures
    for fig in figures:
        section = sections["reports_figures_" + fig.name.replace(".", "_")]
        assert f"<p>reports/figures/{fig.name}</p>" in section
        (src,) = re.findall(r'<img src="([^"]+)"', section)
        assert (out / src).read_bytes() == fig.read_bytes(), fig.name

    # The screenshot: every figure is on it pixel for pixel, and vega painted its plots (in
    # DVC's colour of the first revision; the figures use other colours).
    import numpy as np
    from PIL import Image

    shot_path = tmp_path / "page.png"
    shot = run_chromium(exe, index, f"--screenshot={shot_path}", "--window-size=1400,8000")
    assert shot.returncode == 0 and shot_path.is_file(), shot.stderr[-3000:]
    rgb = np.asarray(Image.open(shot_path).convert("RGB"))
    where = {fig.name: find_image(rgb, np.asarray(Image.open(fig).convert("RGB"))) for fig in figures}
    assert None not in where.values() and len(set(where.values())) == len(figures), where
    dvc_colour = np.array([0x94, 0x5D, 0xD6])
    assert (rgb == dvc_colour).all(axis=2).sum() > 1000


def find_image(shot, image) -> tuple[int, int] | None:
    """Top-left corner at which ``image`` appears pixel for pixel in ``shot`` (RGB arrays)."""
    import numpy as np

    (h, w), (big_h, big_w) = image.shape[:2], shot.shape[:2]
    if h > big_h or w > big_w:
        return None
    # Narrow the candidate corners by the pixels of the image's most varied row (the most
    # colour changes), one pixel where its colour changes at a time, then compare whole images.
    k = int(np.argmax((image[:, 1:] != image[:, :-1]).any(axis=2).sum(axis=1)))
    changes = np.flatnonzero((image[k, 1:] != image[k, :-1]).any(axis=1)) + 1
    corners = np.ones((big_h - h + 1, big_w - w + 1), dtype=bool)
    for j in [0, *changes]:
        corners &= (shot[k:k + big_h - h + 1, j:j + big_w - w + 1] == image[k, j]).all(axis=2)
        if corners.sum() <= 4:
            break
    for top, left in zip(*np.nonzero(corners)):
        if np.array_equal(shot[top:top + h, left:left + w], image):
            return int(top), int(left)
    return None


def test_exp_run_retrains_only_what_depends_on_lora_r(project):
    env = scratch_env()
    subprocess.run(["git", "add", "-A"], cwd=project, check=True, env=env)
    subprocess.run(["git", "commit", "-qm", "reference run"], cwd=project, check=True, env=env)
    proc = dvc(project, "exp", "run", "-S", "lora.r=2", check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ran = {line.split("'")[1] for line in proc.stdout.splitlines() if line.startswith("Running stage")}
    assert not any(s.startswith(("train_lora@", "train_qlora@")) for s in ran), ran
    assert {"seeds_lora@3", "seeds_qlora@3", "modules_lora@kv", "modules_qlora@kv", "compare"} <= ran
    diff = dvc(project, "metrics", "diff", "--json")
    changed = json.loads(diff.stdout)["reports/metrics.json"]
    assert "eval_loss_gap" in changed or "cos_sim_mean" in changed, changed
