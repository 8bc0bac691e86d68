"""A ``dvc.lock`` emptied by a kill while DVC wrote it: detect it, explain it, recover without
retraining.

After every stage DVC rewrites ``dvc.lock`` in place: it opens the file for writing (which
empties it) and dumps the whole lock as YAML (``_modify_data`` in dvc/utils/serialize/_common.py).
The file stays empty until the first 8 KiB buffer is flushed, tens of milliseconds, and is cut
off until the dump ends, ~0.1 s per stage on the default pipeline. A SIGKILL in that window
(preemption, the OOM killer, a lost session) leaves it empty or cut off, and the next
`dvc repro` stops with "'./dvc.lock' validation failed" before running anything.

Recovery: every stage, when DVC starts it, saves the lock as DVC has just written it (whole: DVC
runs one stage at a time and writes the lock between stages) to :data:`LAST_GOOD`, atomically and
outside DVC's outputs. Putting it back lets DVC skip every stage it records; a stage that finished
after it (the one whose write was killed) is restored from DVC's run-cache. Removing the broken
file instead makes DVC look up *every* stage in the run-cache, and DVC keeps no run-cache entry for
a stage with a ``cache: false`` entry in its ``outs`` (``no_cache_outs`` in dvc/stage/__init__.py:
here quantize, compare and plot), so those run again. Measured on the tiny configuration of the
tests (AMD EPYC, 2 cores shared with other jobs): `dvc repro` SIGKILLed while the lock was empty
after modules_lora@kv (10 of 13 stages finished), then `dvc repro` on two copies: with the last
good copy 9 stages were unchanged, 1 came from the run-cache and no finished stage ran again
(99 s, the 3 unfinished stages); with the lock removed 9 came from the run-cache and quantize ran
again (116 s). Emptied after the last stage: the copy re-ran plot alone (19 s), removal re-ran
quantize, compare and plot (108 s). Removal is the fallback when there is no usable copy.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from qlora_diag.core.errors import UserError

LOCK = Path("dvc.lock")
# .dvc/tmp is DVC's own git-ignored scratch directory: no stage writes there and `dvc gc` does not
# touch it, so the copy survives whatever a run does to the workspace.
LAST_GOOD = Path(".dvc/tmp/dvc.lock.last-good")
BROKEN_COPY = Path(".dvc/tmp/dvc.lock.broken")
RECOVER_CMD = "python -m qlora_diag.core.lockfile --recover"

_CONFLICT_MARKERS = ("<<<<<<< ", "=======", ">>>>>>> ")


def lock_problem(data: bytes) -> str | None:
    """What is wrong with the content of a ``dvc.lock``, as the end of a sentence starting with
    the file name; None when DVC accepts it.

    The verdict is DVC's own: its YAML parser and lock-file schema. One rule
    is added: DVC ends every lock it writes with a newline, so a file that ends mid-line was cut
    off by a kill after the first buffer reached the disk, even where the part written still
    happens to parse (e.g. cut inside a hash).
    """
    if not data:
        return "is empty (0 bytes)"
    if not data.strip():
        return f"holds only whitespace ({len(data)} bytes)"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"is not UTF-8 text (byte {exc.start} of {len(data)})"
    from dvc.schema import COMPILED_LOCKFILE_SCHEMA
    from dvc.utils.serialize import YAMLFileCorruptedError, parse_yaml
    from voluptuous import MultipleInvalid

    # What DVC's Lockfile loading does (dvc/utils/strictyaml.py ``load``): parse, then validate.
    try:
        parsed = parse_yaml(text, str(LOCK), typ="safe")
    except YAMLFileCorruptedError as exc:
        mark = getattr(exc.__cause__, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        return f"is not valid YAML{where} ({len(data)} bytes)"
    try:
        COMPILED_LOCKFILE_SCHEMA(parsed)
    except MultipleInvalid as exc:
        return f"is not a valid DVC lock file ({'; '.join(map(str, exc.errors))}; {len(data)} bytes)"
    if not text.endswith("\n"):
        return f"ends mid-line ({len(data)} bytes; DVC ends every lock it writes with a newline)"
    return None


def conflict_line(data: bytes) -> int | None:
    """1-based line of the first git merge-conflict marker, or None: a lock with conflict markers
    is broken by a merge, not by a kill, and needs another remedy."""
    for i, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if line.startswith(_CONFLICT_MARKERS):
            return i
    return None


def recorded_stages(data: bytes) -> list[str]:
    """The stage names a healthy lock records, in file order."""
    import yaml

    return list((yaml.safe_load(data) or {}).get("stages") or {})


@dataclass(frozen=True)
class Plan:
    """How to get back from a broken lock. ``action``: "restore" (put the last good copy back),
    "remove" (delete the broken file; DVC's run-cache restores what it can), "resolve" (a merge
    conflict: the user chooses a side)."""

    action: str
    problem: str
    stages: tuple[str, ...] = ()  # what the last good copy records, for "restore"


def plan_recovery(lock: bytes | None, last_good: bytes | None) -> Plan | None:
    """None when there is nothing to recover (no lock yet, or a healthy one). A last good copy is
    used only if it is itself healthy; restoring it never re-runs more than removing the lock
    would, since a stage missing from it gets the run-cache lookup that removal gives every stage,
    and every pairing of inputs and outputs in it was written by DVC."""
    if lock is None or (problem := lock_problem(lock)) is None:
        return None
    if (line := conflict_line(lock)) is not None:
        return Plan("resolve", f"has git merge-conflict markers (line {line})")
    if last_good is not None and lock_problem(last_good) is None:
        return Plan("restore", problem, tuple(recorded_stages(last_good)))
    return Plan("remove", problem)


def _stages(n: int) -> str:
    return f"{n} stage{'s' if n != 1 else ''}"


def _recovery(plan: Plan) -> tuple[str, str, str]:
    """(what the recovery will do, the same done, what `dvc repro` does next)."""
    if plan.action == "restore":
        copy = (f"the last good copy ({LAST_GOOD}, saved when the last stage started; it records "
                f"{_stages(len(plan.stages))})")
        return (f"puts back {copy}", f"Put back {copy}",
                "`dvc repro` skips those, restores the stage that finished after that copy from "
                "its run-cache ('is cached - skipping run') and runs only what is left")
    return ("removes the broken file (there is no usable last good copy)",
            "Removed the broken file (there is no usable last good copy)",
            "`dvc repro` restores every finished stage that is in its run-cache, training stages "
            "included ('is cached - skipping run'), and re-runs those it keeps no run-cache entry "
            "for (a `cache: false` entry in their outs: here quantize, compare and plot)")


def broken_message(plan: Plan) -> str:
    """The one paragraph shown by check-params and at a stage's start."""
    if plan.action == "resolve":
        return (f"{LOCK} {plan.problem}: a git merge left both sides in it. Keep one side, e.g. "
                f"`git checkout --theirs {LOCK}` (or `--ours`), then run `dvc repro`: DVC re-runs, or "
                "restores from its run-cache, the stages whose recorded outputs differ from this "
                "workspace")
    does, _, then = _recovery(plan)
    return (f"{LOCK} {plan.problem}: DVC was interrupted while writing it. After every stage DVC "
            f"empties {LOCK} and rewrites it in place, and a kill in that moment (kill -9, the OOM "
            "killer, a preempted job, a lost session) leaves it like this; the outputs of finished "
            f"stages are intact. Run `make repro`: it {does}, then {then}; nothing already trained "
            f"is trained again (by hand: `{RECOVER_CMD}`, then `dvc repro`). Do not restore {LOCK} "
            "from git instead: the committed file records the outputs of the last commit, not of "
            "this workspace")


def recovered_message(plan: Plan) -> str:
    """The paragraph `make repro` prints after recovering."""
    _, done, then = _recovery(plan)
    return (f"recovered: {LOCK} {plan.problem}: DVC was interrupted while writing it (a kill "
            f"while it rewrote the file after a stage; the broken file is kept as {BROKEN_COPY}). "
            f"{done}: {then}.")


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def check(root: Path = Path(".")) -> None:
    """Raise a :class:`UserError` explaining what to do if ``root/dvc.lock`` is broken."""
    lock = _read(root / LOCK)
    if lock is None:
        return
    plan = plan_recovery(lock, _read(root / LAST_GOOD))
    if plan is not None:
        raise UserError(broken_message(plan))


def save_last_good(root: Path = Path(".")) -> bool:
    """Copy a healthy ``root/dvc.lock`` to ``root/LAST_GOOD`` atomically (a kill mid-copy leaves
    the previous copy); True if copied. A missing or broken lock never replaces the copy."""
    from qlora_diag.core.atomic import atomic_file

    lock = _read(root / LOCK)
    if lock is None or not (root / ".dvc").is_dir() or lock_problem(lock) is not None:
        return False
    with atomic_file(root / LAST_GOOD, "wb") as fh:
        fh.write(lock)
    return True


def at_stage_start(root: Path = Path(".")) -> None:
    """Called first by every stage script (:func:`qlora_diag.core.cli.run_stage`): a broken lock is a
    clear error; under `dvc repro` (DVC sets ``DVC_STAGE`` for each stage command) the lock DVC
    has just written is saved as the last good copy. The working directory is the project's
    root (``DVC_ROOT`` would name the parent repository in a queued experiment's workspace)."""
    check(root)
    if os.environ.get("DVC_STAGE"):
        save_last_good(root)


def recover(root: Path = Path(".")) -> str | None:
    """Recover a broken ``root/dvc.lock`` as :func:`plan_recovery` says and return the message;
    None if it was healthy or missing (a healthy one is then saved as the last good copy). A
    merge conflict is not touched: it raises a :class:`UserError`."""
    from qlora_diag.core.atomic import atomic_file

    lock, good = _read(root / LOCK), _read(root / LAST_GOOD)
    plan = plan_recovery(lock, good)
    if plan is None:
        save_last_good(root)
        return None
    if plan.action == "resolve":
        raise UserError(broken_message(plan))
    with atomic_file(root / BROKEN_COPY, "wb") as fh:
        fh.write(lock)
    if plan.action == "restore":
        with atomic_file(root / LOCK, "wb") as fh:
            fh.write(good)
    else:
        (root / LOCK).unlink()
    return recovered_message(plan)


def main(argv: list[str]) -> None:
    """``python -m qlora_diag.core.lockfile [--recover]``: check dvc.lock (exit 2 with what to do if it
    is broken), or with --recover repair it as `make repro` does before `dvc repro`."""
    if argv not in ([], ["--recover"]):
        raise UserError(f"unknown arguments {' '.join(argv)}; usage: python -m qlora_diag.core.lockfile "
                        "[--recover]")
    if argv:
        message = recover()
        if message:
            print(message, file=sys.stderr)
    else:
        check()
        print(f"{LOCK}: ok")


if __name__ == "__main__":
    from qlora_diag.core.cli import run_stage

    # check_lock=False: a broken lock is what --recover is for.
    run_stage(lambda: main(sys.argv[1:]), check_lock=False)
