"""Paired seeds per minute: what a LoRA+QLoRA pair of one seed costs at the headline setting,
everything included (process start, imports, loading, training, evaluation, generation,
saving), one run per process (the layout before multi-run stages) against all seeds of a method
in one process (:mod:`qlora_diag.train.multi_run`, the training stages now).

Both paths run ``stages/train.py`` of this repository as subprocesses in a scratch directory
without DVC (the pipeline's models and prepared data linked in, the repository's params.yaml
copied): one run per process is ``--seeds s`` once per seed and method, the new path
``--seeds s1,...,sK`` once per method. Each process is timed from its start to its exit. The
order is lora-old, lora-new, qlora-new, qlora-old (ABBA), so a drift in machine load hits both
paths alike; other processes on the machine still inflate both (the load average is recorded).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qlora_diag.core.errors import UserError
from qlora_diag.core.machine import cpu_flags, cpu_model, load_average

OLD, NEW = "one_run_per_process", "seeds_per_process"
# The repository whose stages/train.py is timed: the one this code belongs to.
CODE_ROOT = Path(__file__).resolve().parents[3]


def _scratch(base_dir: Path, quant_dir: Path, data_dir: Path,
             params_file: Path) -> Path:
    work = Path(tempfile.mkdtemp(prefix="qlora-bench-paired-"))
    for rel, src in (("models/base", base_dir), ("models/quantized", quant_dir),
                     ("data/prepared", data_dir)):
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).symlink_to(Path(src).resolve(), target_is_directory=True)
    shutil.copy2(params_file, work / "params.yaml")
    # compare.max_new_tokens as prepare resolved it, beside the prepared data (data/resolved.json)
    resolved = Path(data_dir).parent / "resolved.json"
    if resolved.exists():
        shutil.copy2(resolved, work / "data" / "resolved.json")
    return work


PARTS = ("train_steps_s", "eval_s", "generation_s")


def _train(work: Path, method: str, rank: int, targets: str,
           seeds: list[int]) -> tuple[float, dict[str, float]]:
    """(wall seconds of one ``stages/train.py`` process, start to exit; the seconds its runs
    spent in optimizer steps, evaluation and generation, summed from their run.json)."""
    env = {**os.environ, "PYTHONPATH": str(CODE_ROOT), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(CODE_ROOT / "stages/train.py"), "--method", method,
           "--rank", str(rank), "--targets", targets, "--seeds", ",".join(map(str, seeds))]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise UserError(f"bench: `{' '.join(cmd[1:])}` failed (exit {proc.returncode}) in "
                        f"{work}:\n{proc.stderr[-2000:]}")
    runs = [json.loads(f.read_text()) for f in (work / "reports/train").glob("*/run.json")]
    parts = {k: sum(r[k] for r in runs) for k in PARTS}
    for out in ("models/adapters", "reports/train"):
        shutil.rmtree(work / out, ignore_errors=True)
    return wall, parts


def bench_paired_seeds(*, base_dir: Path, quant_dir: Path, data_dir: Path,
                       params_file: Path, rank: int, targets: str, seeds: list[int],
                       threads: int, log=print) -> dict:
    """Time K = len(seeds) paired seeds both ways; returns walls, paired seeds per minute (and
    per CPU-minute: per minute divided by ``threads``, the cores each process computes on; the
    processes run one after another) and the speedup new / old."""
    work = _scratch(base_dir, quant_dir, data_dir, params_file)
    walls: dict[str, dict[str, list[float]]] = {OLD: {}, NEW: {}}
    parts = {p: dict.fromkeys(PARTS, 0.0) for p in walls}
    load_start = load_average()
    try:
        for method, first, second in (("lora", OLD, NEW), ("qlora", NEW, OLD)):
            for path in (first, second):
                log(f"bench: paired seeds, {method} {path.replace('_', ' ')} "
                    f"({len(seeds)} seeds)", flush=True)
                groups = [[s] for s in seeds] if path == OLD else [list(seeds)]
                walls[path][method] = []
                for group in groups:
                    wall, spent = _train(work, method, rank, targets, group)
                    walls[path][method].append(wall)
                    for k in PARTS:
                        parts[path][k] += spent[k]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total = {p: sum(sum(w) for w in walls[p].values()) for p in walls}
    per_min = {p: 60.0 * len(seeds) / total[p] for p in walls}
    return {
        "paired_seeds_per_minute": per_min[NEW],
        "paired_seeds_per_cpu_minute": per_min[NEW] / threads,
        "paired_seeds_per_minute_one_run_per_process": per_min[OLD],
        "paired_seeds_speedup": per_min[NEW] / per_min[OLD],
        "paired_seeds_wall_s": total,
        "paired_seeds_process_walls_s": walls,
        # where the processes' time went (summed over their runs' run.json), and the speedup
        # of a path that spent nothing but the new path's optimizer steps: no layout of the
        # same steps at the same speed per step can beat it
        "paired_seeds_time_parts_s": {p: {**parts[p], "other_s": total[p] - sum(parts[p].values())}
                                      for p in walls},
        "paired_seeds_speedup_ceiling_steps_only": total[OLD] / parts[NEW]["train_steps_s"],
        "paired_seeds_config": {"rank": rank, "targets": targets, "seeds": list(seeds),
                                "threads_per_process": threads, "cpu_model": cpu_model(),
                                "cpu_cores": os.cpu_count(),
                                "cpu_bf16_flags": sorted({"avx512_bf16", "amx_bf16"} & cpu_flags()),
                                "loadavg_start": load_start, "loadavg_end": load_average()},
        "paired_seeds_notes": (
            "wall time of stages/train.py processes from start to exit (imports, model load, "
            "training, evaluation, generation, saving), one after another on this machine; "
            f"{OLD}: one process per seed and method, {NEW}: one process per method training "
            "all seeds over one loaded base. paired_seeds_per_minute = seeds / total wall "
            "minutes of the new path's LoRA and QLoRA processes; paired_seeds_per_cpu_minute = "
            "that divided by the torch threads of a process (the cores it computes on); "
            "paired_seeds_speedup = new / one-run-per-process. paired_seeds_time_parts_s: the "
            "seconds the runs of each path spent in optimizer steps, evaluations (curve and "
            "final) and greedy generation (their run.json), other_s the rest of the processes' "
            "wall (imports, loading, set-up, saving); paired_seeds_speedup_ceiling_steps_only = "
            "one-run-per-process wall / the new path's optimizer-step seconds, the speedup of a "
            "path that did nothing but those steps at the same speed per step."),
    }
