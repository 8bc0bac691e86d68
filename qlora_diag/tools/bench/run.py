"""The benchmark run: every measurement, ``reports/bench.json`` and the stdout table."""
from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

from qlora_diag.core.atomic import write_json
from qlora_diag.core.config import BenchCfg, LoraCfg, TrainCfg
from qlora_diag.core.errors import UserError
from qlora_diag.core.machine import choose_device, load_average
from qlora_diag.tools.bench.batched import bench_batched_rows
from qlora_diag.tools.bench.generation import bench_generation
from qlora_diag.tools.bench.matmul import MATMUL_SHAPE, machine_facts
from qlora_diag.tools.bench.measures import GOALS, TRAIN_RATIO_AIM, goal_status
from qlora_diag.tools.bench.memory import memory_in_subprocess
from qlora_diag.tools.bench.paired import bench_paired_seeds
from qlora_diag.tools.bench.repro import time_noop_repro
from qlora_diag.tools.bench.training import TrainSetup, bench_training
from qlora_diag.train.trainer import METHODS, GenerationCfg

BATCHED_NOTES = (
    "the ceiling of training K = len(paired_seeds_config.seeds) adapters in one batch (one per "
    "seed, rows routed to their adapter): per-example time of one training step (forward + "
    "backward, response-only loss, one LoRA adapter) on a bench.batch_size batch over the same "
    "batch repeated K times (equal padding, prefix sharing off in both), median over rounds "
    "of the per-round ratio; batched_rows_speedup_* near 1 = the base's matmuls gain nothing "
    "from K x the rows on this machine, so a K-adapter path cannot beat training the seeds "
    "one after another here")

# The two training paths of every method (:mod:`qlora_diag.tools.bench.training`).
PATHS = ("project", "reference")


def check_inputs(base_dir: Path, quant_dir: Path, data_dir: Path) -> None:
    """The benchmark runs on the pipeline's own base, 4-bit model and prepared data."""
    need = [base_dir / "config.json", quant_dir / "config.json", data_dir / "train.jsonl",
            data_dir / "eval.jsonl"]
    missing = [str(p) for p in need if not p.is_file()]
    if missing:
        raise UserError(f"the benchmark needs the pipeline's models and data, and "
                        f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing: "
                        "run `dvc repro quantize prepare` first")


def run_bench(*, base_dir: Path, quant_dir: Path, data_dir: Path, base_dtype: str,
              compute_dtype: str, lora: LoraCfg, train: TrainCfg, bench: BenchCfg,
              gen_max_new_tokens: int, gen_batch_size: int, seed: int, repo_dir: Path,
              out_path: Path, paired_seeds: list[int], params_file: Path, threads: int,
              paired_only: bool = False, log=print) -> dict:
    """Run every measurement, write ``out_path`` (JSON, atomically) and return it.

    The rank is ``bench.rank``, the batch ``bench.batch_size`` and each path trains
    ``bench.warmup_steps + bench.steps`` steps; everything else of the training path (lr,
    scheduler, clipping, optimizer, targets, dropout, length grouping) is the run's ``lora`` and
    ``train``. Generation uses ``bench.gen_examples`` eval prompts and the run's decoding knobs.
    Paired seeds per minute (:mod:`.paired`) time whole ``stages/train.py`` processes at the
    headline setting (``lora``, ``train`` and ``params_file`` as they are) for ``paired_seeds``.
    ``paired_only``: only that measurement, merged into an existing ``out_path`` (its machine is
    in ``paired_seeds_config``, the other numbers keep theirs in ``machine``).
    """
    t_start = time.perf_counter()
    check_inputs(base_dir, quant_dir, data_dir)
    device = choose_device()
    setup = TrainSetup(
        base_dir=str(base_dir), quant_dir=str(quant_dir), data_dir=str(data_dir),
        base_dtype=base_dtype, compute_dtype=compute_dtype,
        lora=dataclasses.replace(lora, r=bench.rank),
        train=dataclasses.replace(train, batch_size=bench.batch_size,
                                  max_steps=bench.warmup_steps + bench.steps),
        seed=seed)
    log(f"bench: paired seeds per minute, {len(paired_seeds)} seeds, both ways", flush=True)
    paired = bench_paired_seeds(base_dir=base_dir, quant_dir=quant_dir,
                                data_dir=data_dir, params_file=params_file, rank=lora.r,
                                targets=lora.targets, seeds=paired_seeds, threads=threads,
                                log=log)
    batched = bench_batched_rows(setup, len(paired_seeds), bench.warmup_steps, device, log=log)
    paired.update({f"batched_rows_speedup_{m}": batched["methods"][m]["speedup_per_example"]
                   for m in METHODS})
    paired["batched_rows"] = {**batched, "notes": BATCHED_NOTES}
    if paired_only:
        import json

        result = json.loads(out_path.read_text()) if out_path.is_file() else {}
        result.update(paired)
        result["goals"] = {**result.get("goals", {}), "paired_seeds_speedup": goal_status(
            paired["paired_seeds_speedup"], *GOALS["paired_seeds_speedup"])}
        write_json(out_path, result)
        return result
    load_start = load_average()

    log("bench: machine facts and matmul rates", flush=True)
    machine = machine_facts(device, base_dtype, compute_dtype)
    memory = {}
    for method in METHODS:
        log(f"bench: peak memory of {method} training (a fresh process)", flush=True)
        memory[method] = memory_in_subprocess(setup, method)
    log("bench: training throughput, 4 paths interleaved step by step", flush=True)
    training = bench_training(setup, bench.warmup_steps, device, log=log)
    log("bench: generation, batched vs one at a time", flush=True)
    generation = bench_generation(setup, GenerationCfg(n_generate=bench.gen_examples,
                                                       max_new_tokens=gen_max_new_tokens,
                                                       batch_size=gen_batch_size), device)
    log("bench: no-op dvc repro", flush=True)
    noop = time_noop_repro(repo_dir)

    result = {
        "train_throughput_ratio_lora": training["lora"]["throughput_ratio"],
        "train_throughput_ratio_qlora": training["qlora"]["throughput_ratio"],
        "qlora_lora_step_time_ratio": training["qlora_lora_step_time_ratio"],
        "qlora_lora_peak_mem_ratio": memory["qlora"]["peak_mb"] / memory["lora"]["peak_mb"],
        "qlora_lora_peak_growth_ratio":
            memory["qlora"]["peak_growth_mb"] / memory["lora"]["peak_growth_mb"],
        "qlora_lora_weights_ratio": memory["qlora"]["weights_mb"] / memory["lora"]["weights_mb"],
        "generation_speedup": generation["speedup"],
        "generation_outputs_identical": generation["outputs_identical"],
        "noop_repro_s": noop["noop_repro_s"],
        **paired,
        **{f"train_roofline_fraction_{m}": training[m]["roofline_fraction_project"]
           for m in METHODS},
        **{f"train_roofline_fraction_{m}_reference": training[m]["roofline_fraction_reference"]
           for m in METHODS},
        **{f"tokens_per_s_{m}_{p}": training[m][f"tokens_per_s_{p}"]
           for m in METHODS for p in PATHS},
        **{f"peak_mem_mb_{m}": memory[m]["peak_mb"] for m in METHODS},
        **{f"peak_mem_growth_mb_{m}": memory[m]["peak_growth_mb"] for m in METHODS},
        **{f"weights_mb_{m}": memory[m]["weights_mb"] for m in METHODS},
        "memory_measure": memory["lora"]["measure"],
        "memory_notes": {
            "peak_mem_mb": "whole-process peak during training: " + memory["lora"]["measure"] +
                           "; includes the Python/torch runtime (rss_baseline_mb), the weights, "
                           "activations, gradients, optimizer state and allocator caches",
            "peak_mem_growth_mb": "peak_mem_mb minus memory when training started (model loaded "
                                  "and its memory-mapped weights paged in, Trainer built): "
                                  "activations, adapter gradients, optimizer state, temporary "
                                  "dequantized weights, allocator caches",
            "weights_mb": "model parameters and buffers as held in memory "
                          "(get_memory_footprint); bitsandbytes' absmax constants are not "
                          "parameters and are not included",
        },
        "roofline_notes": (
            "tokens/s x flops_per_token (4 x matmul parameters N of the frozen base: 2N forward "
            "+ 2N input gradients, no weight gradients) / the rate of an nn.Linear matmul of "
            f"shape {MATMUL_SHAPE[0]}x{MATMUL_SHAPE[1]}x{MATMUL_SHAPE[2]} in the method's compute "
            "dtype, measured in every training round (median over rounds of the per-round "
            "fraction; training.matmul_gflops_per_step). The project path skips the LM head on "
            "prompt positions, so it executes less than 4N per token: its fraction is model "
            "FLOPs utilization, not executed FLOPs."),
        "goals": {},
        "config": {"bench": dataclasses.asdict(bench), "lora": dataclasses.asdict(setup.lora),
                   "train": dataclasses.asdict(setup.train), "seed": seed,
                   "base_dir": str(base_dir), "quant_dir": str(quant_dir),
                   "data_dir": str(data_dir)},
        "machine": {**machine, "loadavg_start": load_start},
        "training": training, "memory": memory, "generation": generation, "noop_repro": noop,
    }
    result["machine"]["loadavg_end"] = load_average()
    result["bench_wall_s"] = time.perf_counter() - t_start
    result["goals"] = {name: goal_status(result[name], *GOALS[name]) for name in GOALS}
    for m in METHODS:
        result["goals"][f"train_throughput_ratio_{m}"]["aim"] = TRAIN_RATIO_AIM
    write_json(out_path, result)
    return result


def format_table(result: dict) -> str:
    """The short stdout summary of a :func:`run_bench` result."""
    tr, mem, mach = result["training"], result["memory"], result["machine"]

    def num(v, fmt=".2f"):
        return "n/a" if v is None else format(v, fmt)

    lines = [
        f"machine: {mach['cpu_model']}, {mach['cpu_cores']} cores, {mach['torch_threads']} torch "
        f"threads, {mach['device']}, LoRA {mach['dtype_lora']} / QLoRA compute "
        f"{mach['dtype_qlora_compute']}; matmul fp32 {mach['matmul_gflops_float32']:.0f} GFLOP/s, "
        f"bf16 {mach['matmul_gflops_bfloat16']:.0f} GFLOP/s; load avg {mach['loadavg_start']} -> "
        f"{mach['loadavg_end']}",
        f"{'':8}{'project tok/s':>14}{'reference tok/s':>17}{'ratio':>8}{'roofline':>10}"
        f"{'peak MB':>9}{'growth MB':>11}{'weights MB':>12}",
    ]
    for m in METHODS:
        t, mm = tr[m], mem[m]
        lines.append(f"{m:8}{t['tokens_per_s_project']:>14.0f}{t['tokens_per_s_reference']:>17.0f}"
                     f"{t['throughput_ratio']:>8.2f}{t['roofline_fraction_project']:>10.3f}"
                     f"{mm['peak_mb']:>9.0f}{mm['peak_growth_mb']:>11.0f}{mm['weights_mb']:>12.0f}")
    lines.append(f"QLoRA/LoRA: step time x{result['qlora_lora_step_time_ratio']:.2f}, peak memory "
                 f"x{result['qlora_lora_peak_mem_ratio']:.2f} ({result['memory_measure']})")
    g = result["generation"]
    lines.append(f"generation: batched {statistics.mean(g['batched_s']):.1f} s vs one at a time "
                 f"{g['one_at_a_time_s']:.1f} s = x{g['speedup']:.1f}; answers that differ from "
                 f"one-at-a-time: {g['outputs_mismatched']}/{g['examples']} "
                 f"(transformers' batched generate: {g['hf_batched_outputs_mismatched']}/"
                 f"{g['examples']}; {g['dtype'].removeprefix('torch.')})")
    noop = result["noop_repro"]
    lines.append(f"no-op dvc repro: {num(noop['noop_repro_s'])} s ({noop['reason']})")
    verdict = {True: "met", False: "NOT met", None: "n/a"}
    lines.append("goals: " + "; ".join(f"{k} {num(v['measured'])} {v['goal']}: {verdict[v['met']]}"
                                       for k, v in result["goals"].items()))
    return "\n".join(lines)


def paired_line(result: dict) -> str:
    """The paired-seeds-per-minute line of the stdout summary."""
    w, cfg = result["paired_seeds_wall_s"], result["paired_seeds_config"]
    return (f"paired seeds on {cfg['cpu_model']} ({cfg['cpu_cores']} cores; "
            f"{len(cfg['seeds'])} seeds, rank {cfg['rank']}, {cfg['targets']}, "
            f"{cfg['threads_per_process']} thread(s) per process): one run per process "
            f"{w['one_run_per_process']:.0f} s, seeds per process {w['seeds_per_process']:.0f} s "
            f"-> {result['paired_seeds_per_minute']:.2f} paired seeds/min "
            f"({result['paired_seeds_per_cpu_minute']:.2f} per CPU-minute), speedup "
            f"x{result['paired_seeds_speedup']:.2f}; load avg {cfg['loadavg_start']} -> "
            f"{cfg['loadavg_end']}; a batch of {len(cfg['seeds'])} x the rows per example: "
            f"LoRA x{result['batched_rows_speedup_lora']:.2f}, "
            f"QLoRA x{result['batched_rows_speedup_qlora']:.2f} (the ceiling of K adapters "
            "in one batch)")
