"""Resuming an interrupted training run: checkpoints, their fingerprint, the dvclive directory.

Checkpoints live in ``models/checkpoints/<run>`` (outside DVC's outs, which DVC deletes before a
stage runs), so an interrupted ``dvc repro`` resumes from the newest *complete* checkpoint. A
fingerprint of everything the result depends on guards against resuming a checkpoint of other
params or data; the run's dvclive directory is repaired to the checkpoint's step before the
resumed run appends to it.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from qlora_diag.core.atomic import write_json, write_text

# What transformers' Trainer writes into a checkpoint of a PEFT model; all present = complete.
CHECKPOINT_FILES = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json")
FINGERPRINT_FILE = "fingerprint.txt"


def latest_complete_checkpoint(folder: Path) -> Path | None:
    """Newest ``checkpoint-N`` holding every file and a parseable trainer state; partial ones
    (a kill during saving) are deleted so they are never resumed from."""
    if not folder.is_dir():
        return None
    found = sorted((p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for ckpt in found:
        if checkpoint_step(ckpt) is not None:
            return ckpt
        shutil.rmtree(ckpt, ignore_errors=True)
    return None


def checkpoint_step(ckpt: Path) -> int | None:
    """The step a checkpoint holds, or None unless it is complete: every file written and a
    parseable trainer state past step 0. Reads only, so it may watch a running stage."""
    try:
        if not all((ckpt / f).is_file() for f in CHECKPOINT_FILES):
            return None
        step = json.loads((ckpt / "trainer_state.json").read_text())["global_step"]
    except (json.JSONDecodeError, KeyError, OSError):
        return None
    return step if step > 0 else None


def step_of(ckpt: Path | None) -> int:
    """The step in a checkpoint's name (``checkpoint-4`` -> 4); 0 for no checkpoint."""
    return int(ckpt.name.split("-")[-1]) if ckpt else 0


def fingerprint(*parts) -> str:
    """Hash of everything a run's result depends on, to never resume a stale checkpoint."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    """Content hash of one file (the training split)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def dir_digest(folder: Path) -> str:
    """Cheap identity of a model directory: names, sizes and mtimes of its files."""
    items = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime))
                   for p in folder.iterdir() if p.is_file())
    return fingerprint(items)


def open_checkpoint_dir(ckpt_dir: Path, fp: str) -> Path | None:
    """Make ``ckpt_dir`` the checkpoint directory of the run fingerprinted ``fp`` and return the
    checkpoint to resume from (None: start from step 0). Checkpoints written under another
    fingerprint (other params or data) are deleted, never resumed."""
    fp_file = ckpt_dir / FINGERPRINT_FILE
    if ckpt_dir.exists() and (not fp_file.is_file() or fp_file.read_text() != fp):
        shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    fp_file.write_text(fp)
    return latest_complete_checkpoint(ckpt_dir)


def restore_live_dir(live_dir: Path, step: int) -> None:
    """Make a run's dvclive directory consistent with the checkpoint at ``step`` before resuming.

    A SIGKILL can land between the checkpoint and the kill (rows of later steps) or in the middle
    of one of dvclive's plain, non-atomic writes: a curve's last row half-written, the summary
    ``metrics.json`` or ``params.yaml`` truncated. Each curve keeps its header and its complete,
    well-formed rows up to ``step`` (each step once); the summary is rebuilt from those rows;
    an unreadable ``params.yaml`` is dropped (the resumed run logs its params again). Every
    rewrite is atomic, so a second kill during the repair leaves a consistent directory too.
    """
    import yaml

    metrics_root = live_dir / "plots" / "metrics"
    summary: dict = {}
    for tsv in sorted(metrics_root.glob("**/*.tsv")):
        head, rows = _complete_rows(tsv.read_text(encoding="utf-8", errors="replace"), step)
        if head is None:
            tsv.unlink()
            continue
        write_text(tsv, "".join(f"{line}\n" for line in [head, *rows]))
        if rows:
            node = summary
            *parents, leaf = tsv.relative_to(metrics_root).with_suffix("").parts
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = float(rows[-1].split("\t")[head.split("\t").index(leaf)])
    summary["step"] = step
    write_json(live_dir / "metrics.json", summary)
    params = live_dir / "params.yaml"
    if params.exists():
        try:
            ok = isinstance(yaml.safe_load(params.read_text(encoding="utf-8")), dict)
        except (yaml.YAMLError, UnicodeDecodeError):
            ok = False
        if not ok:
            params.unlink()


def _complete_rows(text: str, step: int) -> tuple[str | None, list[str]]:
    """Header and the well-formed rows of a dvclive curve with ``step`` <= ``step``, each step
    once (the first occurrence); a last line without its newline was cut by a kill and is
    dropped. ``(None, [])`` when not even the header is complete."""
    lines = text.split("\n")[:-1]  # whatever follows the last newline is a torn row
    if not lines or "step" not in lines[0].split("\t"):
        return None, []
    head, cols = lines[0], lines[0].split("\t")
    rows, seen = [], set()
    for line in lines[1:]:
        fields = line.split("\t")
        if len(fields) != len(cols):
            continue
        try:
            row_step = int(fields[cols.index("step")])
            for value in fields:
                float(value)  # a number cut short by the kill fails here
        except ValueError:
            continue
        if row_step <= step and row_step not in seen:
            seen.add(row_step)
            rows.append(line)
    return head, rows
