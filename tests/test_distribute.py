"""qlora_diag.distribute: the sweep's training stages as SLURM jobs, results through a DVC remote.

Fast tests: which stages are planned, the batch scripts run under bash with stand-ins for git
and dvc, how job states are read and reported, and the errors of the submit command.

Slow tests (a real single-node SLURM from tests/local_slurm.py, real dvc, embedded:tiny-llama
with the smoke params, one torch thread per stage so two jobs share the 2 cores):
- a fan-out to a local-directory remote in which one job fails (its trainer is killed, as the
  OOM killer would) and one is cancelled: the command names both with their logs, the six
  others are in the remote, the rerun submits only the two, and the final `dvc repro` restores
  every run and runs only compare and plot; the metrics equal a local `dvc repro` to 1e-6;
- sharing between two clones through a bare git remote and a local DVC remote: `dvc pull`
  brings every adapter, curve and report, nothing retrains; an experiment travels with
  `dvc exp push` / `dvc exp pull`;
- the same project moved to an S3 remote (a local moto server) with one more noise-floor seed:
  the run-cache answers the eight earlier stages, the two new ones run as SLURM jobs that push
  to S3, and the metrics equal the experiment's local run with that seed.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from qlora_diag import distribute as D
from qlora_diag.core.config import load_params
from qlora_diag.core.errors import UserError
from qlora_diag.tools.scratch import dvc, make_scratch_project, scratch_env, set_key
from qlora_diag.tools.smoke import SMOKE_PARAMS

REPO = Path(__file__).resolve().parents[1]
SMOKE_STAGES = ["train_lora@2", "train_qlora@2", "train_lora@4", "train_qlora@4",
                "seeds_lora@3", "seeds_qlora@3", "modules_lora@kv", "modules_qlora@kv",
                "control_lora", "control_qlora"]
# One torch thread per stage: the node runs two jobs at once on 2 cores. The reference runs with
# the same params, so it computes the same numbers.
OVERRIDES = {"base.model": "embedded:tiny-llama", **SMOKE_PARAMS, "train.threads": 1}
IN_CI = os.environ.get("CI") == "true"


def smoke_params(tmp_path):
    """The params of the slow tests, validated as a stage would load them."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in OVERRIDES.items():
        set_key(params, key, value)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return load_params(path)


# --- planning ------------------------------------------------------------------------------------

def test_training_stages_of_the_smoke_params(tmp_path):
    assert D.training_stages(smoke_params(tmp_path)) == SMOKE_STAGES


def test_training_stages_are_the_adapter_stages_dvc_expands(tmp_path):
    """For the default params, the planned stages are exactly the stages of `dvc stage list`
    whose outputs are adapters, and the upstream ones are base, prepare and quantize."""
    project = make_scratch_project(REPO, tmp_path / "p", {})
    listed = dvc(project, "stage", "list").stdout.splitlines()
    adapter_stages = {line.split()[0] for line in listed if "models/adapters/" in line}
    planned = D.training_stages(load_params(project / "params.yaml"))
    assert len(planned) == len(set(planned)) == 20  # (4 ranks + 2 seeds + 3 presets + control) x 2
    assert set(planned) == adapter_stages
    assert D.upstream_stages(project, planned) == ["base", "prepare", "quantize"]


# --- the batch scripts under bash, with stand-ins for git and dvc ----------------------------------

FAKE_TOOL = """#!/bin/bash
# Records its call; `git clone` makes the clone; dvc fails with $FAKE_DVC_FAIL when its arguments
# start with $FAKE_DVC_FAIL_ON.
echo "$(basename "$0") $* | cwd=$PWD | lock=$(head -n1 dvc.lock 2>/dev/null) | \
local=$(head -n1 .dvc/config.local 2>/dev/null)" >> "$CALLS"
if [ "$(basename "$0")" = git ] && [ "$1" = clone ]; then mkdir -p "${@: -1}/.dvc"; fi
if [ "$(basename "$0")" = dvc ] && [ -n "${FAKE_DVC_FAIL_ON:-}" ] \
   && [[ "$*" == "$FAKE_DVC_FAIL_ON"* ]]; then exit "$FAKE_DVC_FAIL"; fi
exit 0
"""


@pytest.fixture()
def fake_tools(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("git", "dvc"):
        (bin_dir / tool).write_text(FAKE_TOOL)
        (bin_dir / tool).chmod(0o755)
    return bin_dir


def make_sweep(tmp_path, bin_dir, **kw) -> D.Sweep:
    repo = tmp_path / "repo"
    (repo / ".dvc").mkdir(parents=True, exist_ok=True)
    args = dict(repo=repo, commit="0123456789abcdef0123456789abcdef01234567",
                stages=tuple(SMOKE_STAGES), upstream=("base", "prepare", "quantize"),
                dir=tmp_path / "sweep", bin_dir=bin_dir)
    return D.Sweep(**{**args, **kw})


def run_task(sweep: D.Sweep, task: int, tmp_path, **env) -> subprocess.CompletedProcess:
    calls = tmp_path / "calls.txt"
    full_env = {**os.environ, "SLURM_ARRAY_TASK_ID": str(task), "SLURM_JOB_ID": "77",
                "CALLS": str(calls), **env}
    return subprocess.run(["bash", str(sweep.dir / D.ARRAY_SCRIPT)], env=full_env, text=True,
                          capture_output=True, cwd=tmp_path)


def calls(tmp_path) -> list[list[str]]:
    return [line.rstrip("\n").split(" | ") for line in (tmp_path / "calls.txt").read_text().splitlines()]


def test_array_task_clones_pulls_upstream_runs_its_stage_and_pushes(tmp_path, fake_tools):
    sweep = make_sweep(tmp_path, fake_tools)
    (sweep.repo / ".dvc/config.local").write_text("credentials")
    D.write_sweep(sweep, "lock of the submitter")
    proc = run_task(sweep, 3, tmp_path)
    assert proc.returncode == 0, proc.stderr
    clone = sweep.dir / "clones" / "3"
    got = [(c[0], c[1]) for c in calls(tmp_path)]
    assert got == [
        (f"git clone --quiet --no-checkout {sweep.repo} {clone}", f"cwd={tmp_path}"),
        (f"git checkout --quiet {sweep.commit}", f"cwd={clone}"),
        ("dvc pull base prepare quantize", f"cwd={clone}"),
        ("dvc repro --single-item train_qlora@4", f"cwd={clone}"),
        ("dvc push train_qlora@4", f"cwd={clone}"),
        ("dvc push --run-cache train_qlora@4", f"cwd={clone}"),
    ]
    # every dvc call saw the submitter's dvc.lock and the repository's local config
    for call in calls(tmp_path)[2:]:
        assert call[2:] == ["lock=lock of the submitter", "local=credentials"]
    assert (sweep.dir / "status/3").read_text().strip() == "ok"
    assert not clone.exists()  # a finished task leaves no clone behind
    assert proc.stdout.startswith("train_qlora@4: array task 3, job 77")


def test_a_failing_step_writes_the_command_and_keeps_the_clone(tmp_path, fake_tools):
    sweep = make_sweep(tmp_path, fake_tools)
    D.write_sweep(sweep, "lock")
    proc = run_task(sweep, 0, tmp_path, FAKE_DVC_FAIL_ON="repro", FAKE_DVC_FAIL="7")
    assert proc.returncode == 7
    assert [c[0] for c in calls(tmp_path)][-1] == "dvc repro --single-item train_lora@2"
    assert (sweep.dir / "status/0").read_text().strip() == \
        'failed (exit 7): dvc repro --single-item "$STAGE"'
    assert (sweep.dir / "clones/0").is_dir()


def sbatch_lines(script: str) -> list[str]:
    return [line.split(None, 1)[1] for line in script.splitlines() if line.startswith("#SBATCH")]


def test_sbatch_header_array_range_throttle_logs_and_user_options(tmp_path, fake_tools):
    sweep = make_sweep(tmp_path, fake_tools, stages=("train_lora@2", "seeds_qlora@1"),
                       max_parallel=1, sbatch_args=("--partition=gpu", "--gres=gpu:1"))
    assert sbatch_lines(D.array_script(sweep)) == [
        "--job-name=qlora-train", "--array=0-1%1", f"--output={sweep.dir}/logs/%a.log",
        "--partition=gpu", "--gres=gpu:1"]
    assert sbatch_lines(D.final_script(sweep)) == [
        "--job-name=qlora-final", f"--output={sweep.dir}/logs/final.log",
        "--partition=gpu", "--gres=gpu:1"]
    D.write_sweep(sweep, "lock")
    assert os.readlink(sweep.dir / "logs/seeds_qlora@1.log") == "1.log"


def git(cwd, *args):
    subprocess.run(["git", *args], cwd=cwd, check=True, env=scratch_env(), capture_output=True)


def test_final_job_runs_repro_pull_in_the_repo_unless_params_changed(tmp_path, fake_tools):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "params.yaml").write_text("seed: 1\n")
    (repo / "dvc.yaml").write_text("stages: {}\n")
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "c")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, text=True,
                            capture_output=True).stdout.strip()
    # the stand-in dvc only; git must be the real one for `git diff`
    (fake_tools / "git").unlink()
    sweep = make_sweep(tmp_path, fake_tools, commit=commit)
    D.write_sweep(sweep, "lock")
    env = {**os.environ, "CALLS": str(tmp_path / "calls.txt")}
    proc = subprocess.run(["bash", str(sweep.dir / D.FINAL_SCRIPT)], env=env, text=True,
                          capture_output=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert [(c[0], c[1]) for c in calls(tmp_path)] == [("dvc repro --pull", f"cwd={repo}")]
    assert (sweep.dir / "status/final").read_text().strip() == "ok"

    (repo / "params.yaml").write_text("seed: 2\n")
    proc = subprocess.run(["bash", str(sweep.dir / D.FINAL_SCRIPT)], env=env, text=True,
                          capture_output=True, cwd=tmp_path)
    assert proc.returncode == 3
    assert "params.yaml or dvc.yaml changed since commit" in proc.stdout
    assert len(calls(tmp_path)) == 1  # no second dvc repro
    assert "changed since commit" in (sweep.dir / "status/final").read_text()


# --- reading job states --------------------------------------------------------------------------

class FakeSlurm:
    """Answers squeue / scontrol / scancel as SLURM 22.05 does, from a table."""

    def __init__(self, queued: dict[str, str], records: dict[str, str]):
        self.queued, self.records, self.calls = queued, records, []

    def __call__(self, args, **kw):
        self.calls.append(args)
        if args[0] == "squeue":
            out = "".join(f"{j}|{s}\n" for j, s in self.queued.items())
            return subprocess.CompletedProcess(args, 0, out, "")
        if args[0] == "scontrol":
            job = args[-1]
            if job in self.records:
                return subprocess.CompletedProcess(args, 0, self.records[job], "")
            return subprocess.CompletedProcess(
                args, 1, "", "slurm_load_jobs error: Invalid job id specified\n")
        return subprocess.CompletedProcess(args, 0, "", "")


def record(job, state, code):
    return (f"JobId=9 ArrayJobId=12 ArrayTaskId={job.split('_')[-1]} JobName=qlora-train "
            f"JobState={state} Reason=None Dependency=(null) ExitCode={code} RunTime=00:00:03\n")


def write_sweep_info(tmp_path, stages, array_job="12", final_job="13") -> Path:
    sweep_dir = tmp_path / "sweep"
    (sweep_dir / "status").mkdir(parents=True)
    (sweep_dir / "logs").mkdir()
    info = {"dir": str(sweep_dir), "stages": stages, "array_job": array_job, "final_job": final_job}
    (sweep_dir / D.SWEEP_FILE).write_text(json.dumps(info))
    return sweep_dir


def test_outcomes_from_squeue_status_files_and_slurmctld(tmp_path):
    stages = ["a@1", "b@2", "c@3", "d@4", "e@5", "f@6", "g@7"]
    sweep_dir = write_sweep_info(tmp_path, stages)
    (sweep_dir / "logs/d@4.log").write_text("d@4: array task 3 ...\n")  # started, then killed
    (sweep_dir / "status/0").write_text("ok\n")                                      # done
    (sweep_dir / "status/1").write_text("failed (exit 1): dvc repro --single-item \"$STAGE\"\n")
    fake = FakeSlurm(queued={"12_4": "RUNNING", "12_5": "PENDING", "13": "PENDING"},
                     records={"12_1": record("12_1", "FAILED", "1:0"),
                              "12_2": record("12_2", "CANCELLED", "0:15")})
    tasks, final = D.outcomes(D.read_sweep(sweep_dir), fake)
    got = [(o.name, o.state, o.ended, o.ok) for o in tasks]
    assert got == [("a@1", "COMPLETED", True, True), ("b@2", "FAILED", True, False),
                   ("c@3", "CANCELLED", True, False), ("d@4", "ENDED", True, False),
                   ("e@5", "RUNNING", False, False), ("f@6", "PENDING", False, False),
                   ("g@7", "NOT RUN", True, False)]
    assert tasks[1].detail.startswith("failed (exit 1): dvc repro")
    assert tasks[2].detail == "exit code 0:15 (no status written: cancelled or killed)"
    assert tasks[3].detail.startswith("started, then ended without writing its status")
    assert tasks[6].detail.startswith("left the queue without starting")
    assert tasks[0].log == sweep_dir / "logs/a@1.log"
    assert (final.name, final.state, final.ended) == ("final", "PENDING", False)


def test_report_names_failed_stages_with_their_logs_and_cancels_the_final_job(tmp_path):
    sweep_dir = write_sweep_info(tmp_path, ["a@1", "b@2", "c@3"])
    (sweep_dir / "status/0").write_text("ok\n")
    (sweep_dir / "status/2").write_text("ok\n")
    fake = FakeSlurm(queued={"13": "PENDING"}, records={"12_1": record("12_1", "CANCELLED", "0:15")})
    lines: list[str] = []
    assert D.wait_and_report(sweep_dir, 0, lines.append, fake) == 1
    text = "\n".join(lines)
    assert (f"b@2: CANCELLED (exit code 0:15 (no status written: cancelled or killed)); "
            f"log {sweep_dir}/logs/b@2.log") in text
    assert "1 of 3 stage(s) did not finish" in text
    assert "results of the 2 that finished are in the remote's run-cache" in text
    assert ["scancel", "13"] in fake.calls


def test_report_after_the_final_job_counts_what_dvc_ran_and_restored(tmp_path):
    sweep_dir = write_sweep_info(tmp_path, ["a@1"])
    (sweep_dir / "status/0").write_text("ok\n")
    (sweep_dir / "status/final").write_text("ok\n")
    (sweep_dir / "logs/final.log").write_text(
        "Stage 'base' didn't change, skipping\n"
        "Stage 'a@1' is cached - skipping run, checking out outputs\n"
        "Running stage 'compare':\n> python stages/compare.py\nRunning stage 'plot':\n")
    lines: list[str] = []
    assert D.wait_and_report(sweep_dir, 0, lines.append, FakeSlurm({}, {})) == 0
    assert "restored 1 stage(s) from the run-cache and ran compare, plot" in lines[-1]


def test_waiting_rides_out_a_few_squeue_failures_but_not_many(tmp_path):
    sweep_dir = write_sweep_info(tmp_path, ["a@1"])
    (sweep_dir / "status/0").write_text("ok\n")
    (sweep_dir / "status/final").write_text("ok\n")
    done = FakeSlurm({}, {})

    def flaky(failures):
        count = {"n": 0}

        def run(args, **kw):
            if args[0] == "squeue" and count["n"] < failures:
                count["n"] += 1
                return subprocess.CompletedProcess(
                    args, 1, "", "slurm_load_jobs error: Socket timed out on send/recv operation\n")
            return done(args, **kw)
        return run

    assert D.wait_and_report(sweep_dir, 0, lambda line: None, flaky(D.SQUEUE_RETRIES - 1)) == 0
    with pytest.raises(UserError, match=r"`squeue --me .*` failed \(exit 1\): "
                                        r"slurm_load_jobs error: Socket timed out"):
        D.wait_and_report(sweep_dir, 0, lambda line: None, flaky(D.SQUEUE_RETRIES))


def test_status_without_waiting_lists_what_is_still_queued(tmp_path):
    sweep_dir = write_sweep_info(tmp_path, ["a@1", "b@2"])
    fake = FakeSlurm(queued={"12_0": "RUNNING", "12_1": "PENDING", "13": "PENDING"}, records={})
    lines: list[str] = []
    assert D.wait_and_report(sweep_dir, 0, lines.append, fake, wait=False) == 3
    assert lines == ["distribute: 3 job(s) still queued or running: a@1 RUNNING, b@2 PENDING, "
                     "final PENDING"]


def test_a_sweep_with_queued_jobs_is_unfinished(tmp_path):
    workdir = tmp_path / "sweeps"
    for name, array_job, final_job in (("old", "5", "6"), ("busy", "12", "13"), ("tail", None, "20")):
        (workdir / name).mkdir(parents=True)
        (workdir / name / D.SWEEP_FILE).write_text(json.dumps(
            {"array_job": array_job, "final_job": final_job}))
    queued = {"12_3": "RUNNING", "13": "PENDING", "120_1": "RUNNING", "21": "PENDING"}
    assert D.unfinished_sweeps(workdir, queued) == [workdir / "busy"]
    assert D.unfinished_sweeps(workdir, {"20": "PENDING"}) == [workdir / "tail"]
    assert D.unfinished_sweeps(workdir, {}) == []


def test_submit_jobs_chains_the_final_job_on_the_array(tmp_path, fake_tools):
    sweep = make_sweep(tmp_path, fake_tools)
    D.write_sweep(sweep, "lock")
    calls_made = []

    def fake(args, **kw):
        calls_made.append(args)
        return subprocess.CompletedProcess(args, 0, "41;cluster\n" if len(calls_made) == 1 else "42\n", "")

    assert D.submit_jobs(sweep, fake) == ("41", "42")
    assert calls_made == [
        ["sbatch", "--parsable", str(sweep.dir / D.ARRAY_SCRIPT)],
        ["sbatch", "--parsable", "--dependency=afterok:41", "--kill-on-invalid-dep=yes",
         str(sweep.dir / D.FINAL_SCRIPT)]]


# --- errors of the submit command --------------------------------------------------------------

@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return make_scratch_project(REPO, tmp_path_factory.mktemp("scratch") / "p", OVERRIDES)


def test_uncommitted_params_are_named_and_outputs_are_not(scratch):
    commit = D.committed_head(scratch)
    (scratch / "dvc.lock").write_text("schema: '2.0'\n")  # written by dvc repro: fine
    assert D.committed_head(scratch) == commit
    original = (scratch / "params.yaml").read_text()
    try:
        (scratch / "params.yaml").write_text(original.replace("seed: 42", "seed: 43"))
        with pytest.raises(UserError, match=r"^params.yaml: changed since the last commit "
                                            r"\([0-9a-f]{12}\); each job clones that commit"):
            D.committed_head(scratch)
    finally:
        (scratch / "params.yaml").write_text(original)
        (scratch / "dvc.lock").unlink()


def test_no_default_remote_says_how_to_add_one(scratch):
    with pytest.raises(UserError, match=r"no default DVC remote.*`dvc remote add -d NAME URL`"):
        D.default_remote(scratch)


def test_submit_without_slurm_commands_or_with_a_bad_sbatch_argument(scratch, monkeypatch):
    monkeypatch.chdir(scratch)
    real_which = shutil.which
    # scontrol and scancel present whether or not this machine has SLURM installed
    monkeypatch.setattr(D.shutil, "which", lambda t: None if t in ("sbatch", "squeue") else (
        f"/usr/bin/{t}" if t in ("scontrol", "scancel") else real_which(t)))
    with pytest.raises(UserError, match=r"^sbatch, squeue: not found on PATH; "
                                        r"submit from a machine of the SLURM cluster"):
        D.main(["submit"])
    monkeypatch.setattr(D.shutil, "which", lambda t: "/usr/bin/" + t)
    with pytest.raises(UserError, match=r"sbatch arguments \['gpu'\]: each must be an option"):
        D.main(["submit", "--", "--partition", "gpu"])
    with pytest.raises(UserError, match=r"--max-parallel 0: must be a positive number"):
        D.main(["submit", "--max-parallel", "0"])
    with pytest.raises(UserError, match=r"--workdir .*: holds a space or '%'"):
        D.main(["submit", "--workdir", "sweeps 2"])


def test_status_of_a_directory_that_is_no_sweep(tmp_path):
    with pytest.raises(UserError, match=r"sweep.json: not found; give a sweep directory"):
        D.main(["status", str(tmp_path)])


def test_readme_shows_the_script_the_generator_writes():
    """The README's sbatch example is the array script for the smoke sweep, byte for byte, so
    the example cannot drift from what the jobs run."""
    readme = (REPO / "README.md").read_text()
    sweep = D.Sweep(repo=Path("/home/you/qlora-diagnostics"),
                    commit="4f1c2ab9e0d35c8a7b6e1f20d9c4b3a2e1f0d9c8",
                    stages=tuple(SMOKE_STAGES), upstream=("base", "prepare", "quantize"),
                    dir=Path("/home/you/qlora-diagnostics/.dvc/tmp/distribute/20261202-141503-k2j8x1"),
                    bin_dir=Path("/home/you/qlora-diagnostics/.venv/bin"),
                    sbatch_args=("--cpus-per-task=1",))
    assert "```bash\n" + D.array_script(sweep) + "```" in readme


# --- end to end: a real SLURM, real dvc, two remotes ---------------------------------------------

# Numbers that measure the machine (time, memory) differ between any two runs; everything else
# in metrics.json is computed from the adapters and must agree.
MACHINE_WORDS = ("time", "mem", "tokens_per_s", "_s_", "wall")
TOL = 1e-6


def not_available(what: str) -> None:
    """Skip outside CI; in CI (CI=true), whatever the test needs must be there: fail."""
    if IN_CI:
        pytest.fail(f"{what} (CI must provide it: .ci/run installs it)")
    pytest.skip(what)


@pytest.fixture(scope="module")
def slurm():
    from local_slurm import PACKAGES, LocalSlurm, missing_binaries

    missing = missing_binaries()
    if missing:
        not_available(f"SLURM binaries not installed ({', '.join(missing)}): "
                      f"apt-get install {PACKAGES}")
    if os.geteuid() != 0:
        not_available("the local SLURM's daemons (slurmd, munged) need root")
    cluster = LocalSlurm().start()
    yield cluster
    cluster.stop()


class Background:
    """`dvc repro` of a scratch project in a process of its own, so that the reference run
    shares the 2 cores with the SLURM jobs instead of adding its time to theirs."""

    def __init__(self, project: Path):
        self.project = project
        self.log = project.parent / f"{project.name}-repro.log"
        exe = Path(sys.executable).parent / "dvc"
        self.proc = subprocess.Popen([str(exe), "repro"], cwd=project, env=scratch_env(),
                                     stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)

    def wait(self) -> Path:
        rc = self.proc.wait()
        assert rc == 0, self.log.read_text()[-3000:]
        return self.project


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The local `dvc repro` of the same params, the numbers the distributed run must give."""
    project = make_scratch_project(REPO, tmp_path_factory.mktemp("reference") / "a", OVERRIDES)
    run = Background(project)
    yield run
    if run.proc.poll() is None:
        run.proc.terminate()
        run.proc.wait()


def run_distribute(project: Path, slurm, *args: str) -> subprocess.CompletedProcess:
    env = {**scratch_env(), **slurm.env}
    return subprocess.run([sys.executable, "-m", "qlora_diag.distribute", *args], cwd=project,
                          env=env, text=True, capture_output=True)


def submit(project: Path, slurm, *args: str) -> subprocess.CompletedProcess:
    return run_distribute(project, slurm, "submit", "--poll", "1", *args, "--",
                          "--cpus-per-task=1")


def sweep_dir_of(output: str) -> Path:
    line = next(x for x in output.splitlines() if x.startswith("distribute: logs in "))
    return Path(line.split("logs in ", 1)[1].split(" (", 1)[0]).parent


def trainer_pid(clone: Path, timeout_s: float = 600) -> int:
    """The python process of `stages/train.py` running in ``clone`` (DVC may start it under a
    shell, whose command line holds the same words as one argument)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                cmd = Path(entry.path, "cmdline").read_bytes().split(b"\0")
                cwd = os.readlink(Path(entry.path, "cwd"))
            except OSError:
                continue
            if cwd == str(clone) and b"stages/train.py" in cmd:
                return int(entry.name)
        time.sleep(0.2)
    raise AssertionError(f"no trainer started in {clone} within {timeout_s} s")


def run_cache_entries(root: Path) -> int:
    """Run-cache entries (runs/<2>/<key>/<value>) of a local DVC remote."""
    return sum(1 for p in (root / "runs").glob("*/*/*") if p.is_file())


def repro_log(path: Path) -> tuple[list[str], set[str]]:
    """(stages `dvc repro` ran, stages it restored from the run-cache), from its output."""
    text = path.read_text()
    ran = [line.split("'")[1] for line in text.splitlines() if line.startswith("Running stage '")]
    restored = {line.split("'")[1] for line in text.splitlines()
                if line.startswith("Stage '") and "is cached - skipping run" in line}
    return ran, restored


def assert_same_results(project: Path, reference_metrics: dict) -> None:
    got = json.loads((project / "reports/metrics.json").read_text())
    assert set(got) == set(reference_metrics)
    for key, want in reference_metrics.items():
        if any(w in key for w in MACHINE_WORDS) or key.endswith("_s"):
            continue
        if isinstance(want, (int, float)) and not isinstance(want, bool):
            assert got[key] == pytest.approx(want, rel=TOL, abs=TOL), key
        else:
            assert got[key] == want, key


def commit_all(project: Path, message: str) -> None:
    git(project, "add", "-A")
    git(project, "commit", "-qm", message)


@pytest.fixture(scope="module")
def fanout(slurm, reference, tmp_path_factory):
    """A fan-out to a local-directory remote in which the trainer of array task 0 is killed
    (SIGKILL, as the OOM killer does) and the still pending last task is cancelled; then the
    rerun of the same command."""
    root = tmp_path_factory.mktemp("fanout")
    project = make_scratch_project(REPO, root / "project", OVERRIDES)
    remote = root / "remote"
    dvc(project, "remote", "add", "-d", "shared", str(remote))
    commit_all(project, "a shared remote")
    t0 = time.perf_counter()
    first = submit(project, slurm, "--no-wait")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    sweep1 = sweep_dir_of(first.stdout)
    info = json.loads((sweep1 / "sweep.json").read_text())
    last = len(info["stages"]) - 1
    subprocess.run(["scancel", f"{info['array_job']}_{last}"], check=True,
                   env={**os.environ, **slurm.env})
    os.kill(trainer_pid(sweep1 / "clones" / "0"), signal.SIGKILL)
    status = run_distribute(project, slurm, "status", str(sweep1), "--wait", "--poll", "1")
    entries_after_first = run_cache_entries(remote)
    rerun = submit(project, slurm)
    seconds = time.perf_counter() - t0
    return dict(project=project, remote=remote, first=first, sweep1=sweep1, info=info,
                status=status, entries_after_first=entries_after_first, rerun=rerun,
                sweep2=sweep_dir_of(rerun.stdout), seconds=seconds)


@pytest.mark.slow
def test_fanout_failure_then_rerun_submits_only_the_missing_stages(fanout, reference):
    info, status, rerun = fanout["info"], fanout["status"], fanout["rerun"]
    sweep1, sweep2 = fanout["sweep1"], fanout["sweep2"]
    assert info["stages"] == SMOKE_STAGES
    killed, cancelled = SMOKE_STAGES[0], SMOKE_STAGES[-1]

    # the report names both stages, their state and their log
    assert status.returncode == 1, status.stdout + status.stderr
    out = status.stdout
    assert "2 of 10 stage(s) did not finish" in out, out
    assert f"  {killed}: FAILED (failed (exit " in out, out
    assert f"dvc repro --single-item \"$STAGE\"); log {sweep1}/logs/{killed}.log" in out, out
    assert (f"  {cancelled}: NOT RUN (left the queue without starting: cancelled while pending"
            in out and f"log {sweep1}/logs/{cancelled}.log" in out), out
    assert f"Running stage '{killed}'" in (sweep1 / "logs" / f"{killed}.log").read_text()
    # the eight others pushed their run-cache entries (one each); the failed and cancelled none
    assert fanout["entries_after_first"] == 8

    # the rerun submits exactly the two, and the final repro trains nothing
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert (f"10 training stages; the run-cache answers 8, 2 to run: {killed}, {cancelled}"
            in rerun.stdout), rerun.stdout
    assert run_cache_entries(fanout["remote"]) == 10
    ran, restored = repro_log(sweep2 / "logs/final.log")
    assert ran == ["compare", "plot"]
    assert restored == set(SMOKE_STAGES)
    # every training stage ran in a SLURM job (its log shows DVC running it), none here
    for stage in SMOKE_STAGES:
        sweep = sweep2 if stage in (killed, cancelled) else sweep1
        assert f"Running stage '{stage}'" in (sweep / "logs" / f"{stage}.log").read_text(), stage
    for submitter_output in (fanout["first"].stdout, rerun.stdout):
        ran_here = [x for x in submitter_output.splitlines() if x.startswith("Running stage")]
        assert all(s.split("'")[1] in ("base", "prepare", "quantize") for s in ran_here), ran_here

    project = fanout["project"]
    for run in ("lora-r2-qv-s42", "qlora-r4-kv-s42", "qlora-r4-qv-s1"):
        assert (project / "models/adapters" / run / "adapter_model.safetensors").is_file()
    assert_same_results(project, json.loads((reference.wait() / "reports/metrics.json").read_text()))
    print(f"fan-out with a failure, a cancel and the rerun: {fanout['seconds']:.0f} s")


def file_digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def shared(reference, tmp_path_factory):
    """README "Share and distribute": the reference clone pushes to a bare git remote and a local
    DVC remote, a colleague's clone pulls; then an experiment with one more seed travels."""
    a = reference.wait()
    root = tmp_path_factory.mktemp("share")
    origin, store, b = root / "origin.git", root / "store", root / "colleague"
    git(root, "init", "-q", "--bare", str(origin))
    dvc(a, "remote", "add", "-d", "store", str(store))
    commit_all(a, "reference results")
    git(a, "remote", "add", "origin", str(origin))
    git(a, "push", "-q", "origin", "HEAD:refs/heads/main")
    r = dict(push=dvc(a, "push"))
    git(root, "clone", "-q", "-b", "main", str(origin), str(b))
    r.update(b=b, a=a, pull=dvc(b, "pull"), status=dvc(b, "status"), repro=dvc(b, "repro"))
    r["exp_run"] = dvc(a, "exp", "run", "-n", "more-seeds", "-S", "sweep.seeds=[3,5]",
                       check=False)
    r["exp_metrics"] = json.loads((a / "reports/metrics.json").read_text())
    r["exp_push"] = dvc(a, "exp", "push", "origin", "more-seeds", check=False)
    r["exp_pull"] = dvc(b, "exp", "pull", "origin", "more-seeds", check=False)
    r["exp_show"] = dvc(b, "exp", "show", "--json", check=False)
    r["exp_apply"] = dvc(b, "exp", "apply", "more-seeds", check=False)
    r["repro_after_apply"] = dvc(b, "repro", check=False)
    return r


@pytest.mark.slow
def test_a_fresh_clone_gets_every_result_with_dvc_pull_and_experiments_travel(shared):
    a, b = shared["a"], shared["b"]
    assert "Everything is up to date" not in shared["push"].stdout
    # every adapter, curve and the models, byte for byte; the reports came with git
    for sub in ("models/adapters", "reports/train", "models/base", "data/prepared"):
        assert file_digests(b / sub) == file_digests(a / sub), sub
    assert (b / "reports/report.md").read_text() == (a / "reports/report.md").read_text()
    assert "Data and pipelines are up to date." in shared["status"].stdout
    assert "Running stage" not in shared["repro"].stdout, shared["repro"].stdout

    # the experiment: two more runs (seed 5) trained in clone a, pulled by clone b
    for step in ("exp_run", "exp_push", "exp_pull", "exp_show", "exp_apply", "repro_after_apply"):
        proc = shared[step]
        assert proc.returncode == 0, (step, proc.stdout[-2000:], proc.stderr[-2000:])
    ran = [x.split("'")[1] for x in shared["exp_run"].stdout.splitlines()
           if x.startswith("Running stage")]
    # the control stages depend on sweep.seeds (their data order is its first seed), so adding
    # a seed reruns them too, to the same results
    assert ran[-2:] == ["compare", "plot"]
    assert sorted(ran[:-2]) == ["control_lora", "control_qlora", "seeds_lora@5", "seeds_qlora@5"]
    assert "more-seeds" in shared["exp_show"].stdout
    assert "Running stage" not in shared["repro_after_apply"].stdout
    for run in ("lora-r4-qv-s5", "qlora-r4-qv-s5"):
        assert file_digests(b / "models/adapters" / run) == file_digests(a / "models/adapters" / run)
    assert json.loads((b / "reports/metrics.json").read_text()) == shared["exp_metrics"]


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """A moto S3 server on a free loopback port, with one bucket."""
    try:
        import boto3
        import dvc_s3  # noqa: F401  (DVC's s3:// support)
    except ImportError as exc:
        not_available(f"{exc.name} not installed: pip install -r requirements-test.txt")
    exe = Path(sys.executable).parent / "moto_server"
    if not exe.exists():
        not_available("moto_server not installed: pip install -r requirements-test.txt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    client.create_bucket(Bucket="qlora-sweeps")
    yield endpoint, client
    proc.terminate()
    proc.wait()


@pytest.mark.slow
def test_fanout_through_s3_trains_only_the_new_seed(fanout, shared, s3_server, slurm):
    """The fanned-out project moves to an S3 remote (endpoint in .dvc/config, keys in the
    uncommitted .dvc/config.local, as with MinIO) and adds a noise-floor seed."""
    endpoint, client = s3_server
    project = fanout["project"]
    dvc(project, "remote", "add", "-d", "s3", "s3://qlora-sweeps/store")
    dvc(project, "remote", "modify", "s3", "endpointurl", endpoint)
    dvc(project, "remote", "modify", "--local", "s3", "access_key_id", "testing")
    dvc(project, "remote", "modify", "--local", "s3", "secret_access_key", "testing")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["sweep"]["seeds"] = [3, 5]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit_all(project, "S3 remote, one more seed")

    proc = submit(project, slurm)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the control stages depend on sweep.seeds (their data order is its first seed): they run
    # again, to the same results
    new = ("seeds_lora@5", "seeds_qlora@5", "control_lora", "control_qlora")
    assert (f"12 training stages; the run-cache answers 8, 4 to run: {', '.join(new)}"
            in proc.stdout), proc.stdout
    sweep = sweep_dir_of(proc.stdout)
    for stage in new:
        assert f"Running stage '{stage}'" in (sweep / "logs" / f"{stage}.log").read_text()
    # the eight unchanged stages' runs are in the workspace already ("didn't change"), the four
    # rerun ones come from S3
    ran, restored = repro_log(sweep / "logs/final.log")
    assert ran == ["compare", "plot"]
    assert restored == set(new)
    assert "restored 4 stage(s) from the run-cache and ran compare, plot" in proc.stdout
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="qlora-sweeps",
                                                     Prefix="store/runs/")["Contents"]]
    assert len(keys) == 4, keys  # one run-cache entry per job (2 new seeds, 2 control), nothing else
    assert_same_results(project, shared["exp_metrics"])
