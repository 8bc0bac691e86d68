"""Interruptions with real `dvc`: kill `dvc repro` in every stage, rerun, get the uninterrupted
results; and `dvc exp run --queue` + `dvc queue start -j 2` without experiments clobbering each
other.

One uninterrupted reference run (module fixture) and one *kill chain* serve every test: in a
fresh copy of the project, `dvc repro` is started in its own process group and killed while the
next stage not yet killed runs; the next `dvc repro` must resume that stage (training from its
last complete checkpoint), finish it and is killed in the following stage, until a `dvc repro`
completes. Every stage is thus killed once and completed by a rerun, at the cost of about one
pipeline run instead of one per stage. A stage's process is recognised by the `DVC_STAGE`
variable DVC sets in the environment of every stage command (`dvc/stage/run.py`) and by its
working directory (the project), both read from /proc.

How each stage is stopped (the kill plan):
- training stages: SIGKILL of the whole process group (dvc and the stage) as soon as a
  complete checkpoint exists (`train.save_every = 1`: step 1, or 2 when the poll is late), so
  the rerun resumes mid-run;
- `KILL_AFTER_LAST_CHECKPOINT`: SIGKILL right after the checkpoint of the last step, so the
  rerun resumes with no step left to train (nothing is timed: speed is n/a); the stage ends
  ~0.1 s after that checkpoint, so it is watched every millisecond, not every poll;
- `SIGTERM_STAGE`: SIGTERM to the stage process only (a preempted job, `kill <pid>`): it must
  exit 130 with the `interrupted:` message and keep its checkpoints;
- `CTRL_C_STAGE`: SIGINT to the process group, as Ctrl-C in a terminal sends it;
- every other stage: SIGKILL of the group halfway through the stage's reference duration.

Nothing is cleaned up by hand between the runs: DVC's repository lock (`.dvc/tmp/lock`,
`zc.lockfile`, an fcntl lock) dies with the process, and its `.dvc/tmp/rwlock` entries of a dead
pid are dropped by the next `dvc` with a warning (`dvc/rwlock.py`).
"""
from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from qlora_diag.core.config import run_name
from qlora_diag.tools.scratch import dvc, make_scratch_project, scratch_env
from qlora_diag.tools.smoke import SMOKE_PARAMS
from qlora_diag.train.checkpoints import checkpoint_step

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# The smoke configuration on the 2-layer random model, a checkpoint after every step (3 steps),
# one thread per stage so that `dvc queue start -j 2` does not oversubscribe 2 cores.
OVERRIDES = {"base.model": "embedded:tiny-llama", **SMOKE_PARAMS, "train.save_every": 1,
             "train.threads": 1}
MAX_STEPS = SMOKE_PARAMS["train.max_steps"]
KILL_AFTER_LAST_CHECKPOINT = "train_qlora@4"  # the headline rank (lora.r = 4): its speed is n/a
SIGTERM_STAGE = "modules_lora@kv"
CTRL_C_STAGE = "compare"
POLL_S = 0.1

# Numbers that measure this machine (time, memory), not the result, are never compared; nor are
# the failure modes decided by them.
MACHINE_WORDS = ("time", "mem", "wall", "resumed_from_step")
MACHINE_FAILURE_MODES = ("slower", "memory_not_saved")
# Resuming restores the optimizer, scheduler and RNG states and replays the same batches, so on
# one machine with the same thread count a resumed adapter is bitwise the uninterrupted one (it
# is here, whichever step the kill hit), and so is everything computed from it; the numbers
# of reports are compared to 1e-4, the CPU tolerance, only as a margin for float
# formatting and summation order in the reports, not for the adapters.
TOL = 1e-4


def is_machine_key(key: str) -> bool:
    """step_time_lora_s, tokens_per_s_qlora, peak_mem_mb, wall_s, timed_steps, ..."""
    return key.endswith("_s") or "_s_" in key or any(w in key for w in MACHINE_WORDS)


# --- watching and killing dvc repro ------------------------------------------------------------

@dataclass
class StageProc:
    pid: int
    cmdline: list[str]


def stage_processes(project: Path) -> dict[str, StageProc]:
    """Stage name -> the python process running it, for stage commands of ``project`` only."""
    root = str(project.resolve())
    return {stage: sp for (cwd, stage), sp in all_stage_processes().items() if cwd == root}


def all_stage_processes() -> dict[tuple[str, str], StageProc]:
    """(working directory, DVC_STAGE) -> the python process of every running stage command (DVC
    may start it through a shell, which carries the same variable; the python process is kept).
    The working directory is the project's root: a queued experiment's temporary workspace
    for `dvc queue` (its DVC_ROOT need not be)."""
    found: dict[tuple[str, str], StageProc] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            env = dict(kv.split("=", 1) for kv in
                       Path(entry.path, "environ").read_bytes().decode(errors="replace").split("\0")
                       if "=" in kv)
            cmd = Path(entry.path, "cmdline").read_bytes().decode(errors="replace").split("\0")
            cwd = os.readlink(Path(entry.path, "cwd"))
        except OSError:
            continue
        if "DVC_STAGE" in env and any(c.startswith("stages/") for c in cmd):
            found.setdefault((cwd, env["DVC_STAGE"]), StageProc(int(entry.name), cmd))
    return found


def wait_for_stage_exit(project: Path, timeout_s: float = 60.0) -> None:
    """Wait until no stage process of ``project`` runs: under a shell that does not exec the
    stage command (dash, DVC's ``/bin/sh`` when ``SHELL`` is unset) the shell dies of Ctrl-C at
    once and DVC returns while the stage still removes its temporaries. A stage that outlives the
    timeout ignored the signal, which is a failure."""
    deadline = time.monotonic() + timeout_s
    while (left := {s: sp.pid for s, sp in stage_processes(project).items()
                    if running_not_zombie(sp.pid)}):
        assert time.monotonic() < deadline, f"stage processes still running after the interrupt: {left}"
        time.sleep(POLL_S)


def proc_stat(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name: state, ppid, ... ([] if gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def runs_under_shell(pid: int) -> bool:
    """Whether the stage process ``pid`` is the child of the shell in DVC's ``$SHELL -c <cmd>``
    (dash, DVC's ``/bin/sh`` when SHELL is unset, does not exec the command) rather than of DVC."""
    stat = proc_stat(pid)
    try:
        parent = Path(f"/proc/{stat[1]}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except (OSError, IndexError):
        return False
    return "-c" in parent and any("stages/" in c for c in parent)


def running_not_zombie(pid: int) -> bool:
    return proc_stat(pid)[:1] not in ([], ["Z"])


def runs_of(cmdline: list[str]) -> list[str] | None:
    """The run names a `stages/train.py` command line trains, in order, else None."""
    if "stages/train.py" not in cmdline:
        return None
    arg = {cmdline[i]: cmdline[i + 1] for i in range(len(cmdline) - 1) if cmdline[i].startswith("--")}
    data_seed = int(arg["--data-seed"]) if "--data-seed" in arg else None  # the control runs
    return [run_name(arg["--method"], int(arg["--rank"]), arg["--targets"], int(s), data_seed)
            for s in arg["--seeds"].split(",")]


def killed_run_index(stage: str) -> int:
    """Which run of a stage's group the kill plan stops: the last (the rerun must restore the
    runs finished before it, not train them again), except in KILL_AFTER_LAST_CHECKPOINT: the
    first, the headline run, whose speed the report then shows as n/a."""
    return 0 if stage == KILL_AFTER_LAST_CHECKPOINT else -1


def newest_complete_checkpoint(project: Path, run: str) -> int:
    """Step of the newest checkpoint of ``run`` with every file written and a whole trainer
    state, as the stage requires to resume from it (0 if none); older ones are deleted by the
    Trainer as it goes (save_total_limit)."""
    return max((step for c in (project / "models/checkpoints" / run).glob("checkpoint-*")
                if (step := checkpoint_step(c)) == int(c.name.split("-")[1])), default=0)


def await_last_checkpoint(project: Path, run: str, pid: int) -> bool:
    """Spin until the checkpoint of the last step is complete (True) or the stage has ended
    without one being seen (False). On the tiny model the stage writes its outputs and removes
    its checkpoints within ~0.1 s of that checkpoint, less than one poll of :func:`run_repro`,
    so it is watched every millisecond from the checkpoint before it on."""
    while running_not_zombie(pid):
        if newest_complete_checkpoint(project, run) >= MAX_STEPS:
            return True
        time.sleep(0.001)
    return False


@dataclass
class Repro:
    """One `dvc repro`: its exit code, output, and what was seen or done while it ran."""

    returncode: int
    stdout: str
    stderr: str
    seen: dict[str, tuple[float, float]] = field(default_factory=dict)  # stage -> (start, end)
    killed: str | None = None  # the stage it was stopped in
    how: str | None = None
    stage_alive_at_kill: bool = False
    under_shell: bool = False  # a shell that did not exec the stage was its parent


def run_repro(project: Path, decide=None) -> Repro:
    """Run `dvc repro` in its own process group, polling its stage processes.

    ``decide(stage, proc, elapsed)`` returns None to let the stage go on, or how to stop it:
    "kill" (SIGKILL the group), "term" (SIGTERM the stage process), "int" (SIGINT the group).
    """
    exe = Path(sys.executable).parent / "dvc"
    n = len(list(project.parent.glob("repro-*.out")))  # logs beside the project, one per run
    out, err = project.parent / f"repro-{n}.out", project.parent / f"repro-{n}.err"
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen([str(exe), "repro"], cwd=project, env=scratch_env(), stdout=fo,
                                stderr=fe, start_new_session=True)
    seen: dict[str, list[float]] = {}
    killed = how = None
    alive = under_shell = False
    while proc.poll() is None:
        now = time.monotonic()
        running = stage_processes(project)
        for stage in running:
            seen.setdefault(stage, [now, now])[1] = now
        if decide and killed is None:
            for stage, sp in running.items():
                action = decide(stage, sp, now - seen[stage][0])
                if action:
                    killed, how = stage, action
                    alive = running_not_zombie(sp.pid)
                    under_shell = runs_under_shell(sp.pid)
                    if action == "kill":
                        os.killpg(proc.pid, signal.SIGKILL)
                    elif action == "term":
                        os.kill(sp.pid, signal.SIGTERM)
                    else:
                        os.killpg(proc.pid, signal.SIGINT)
                    break
        time.sleep(POLL_S)
    if killed and how == "kill":  # orphans of the group (none expected) must not outlive it
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    elif killed:  # SIGTERM / Ctrl-C: dvc may return before its stage has cleaned up and exited
        wait_for_stage_exit(project)
    return Repro(proc.returncode, out.read_text(), err.read_text(),
                 {s: (a, b) for s, (a, b) in seen.items()}, killed, how, alive, under_shell)


# --- comparing results -------------------------------------------------------------------------

def assert_same_json(got, want, where: str) -> None:
    """Equal structure; numbers to TOL; machine-dependent keys skipped."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), f"{where}: keys differ"
        for k in want:
            if not is_machine_key(k):
                assert_same_json(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{where}: lengths differ"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same_json(g, w, f"{where}[{i}]")
    elif isinstance(want, float) or isinstance(got, float):
        if math.isnan(want):
            assert math.isnan(got), f"{where}: {got} != nan"
        else:
            assert got == pytest.approx(want, rel=TOL, abs=TOL), f"{where}: {got} != {want}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def read_table(path: Path) -> list[dict]:
    """A .csv or dvclive .tsv as rows of numbers where they parse."""
    def num(v):
        try:
            return float(v)
        except ValueError:
            return v
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t" if path.suffix == ".tsv" else ","))
    return [{k: num(v) for k, v in r.items() if k != "timestamp"} for r in rows]


def assert_same_adapter(got_project: Path, want_project: Path, adapter: str, trained_on: str) -> None:
    """The adapter directory ``adapter`` of both projects holds the same files with the same
    bytes, each project's own location replaced by a placeholder: an adapter records its base
    as an absolute path (``base_model_name_or_path`` and the model card, so that
    ``AutoPeftModelForCausalLM`` loads it from any directory), and the two projects are two
    scratch directories. Equal up to that path, a rerun in one directory writes equal bytes, so
    DVC sees an unchanged dependency and downstream stages stay cached. The recorded base is
    ``trained_on`` (the model directory the run trained on) of the project itself."""
    import torch
    from safetensors.torch import load_file

    got, want = got_project / adapter, want_project / adapter
    g, w = load_file(got / "adapter_model.safetensors"), load_file(want / "adapter_model.safetensors")
    assert g.keys() == w.keys()
    for name in w:
        torch.testing.assert_close(g[name], w[name], rtol=0, atol=0, msg=name)
    files = sorted(p.relative_to(want) for p in want.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(got) for p in got.rglob("*") if p.is_file())
    for rel in files:
        assert ((got / rel).read_bytes().replace(str(got_project.resolve()).encode(), b"<project>")
                == (want / rel).read_bytes().replace(str(want_project.resolve()).encode(),
                                                     b"<project>")), rel
    base = json.loads((got / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str((got_project / trained_on).resolve())


def assert_same_run_report(got: Path, want: Path) -> None:
    """reports/train/<run>: run.json, generations, and every dvclive curve (each step once)."""
    assert_same_json(json.loads((got / "run.json").read_text()),
                     json.loads((want / "run.json").read_text()), got.name)
    assert (got / "generations.jsonl").read_text() == (want / "generations.jsonl").read_text()
    curves = sorted(p.relative_to(want) for p in want.glob("plots/metrics/**/*.tsv"))
    assert curves == sorted(p.relative_to(got) for p in got.glob("plots/metrics/**/*.tsv"))
    for c in curves:
        assert_same_json(read_table(got / c), read_table(want / c), str(c))
    assert_same_json(json.loads((got / "metrics.json").read_text()),
                     json.loads((want / "metrics.json").read_text()), f"{got.name}/metrics.json")


def lock_outs(project: Path) -> dict[str, dict[str, str]]:
    """Stage -> {out path: md5} from dvc.lock."""
    import yaml

    stages = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    return {s: {o["path"]: o.get("md5") for o in v.get("outs", [])} for s, v in stages.items()}


def assert_stage_matches(stage: str, got: Path, want: Path) -> None:
    """The outputs of ``stage`` in project ``got`` equal those of the reference ``want``."""
    outs = lock_outs(want)[stage]
    if stage.startswith(("train_", "seeds_", "modules_", "control_")):
        adapters = [o for o in outs if o.startswith("models/adapters/")]
        reports = [o for o in outs if o.startswith("reports/train/")]
        assert len(adapters) == len(reports) >= 1
        for adapter, report in zip(adapters, reports):
            method = json.loads((want / report / "run.json").read_text())["method"]
            assert_same_adapter(got, want, adapter,
                                "models/quantized" if method == "qlora" else "models/base")
            assert_same_run_report(got / report, want / report)
    elif stage == "compare":
        assert_same_json(json.loads((got / "reports/metrics.json").read_text()),
                         json.loads((want / "reports/metrics.json").read_text()), "metrics.json")
        files = sorted(p.relative_to(want) for p in [*(want / "reports").glob("*.csv"),
                                                     *(want / "reports/compare").rglob("*")]
                       if p.is_file() and p.name != "quantization.csv")
        assert files == sorted(p.relative_to(got) for p in [*(got / "reports").glob("*.csv"),
                                                            *(got / "reports/compare").rglob("*")]
                               if p.is_file() and p.name != "quantization.csv")
        for rel in files:
            if rel.suffix == ".csv":
                assert_same_json(read_table(got / rel), read_table(want / rel), str(rel))
            elif rel.suffix == ".json":
                assert_same_json(json.loads((got / rel).read_text()),
                                 json.loads((want / rel).read_text()), str(rel))
            elif rel.suffix == ".jsonl":
                assert_same_json([json.loads(x) for x in (got / rel).read_text().splitlines()],
                                 [json.loads(x) for x in (want / rel).read_text().splitlines()], str(rel))
    elif stage == "plot":
        got_v = json.loads((got / "reports/verdicts.json").read_text())
        want_v = json.loads((want / "reports/verdicts.json").read_text())
        for h in ("h1", "h2", "h3"):
            assert_same_json(got_v[h], want_v[h], h)

        def keep(fms: list[dict]) -> list[dict]:
            return [fm for fm in fms if fm["key"] not in MACHINE_FAILURE_MODES]

        assert_same_json(keep(got_v["failure_modes"]), keep(want_v["failure_modes"]), "failure_modes")
        assert sorted(p.name for p in (got / "reports/figures").iterdir()) == \
            sorted(p.name for p in (want / "reports/figures").iterdir())
        assert (got / "reports/report.md").stat().st_size > 0
    else:  # base, prepare, quantize: deterministic, so the same bytes (DVC's hashes)
        assert lock_outs(got)[stage] == outs


# --- fixtures (`reference`, the uninterrupted run, is in conftest.py: test_lockfile shares it) --

@pytest.fixture(scope="module")
def stages(reference):
    project, _ = reference
    return dvc(project, "stage", "list", "--name-only").stdout.split()


def kill_plan(project: Path, durations: dict[str, float], done: set[str]):
    """``decide`` for :func:`run_repro`: stop the first stage not stopped before (see the module
    docstring for how each stage is stopped)."""
    def decide(stage: str, sp: StageProc, elapsed: float) -> str | None:
        if stage in done:
            return None
        runs = runs_of(sp.cmdline)
        if runs is not None:
            run = runs[killed_run_index(stage)]
            step = MAX_STEPS - 1 if stage == KILL_AFTER_LAST_CHECKPOINT else 1
            if newest_complete_checkpoint(project, run) < step:
                return None
            if stage == KILL_AFTER_LAST_CHECKPOINT and not await_last_checkpoint(project, run, sp.pid):
                return None  # missed: the chain then reports that no repro was stopped in it
            return "term" if stage == SIGTERM_STAGE else "kill"
        if elapsed < durations[stage] / 2:
            return None
        return "int" if stage == CTRL_C_STAGE else "kill"
    return decide


@pytest.fixture(scope="module")
def chain(reference, stages, tmp_path_factory):
    """Kill `dvc repro` once in every stage (one stage per run), then let it complete."""
    _, durations = reference
    project = make_scratch_project(REPO, tmp_path_factory.mktemp("chain") / "proj", OVERRIDES)
    done: set[str] = set()
    repros: list[Repro] = []
    for _ in range(len(stages) + 1):
        r = run_repro(project, kill_plan(project, durations, done))
        repros.append(r)
        if r.killed is None:
            break
        done.add(r.killed)
    return project, repros


def repro_that_stopped(repros: list[Repro], stage: str) -> int:
    i = next((i for i, r in enumerate(repros) if r.killed == stage), None)
    assert i is not None, f"{stage}: no dvc repro was stopped in it; stopped: {[r.killed for r in repros]}"
    return i


# --- tests ---------------------------------------------------------------------------------------

def test_every_stage_was_stopped_once_and_the_last_repro_completes(chain, stages):
    project, repros = chain
    assert sorted(r.killed for r in repros[:-1]) == sorted(stages)
    last = repros[-1]
    assert last.killed is None and last.returncode == 0, last.stdout[-3000:] + last.stderr[-3000:]
    status = dvc(project, "status")
    assert "up to date" in status.stdout, status.stdout
    leftovers = [str(p.relative_to(project)) for d in ("models", "reports", "data")
                 for p in (project / d).rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    assert not leftovers, leftovers
    ckpts = project / "models/checkpoints"
    assert not ckpts.exists() or not any(ckpts.iterdir()), "checkpoints are removed when runs complete"


@pytest.mark.parametrize("stage", [
    "base", "prepare", "quantize", "train_lora@2", "train_lora@4", "train_qlora@2", "train_qlora@4",
    "seeds_lora@3", "seeds_qlora@3", "modules_lora@kv", "modules_qlora@kv", "control_lora",
    "control_qlora", "compare", "plot"])
def test_stage_stopped_midway_reruns_to_the_uninterrupted_result(chain, reference, stages, stage):
    """``stage`` was stopped while running; the next `dvc repro` ran it again (resuming training
    from its checkpoint) with no manual clean-up, and its outputs equal the reference run's."""
    project, repros = chain
    ref_project, _ = reference
    assert stage in stages, f"{stage} is not a stage of dvc.yaml any more: {stages}"
    i = repro_that_stopped(repros, stage)
    stopped, rerun = repros[i], repros[i + 1]
    assert stopped.stage_alive_at_kill, f"{stage} had finished before it was stopped"
    expected_rc = {"kill": -signal.SIGKILL}.get(stopped.how)
    if expected_rc is not None:
        assert stopped.returncode == expected_rc
    else:  # SIGTERM or Ctrl-C: the stage cleans up, exits 130, and dvc reports the failure
        assert stopped.returncode != 0
        assert "interrupted: completed outputs and checkpoints are kept" in stopped.stderr, \
            stopped.stderr[-2000:]
        assert "Traceback" not in stopped.stderr, stopped.stderr[-2000:]
        # DVC runs a stage as `$SHELL -c <cmd>`. bash execs the stage, so DVC sees its 130; dash
        # (`/bin/sh` when SHELL is unset, as in CI) stays the stage's parent, receives the group's
        # Ctrl-C too and dies of it, so DVC reports -2 while the stage exits 130 on its own.
        rc = -signal.SIGINT if stopped.how == "int" and stopped.under_shell else 130
        assert f"exited with {rc}\n" in stopped.stderr, stopped.stderr[-2000:]
    assert f"Running stage '{stage}'" in rerun.stdout, rerun.stdout[-2000:]
    assert "is busy" not in rerun.stderr and "LockError" not in rerun.stderr, rerun.stderr[-2000:]
    if stage.startswith(("train_", "seeds_", "modules_")):
        import yaml

        group = runs_of(yaml.safe_load((ref_project / "dvc.lock").read_text())
                        ["stages"][stage]["cmd"].split())  # in training order
        k = killed_run_index(stage) % len(group)
        run = group[k]
        for done in group[:k]:  # finished before the kill: restored, not trained again
            assert f"{done}: finished before an interruption" in rerun.stdout, rerun.stdout[-2000:]
        line = next((x for x in rerun.stdout.splitlines()
                     if x.startswith(f"{run}: resuming from checkpoint-")), None)
        assert line is not None, rerun.stdout[-2000:]
        resumed = int(line.split("checkpoint-")[1].split()[0])
        if stage == KILL_AFTER_LAST_CHECKPOINT:
            assert resumed == MAX_STEPS, line
        else:
            assert 1 <= resumed <= MAX_STEPS, line
    assert_stage_matches(stage, project, ref_project)


def test_kill_after_the_last_checkpoint_reports_speed_as_na(chain):
    """Resumed with no step left to train: nothing is timed, so speed is None in run.json and
    the headline step-time ratio is null (n/a in the report), instead of a crash."""
    project, _ = chain
    run = run_name("qlora", 4, "qv", 42)
    m = json.loads((project / "reports/train" / run / "run.json").read_text())
    assert m["resumed_from_step"] == MAX_STEPS
    assert m["timed_steps"] == 0 and m["tokens_per_s"] is None and m["step_time_median_s"] is None
    assert json.loads((project / "reports/metrics.json").read_text())["step_time_ratio"] is None
    assert "no step time was measured" in (project / "reports/report.md").read_text()


# --- the experiment queue --------------------------------------------------------------------------

def exp_metrics(project: Path) -> dict[str, dict]:
    """Experiment name -> its reports/metrics.json, from `dvc exp show --json`."""
    shown = json.loads(dvc(project, "exp", "show", "--json").stdout)
    out = {}
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs", []):
                data = rev.get("data") or {}
                metrics = (data.get("metrics") or {}).get("reports/metrics.json", {}).get("data")
                if rev.get("name") and metrics is not None:
                    out[rev["name"]] = metrics
    return out


def test_queue_runs_two_experiments_at_once_without_clobbering(reference):
    """`dvc exp run --queue` twice and `dvc queue start -j 2`: both experiments run at the same
    time (each in its own temporary workspace, one shared cache), both succeed, and each gives
    what a direct run gives: the headline pair at rank 2 is the reference's rank-2 sweep runs;
    at rank 4 with noise-floor seed 5 it is the reference's headline pair with another noise
    floor."""
    project, _ = reference
    env = scratch_env()
    subprocess.run(["git", "add", "-A"], cwd=project, check=True, env=env)
    subprocess.run(["git", "commit", "-qm", "reference run"], cwd=project, check=True, env=env)
    dvc(project, "exp", "run", "--queue", "--name", "q-r2", "-S", "lora.r=2")
    dvc(project, "exp", "run", "--queue", "--name", "q-r4-s5", "-S", "lora.r=4", "-S", "sweep.seeds=[5]")
    # The workers `dvc queue start` leaves running inherit its stdout and stderr: captured into
    # pipes, the call would return only when they exit, after the last experiment.
    with open(project.parent / "queue-start.log", "w") as log:
        subprocess.run([str(Path(sys.executable).parent / "dvc"), "queue", "start", "-j", "2"],
                       cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    # A busy worker does not answer `dvc queue status` (it lists only queued and finished tasks
    # then), so running experiments are seen as stage processes in their temporary workspaces.
    exps_dir = str(project.resolve() / ".dvc/tmp/exps")
    most_at_once, deadline, next_status = 0, time.monotonic() + 900, 0.0
    while True:
        roots = {root for root, _ in all_stage_processes() if root.startswith(exps_dir)}
        most_at_once = max(most_at_once, len(roots))
        if time.monotonic() >= next_status:
            status = dvc(project, "queue", "status").stdout
            rows = [line.split() for line in status.splitlines()
                    if line.split()[1:2] in (["q-r2"], ["q-r4-s5"])]
            if len(rows) == 2 and all(r[-1] in ("Success", "Failed") for r in rows):
                break
            next_status = time.monotonic() + 3
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
    dvc(project, "queue", "stop", check=False)
    failed = [r for r in rows if r[-1] != "Success"]
    assert not failed, status + dvc(project, "queue", "logs", failed[0][0], check=False).stdout[-3000:]
    assert most_at_once == 2, f"the two experiments never ran at the same time:\n{status}"

    got = exp_metrics(project)
    assert {"q-r2", "q-r4-s5"} <= got.keys(), got.keys()
    ref_metrics = json.loads((project / "reports/metrics.json").read_text())

    def run_json(run: str) -> dict:
        return json.loads((project / "reports/train" / run / "run.json").read_text())

    for method in ("lora", "qlora"):
        r2 = run_json(run_name(method, 2, "qv", 42))["eval_loss"]
        assert got["q-r2"][f"eval_loss_{method}"] == pytest.approx(r2, abs=TOL)
        assert got["q-r4-s5"][f"eval_loss_{method}"] == pytest.approx(
            ref_metrics[f"eval_loss_{method}"], abs=TOL)
    assert got["q-r2"]["eval_loss_lora"] != got["q-r4-s5"]["eval_loss_lora"]
    assert got["q-r4-s5"]["noise_floor_cos_sim"] != ref_metrics["noise_floor_cos_sim"]
