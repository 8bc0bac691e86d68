"""dvc.lock emptied by a kill while DVC writes it (qlora_diag/core/lockfile.py): detection, the
message, recovery without retraining, and one real `dvc repro` killed in that window."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qlora_diag.core import lockfile
from qlora_diag.core.cli import run_stage
from qlora_diag.core.errors import UserError
from qlora_diag.core.lockfile import (
    BROKEN_COPY,
    LAST_GOOD,
    LOCK,
    Plan,
    broken_message,
    conflict_line,
    lock_problem,
    plan_recovery,
    recorded_stages,
    recover,
)
from qlora_diag.tools.scratch import dvc, make_scratch_project, scratch_env

REPO = Path(__file__).resolve().parents[1]
# A lock DVC wrote: the committed one of the default pipeline (19 stages, ~40 KB).
DVC_WRITTEN = (REPO / "dvc.lock").read_bytes()
# What a kill can leave: DVC writes the lock through Python's 8 KiB file buffer, so the file holds
# nothing or a multiple of 8 KiB until the dump ends.
FLUSH = 8192
TRAINING = ("train_", "seeds_", "modules_", "control_")


def tiny_lock(*stages: str) -> bytes:
    """A lock in DVC's format recording ``stages`` (minimal entries the schema accepts)."""
    body = "".join(f"  {s}:\n    cmd: python stages/{s}.py\n" for s in stages)
    return f"schema: '2.0'\nstages:\n{body}".encode()


def dvc_project(tmp_path: Path) -> Path:
    """An empty DVC project (no git), the place a stage runs in."""
    (tmp_path / ".dvc").mkdir()
    return tmp_path


# --- what counts as broken: DVC's own verdict ------------------------------------------------------

def dvc_refuses(tmp_path: Path, data: bytes) -> bool:
    """Whether DVC itself (its Repo, loading dvc.yaml with its lock) refuses this dvc.lock: the
    independent oracle for :func:`lock_problem`."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    root = tmp_path / "oracle"
    if not (root / ".dvc").is_dir():
        Repo.init(str(root), no_scm=True)
        (root / "dvc.yaml").write_text("stages:\n  base:\n    cmd: echo base\n")
    (root / "dvc.lock").write_bytes(data)
    try:
        with Repo(str(root)) as repo:
            repo.status()
    except DvcException:
        return True
    return False


def test_empty_and_cut_locks_are_broken_exactly_where_dvc_refuses_them(tmp_path):
    """Every state a kill can leave (empty, or cut at a buffer flush) is reported, each one DVC
    refuses included; the whole lock, and cuts at a line end DVC accepts, are not."""
    assert lock_problem(DVC_WRITTEN) is None and not dvc_refuses(tmp_path, DVC_WRITTEN)
    assert lock_problem(b"") == "is empty (0 bytes)" and dvc_refuses(tmp_path, b"")
    assert lock_problem(b" \n\n") == "holds only whitespace (3 bytes)"
    assert dvc_refuses(tmp_path, b" \n\n")
    cuts = range(FLUSH, len(DVC_WRITTEN), FLUSH)
    assert len(cuts) >= 3
    for n in cuts:
        problem = lock_problem(DVC_WRITTEN[:n])
        assert problem is not None, n
        if dvc_refuses(tmp_path, DVC_WRITTEN[:n]):
            assert problem.startswith(("is not valid YAML", "is not a valid DVC lock file")), problem
        else:  # DVC would take it and silently drop the stages cut off
            assert problem.startswith("ends mid-line"), problem
    # cut right after a whole stage entry: DVC takes it, and so do we (a kill cannot tell)
    entries = [m.start() for m in re.finditer(rb"^  \S+:\n", DVC_WRITTEN, re.M)]
    whole_first = DVC_WRITTEN[:entries[1]]
    assert not dvc_refuses(tmp_path, whole_first) and lock_problem(whole_first) is None


def test_problem_names_the_line_or_the_key():
    assert lock_problem(b"schema: '2.0'\nstages:\n  base:\n    cmd: [\n") == \
        "is not valid YAML at line 5 (41 bytes)"  # 14 + 8 + 8 + 11 bytes
    assert lock_problem(b"stages: {}\n") == \
        "is not a valid DVC lock file (required key not provided @ data['schema']; 11 bytes)"
    assert lock_problem(b"schema: '2.0'\nstages:\n  base:\n    deps: []\n").startswith(
        "is not a valid DVC lock file (required key not provided @ data['stages']['base']['cmd']")
    assert lock_problem(b"\xff\xfe") == "is not UTF-8 text (byte 0 of 2)"


def test_merge_conflict_is_told_apart_from_a_kill():
    both = tiny_lock("base") + b"<<<<<<< HEAD\n  prepare:\n=======\n  quantize:\n>>>>>>> other\n"
    assert conflict_line(both) == 5 and conflict_line(DVC_WRITTEN) is None
    plan = plan_recovery(both, tiny_lock("base"))
    assert plan == Plan("resolve", "has git merge-conflict markers (line 5)")
    assert "git checkout --theirs dvc.lock" in broken_message(plan)
    assert "interrupted" not in broken_message(plan)


# --- how to recover ------------------------------------------------------------------------------------

def test_plan_prefers_the_last_good_copy_and_falls_back_to_removal():
    good = tiny_lock("base", "prepare")
    assert plan_recovery(None, good) is None  # no lock yet: a first run
    assert plan_recovery(DVC_WRITTEN, good) is None
    assert plan_recovery(b"", good) == Plan("restore", "is empty (0 bytes)", ("base", "prepare"))
    assert plan_recovery(b"", None) == Plan("remove", "is empty (0 bytes)")
    assert plan_recovery(b"", good[:20]) == Plan("remove", "is empty (0 bytes)")  # copy unusable
    assert recorded_stages(DVC_WRITTEN)[:3] == ["base", "prepare", "quantize"]


def test_messages_are_one_paragraph_saying_what_happened_and_what_to_do():
    for plan in (Plan("restore", "is empty (0 bytes)", ("base", "prepare")),
                 Plan("remove", "is empty (0 bytes)")):
        msg = broken_message(plan)
        assert "\n" not in msg
        assert msg.startswith("dvc.lock is empty (0 bytes): DVC was interrupted while writing it.")
        assert "Run `make repro`" in msg and "python -m qlora_diag.core.lockfile --recover" in msg
        assert "Do not restore dvc.lock from git" in msg
    assert "it records 2 stages" in broken_message(Plan("restore", "x", ("base", "prepare")))
    assert "re-runs those it keeps no run-cache entry" in broken_message(Plan("remove", "x"))


def test_recover_puts_the_last_good_copy_back_and_keeps_the_broken_file(tmp_path):
    root = dvc_project(tmp_path)
    (root / LOCK).write_bytes(tiny_lock("base", "prepare", "quantize"))
    assert recover(root) is None  # healthy: nothing to do but keep it as the last good copy
    assert (root / LAST_GOOD).read_bytes() == tiny_lock("base", "prepare", "quantize")
    (root / LOCK).write_bytes(tiny_lock("base", "prepare", "quantize", "train_lora@2")[:40])
    msg = recover(root)
    assert msg.startswith("recovered: dvc.lock ends mid-line (40 bytes; ")
    assert "Put back the last good copy (.dvc/tmp/dvc.lock.last-good" in msg
    assert (root / LOCK).read_bytes() == tiny_lock("base", "prepare", "quantize")
    assert (root / BROKEN_COPY).read_bytes() == tiny_lock("base", "prepare", "quantize", "train_lora@2")[:40]
    assert recover(root) is None


def test_recover_removes_the_lock_when_there_is_no_good_copy(tmp_path):
    root = dvc_project(tmp_path)
    (root / LOCK).write_bytes(b"")
    assert "Removed the broken file" in recover(root)
    assert not (root / LOCK).exists() and (root / BROKEN_COPY).read_bytes() == b""


def test_recover_leaves_a_merge_conflict_to_the_user(tmp_path):
    root = dvc_project(tmp_path)
    conflicted = tiny_lock("base") + b"<<<<<<< HEAD\n"
    (root / LOCK).write_bytes(conflicted)
    with pytest.raises(UserError, match="git merge-conflict markers"):
        recover(root)
    assert (root / LOCK).read_bytes() == conflicted


def test_a_broken_lock_never_replaces_the_last_good_copy(tmp_path):
    root = dvc_project(tmp_path)
    (root / LOCK).write_bytes(tiny_lock("base"))
    assert lockfile.save_last_good(root)
    (root / LOCK).write_bytes(b"")
    assert not lockfile.save_last_good(root)
    assert (root / LAST_GOOD).read_bytes() == tiny_lock("base")
    outside = tmp_path / "not-dvc"
    outside.mkdir()
    (outside / LOCK).write_bytes(tiny_lock("base"))
    assert not lockfile.save_last_good(outside) and not (outside / LAST_GOOD).exists()


# --- at a stage's start and in check-params ---------------------------------------------------------

def test_stage_start_reports_a_broken_lock_before_any_work(tmp_path, monkeypatch, capsys):
    root = dvc_project(tmp_path)
    monkeypatch.chdir(root)
    monkeypatch.delenv("QLORA_DIAG_DEBUG", raising=False)
    (root / LOCK).write_bytes(b"")
    ran = []
    with pytest.raises(SystemExit) as exc:
        run_stage(lambda: ran.append(1))
    assert exc.value.code == 2 and not ran
    err = capsys.readouterr().err
    assert err.startswith("error: dvc.lock is empty (0 bytes): DVC was interrupted while writing it.")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_stage_start_under_dvc_saves_the_lock_dvc_just_wrote(tmp_path, monkeypatch):
    root = dvc_project(tmp_path)
    monkeypatch.chdir(root)
    (root / LOCK).write_bytes(tiny_lock("base", "prepare"))
    monkeypatch.delenv("DVC_STAGE", raising=False)
    run_stage(lambda: None)
    assert not (root / LAST_GOOD).exists()  # run by hand, not by DVC
    monkeypatch.setenv("DVC_STAGE", "quantize")
    run_stage(lambda: None)
    assert (root / LAST_GOOD).read_bytes() == tiny_lock("base", "prepare")


def test_check_params_command_reports_the_broken_lock(tmp_path):
    (tmp_path / "params.yaml").write_bytes((REPO / "params.yaml").read_bytes())
    # the state of the report: emptied (where an 8 KiB cut of the committed lock lands
    # depends on that file's content; the cuts have their own tests above)
    (tmp_path / "dvc.lock").write_bytes(b"")
    p = subprocess.run([sys.executable, "-m", "qlora_diag.check_params", "params.yaml"],
                       cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("error: dvc.lock is empty (0 bytes): "), p.stderr
    assert "DVC was interrupted while writing it" in p.stderr and "Traceback" not in p.stderr
    assert "removes the broken file (there is no usable last good copy)" in p.stderr


def test_lockfile_command_checks_and_recovers(tmp_path):
    """`python -m qlora_diag.core.lockfile` exits 2 with the paragraph; `--recover` (what `make repro`
    runs first) repairs the lock and says so; then both pass."""
    root = dvc_project(tmp_path)
    (root / LAST_GOOD).parent.mkdir(parents=True)
    (root / LAST_GOOD).write_bytes(tiny_lock("base"))
    (root / LOCK).write_bytes(b"")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "qlora_diag.core.lockfile", *args],
                              cwd=root, capture_output=True, text=True)

    p = run()
    assert p.returncode == 2 and p.stderr.startswith("error: dvc.lock is empty (0 bytes)"), p.stderr
    p = run("--recover")
    assert p.returncode == 0 and p.stderr.startswith("recovered: dvc.lock is empty"), p.stderr
    assert (root / LOCK).read_bytes() == tiny_lock("base")
    assert run().returncode == 0 and run("--recover").stderr == ""
    p = run("--fix")
    assert p.returncode == 2 and "unknown arguments --fix" in p.stderr


# --- a real `dvc repro` killed while it writes dvc.lock -----------------------------------------------

def kill_while_writing_the_lock(project: Path, after: str) -> tuple[str, int]:
    """Run `dvc repro` in its own process group and SIGKILL the group the moment dvc.lock is
    empty, in the first lock write after stage ``after`` has started (the one DVC does when it
    finishes). Returns DVC's output and how long the lock had been seen empty (polls)."""
    exe = Path(sys.executable).parent / "dvc"
    out = project.parent / "killed.out"
    lock = project / LOCK
    with open(out, "w") as fo:
        proc = subprocess.Popen([str(exe), "repro"], cwd=project, env=scratch_env(), stdout=fo,
                                stderr=subprocess.STDOUT, start_new_session=True)
    armed, reader = False, open(out)
    seen = ""
    try:
        while proc.poll() is None:
            if not armed:
                seen += reader.read()
                armed = f"Running stage '{after}'" in seen
            elif lock.stat().st_size == 0:
                # the window lasts tens of milliseconds (DVC's first 8 KiB flush), polls ~1 ms
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.001)
        proc.wait()
    finally:
        reader.close()
    return out.read_text(), proc.returncode


@pytest.mark.slow
def test_kill_while_dvc_writes_the_lock_recovers_without_retraining(reference, tmp_path):
    """The window of the issue, hit for real; `make repro` then restores every finished stage
    without running it and completes with the results of the uninterrupted reference run."""
    from test_interruptions import OVERRIDES, assert_stage_matches

    ref_project, _ = reference
    stages = dvc(ref_project, "stage", "list", "--name-only").stdout.split()
    project = make_scratch_project(REPO, tmp_path / "proj", OVERRIDES)
    # the second-last training stage: if its window were missed, the next one still follows a
    # training stage, and the recovery then has only the last training stage, compare and plot
    after = [s for s in stages if s.startswith(TRAINING)][-2]
    out, rc = kill_while_writing_the_lock(project, after)
    assert rc == -signal.SIGKILL, out[-3000:]
    finished = re.findall(r"^Running stage '([^']+)':$", out, re.M)
    assert finished[-1].startswith(TRAINING) and after in finished, finished
    assert (project / LOCK).stat().st_size == 0, "killed outside the window"

    # as in the issue: DVC's own message tells a user nothing
    plain = dvc(project, "repro", check=False)
    assert plain.returncode != 0 and "dvc.lock' validation failed" in plain.stderr, plain.stderr
    # check-params explains it
    p = subprocess.run([sys.executable, "-m", "qlora_diag.check_params", "params.yaml"],
                       cwd=project, env=scratch_env(), capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.startswith("error: dvc.lock is empty (0 bytes): DVC was interrupted while "
                               "writing it."), p.stderr
    # the copy saved when the interrupted stage started records every stage before it
    assert set(recorded_stages((project / LAST_GOOD).read_bytes())) == set(finished[:-1])

    # `make repro`, the Makefile's own recipe, with this interpreter's venv (-o: no reinstall)
    venv = Path(sys.executable).parent.parent
    assert (venv / "bin/activate").is_file(), f"run the tests with the project's venv: {venv}"
    t0 = time.perf_counter()
    make = subprocess.run(["make", "--no-print-directory", "-f", str(REPO / "Makefile"), "-C",
                           str(project), "repro", f"VENV={venv}", "-o", f"{venv}/.installed"],
                          env=scratch_env(), capture_output=True, text=True)
    took = time.perf_counter() - t0
    assert make.returncode == 0, make.stdout[-3000:] + make.stderr[-3000:]
    assert "recovered: dvc.lock is empty (0 bytes): DVC was interrupted while writing it" in make.stderr
    log = make.stdout
    ran = re.findall(r"^Running stage '([^']+)':$", log, re.M)
    assert not set(ran) & set(finished), f"re-ran finished stages {set(ran) & set(finished)}"
    assert sorted(ran) == sorted(set(stages) - set(finished)), ran
    for s in finished[:-1]:
        assert f"Stage '{s}' didn't change, skipping" in log, s
    assert f"Stage '{finished[-1]}' is cached - skipping run, checking out outputs" in log
    print(f"\nkilled after {finished[-1]} ({len(finished)} stages finished); make repro re-ran "
          f"{len(ran)} stage(s) {ran} in {took:.0f} s")

    assert "up to date" in dvc(project, "status").stdout
    for s in stages:
        assert_stage_matches(s, project, ref_project)
