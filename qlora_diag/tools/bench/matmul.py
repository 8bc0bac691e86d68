"""This machine's matmul rate, the roofline's denominator, and the facts a benchmark result was
measured on."""
from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F

from qlora_diag.core.machine import (
    cpu_flags,
    cpu_model,
    library_versions,
    resolve_dtype,
    torch_dtype,
)

# Matmul shape of the rate measurement: tokens x in x out of SmolLM2's MLP up-projection in a
# benchmark step (8 examples x ~64 tokens, hidden 576, intermediate 1536) -- the kind of matmul
# that dominates a training step; the shape core.machine.has_fast_bf16 was measured with.
MATMUL_SHAPE = (512, 576, 1536)
# Time spent per dtype measuring the machine's matmul rate; the best repetition is taken (load
# from other processes only ever slows a repetition down, so the fastest is the machine's rate).
MATMUL_SECONDS = 0.5
MATMUL_MIN_REPS = 3
# Repetitions of the matmul measured in every training round: the roofline divides a round's
# throughput by the rate the machine gave in that same round (paired, like the ratios).
MATMUL_ROUND_REPS = 3


def measure_matmul_gflops(dtype: torch.dtype, device: torch.device, *, seconds: float,
                          min_reps: int, shape: tuple[int, int, int] = MATMUL_SHAPE) -> float:
    """Best rate (GFLOP/s) over ``min_reps`` repetitions and at least ``seconds`` of
    ``F.linear(x, w)``, x: m x k, w: n x k -- nn.Linear's op and weight layout. (The layout
    matters for emulated bf16: on an AVX2 CPU a plain ``x @ w`` with w: k x n ran ~6x slower
    than ``F.linear`` in bf16, not in fp32.)"""
    m, k, n = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    w = torch.randn(n, k, generator=gen).to(device, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    F.linear(x, w)  # first call pays for kernel selection and thread-pool start
    sync()
    best, spent, reps = float("inf"), 0.0, 0
    while spent < seconds or reps < min_reps:
        t0 = time.perf_counter()
        F.linear(x, w)
        sync()
        dt = time.perf_counter() - t0
        best, spent, reps = min(best, dt), spent + dt, reps + 1
    return 2 * m * k * n / best / 1e9


def machine_facts(device: torch.device, base_dtype: str, compute_dtype: str) -> dict:
    """What the numbers were measured on, including this machine's matmul rates."""
    flags = cpu_flags()
    facts = {
        "cpu_model": cpu_model(), "cpu_cores": os.cpu_count(),
        "cpu_bf16_flags": sorted({"avx512_bf16", "amx_bf16"} & flags),
        "cpu_avx2": "avx2" in flags, "cpu_avx512f": "avx512f" in flags,
        "torch_threads": torch.get_num_threads(), "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "dtype_lora": resolve_dtype(base_dtype),
        "dtype_qlora_compute": resolve_dtype(compute_dtype),
        **library_versions(),
        "matmul_shape": list(MATMUL_SHAPE),
    }
    for name in ("float32", "bfloat16"):
        facts[f"matmul_gflops_{name}"] = measure_matmul_gflops(
            torch_dtype(name), device, seconds=MATMUL_SECONDS, min_reps=MATMUL_MIN_REPS)
    return facts
