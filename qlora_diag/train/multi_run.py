"""Several training runs in one process over one loaded base: imports, data and model load once.

A training stage trains every seed of one (method, rank, targets) setting in one process. Each
run is exactly the run :func:`~qlora_diag.train.trainer.train_adapter` would train alone: a fresh
adapter is attached to the loaded base with the run's seed (``attach_lora`` seeds every RNG), a
fresh ``Trainer`` trains it, and ``unload()`` takes the adapter off again, leaving the base's own
modules (whose weights training never changes: they are frozen) for the next run. The equality
is tested in fp32 (tests/test_multi_run.py).

Resume after a kill: DVC deletes a stage's outputs before it runs the stage again, so the runs a
killed group had finished would be lost with them. Each finished run's adapter and report
directory are therefore also copied to ``<checkpoint_root>/<run>.finished`` (with the run's
fingerprint, generation settings included); a rerun of the group copies a matching copy back
instead of training that run again, and resumes the interrupted run from its checkpoint. The
copies are removed when the whole group has finished.
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

from qlora_diag.core.atomic import atomic_dir
from qlora_diag.core.config import LoraCfg, TrainCfg
from qlora_diag.core.machine import choose_device
from qlora_diag.train.checkpoints import fingerprint
from qlora_diag.train.trainer import (
    GenerationCfg,
    RunSpec,
    load_run_inputs,
    load_training_base,
    run_fingerprint,
    train_on_base,
)

FINISHED_SUFFIX = ".finished"
FINISHED_FP = "fingerprint.txt"


def _copy_dir(src: Path, dst: Path) -> None:
    """Replace ``dst`` by a copy of ``src`` (atomically: a kill leaves no half)."""
    with atomic_dir(dst) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)


def _stash(finished: Path, fp: str, adapter_out: Path, report_dir: Path) -> None:
    with atomic_dir(finished) as tmp:
        shutil.copytree(adapter_out, tmp / "adapter")
        shutil.copytree(report_dir, tmp / "report")
        (tmp / FINISHED_FP).write_text(fp)


def _restore(finished: Path, fp: str, adapter_out: Path, report_dir: Path) -> bool:
    """Copy a finished run's outputs back if ``finished`` holds them under fingerprint ``fp``."""
    fp_file = finished / FINISHED_FP
    if not fp_file.is_file() or fp_file.read_text() != fp:
        shutil.rmtree(finished, ignore_errors=True)
        return False
    _copy_dir(finished / "adapter", adapter_out)
    _copy_dir(finished / "report", report_dir)
    return True


def check_group(specs: list[RunSpec]) -> None:
    """One group = runs of one method (one base) with distinct names."""
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"train_group: duplicate runs in {names}")
    if len({s.method for s in specs}) > 1:
        raise ValueError(f"train_group: runs of one method only, got {names}")


def train_group(specs: list[RunSpec], *, base_dir: Path, quant_dir: Path, data_dir: Path,
                base_dtype: str, compute_dtype: str, lora: LoraCfg, train: TrainCfg,
                gen: GenerationCfg, adapters_root: Path, reports_root: Path,
                checkpoint_root: Path, on_run=None) -> list[dict]:
    """Train ``specs`` (one method) in order over one loaded base; each run writes
    ``adapters_root/<run>`` and ``reports_root/<run>`` as a run alone would. Returns the
    metrics of the runs trained here (runs restored from a finished copy have none);
    ``on_run(metrics)`` is called after each trained run."""
    check_group(specs)
    if not specs:
        return []
    t_start = time.perf_counter()
    device = choose_device()
    inputs = load_run_inputs(base_dir=base_dir, data_dir=data_dir, gen=gen)
    method = specs[0].method
    trained_on = quant_dir if method == "qlora" else base_dir
    model = None
    done: list[dict] = []
    for spec in specs:
        adapter_out, report_dir = adapters_root / spec.name, reports_root / spec.name
        finished = checkpoint_root / f"{spec.name}{FINISHED_SUFFIX}"
        fp = fingerprint(run_fingerprint(spec, lora, train, inputs, trained_on),
                         dataclasses.asdict(gen))
        if _restore(finished, fp, adapter_out, report_dir):
            print(f"{spec.name}: finished before an interruption; outputs restored from "
                  f"{finished}", flush=True)
            continue
        if model is None:
            model = load_training_base(method, base_dir=base_dir, quant_dir=quant_dir,
                                       base_dtype=base_dtype, compute_dtype=compute_dtype,
                                       kbit_prep=train.kbit_prep, device=device)
        metrics, peft_model = train_on_base(
            spec, model, inputs, trained_on=trained_on, device=device, base_dtype=base_dtype,
            compute_dtype=compute_dtype, lora=lora, train=train, gen=gen,
            adapter_out=adapter_out, report_dir=report_dir, checkpoint_root=checkpoint_root,
            t_start=t_start)
        _stash(finished, fp, adapter_out, report_dir)
        shutil.rmtree(checkpoint_root / spec.name, ignore_errors=True)
        model = peft_model.unload()  # the base without the adapter, for the next run
        del peft_model
        done.append(metrics)
        if on_run is not None:
            on_run(metrics)
        t_start = time.perf_counter()  # a later run's wall_s excludes the shared loading
    for spec in specs:
        shutil.rmtree(checkpoint_root / f"{spec.name}{FINISHED_SUFFIX}", ignore_errors=True)
    return done
