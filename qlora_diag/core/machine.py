"""Facts about the machine a stage runs on: device, native bf16, CPU model, threads, library
versions. One place, so a dtype choice and the report's description of the machine agree."""
from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path

import torch

from qlora_diag.core.errors import UserError

# Ampere (compute capability 8.0) is the first NVIDIA generation with bf16 tensor cores.
# torch.cuda.is_bf16_supported() also answers True on T4 / V100 (7.x), where bf16 is emulated and
# slower than fp32, so the capability decides.
CUDA_NATIVE_BF16_CAPABILITY = (8, 0)


def has_fast_bf16(device_type: str, cpu_flags: set[str],
                  cuda_capability: tuple[int, int] | None) -> bool:
    """Whether bf16 matmuls run at least as fast as fp32 on this device.

    CPUs need AVX512-BF16 or AMX for native bf16; without them (e.g. an AVX2-only EPYC) PyTorch
    emulates bf16 and a 512x576x1536 matmul measured 19 GFLOP/s against 167 GFLOP/s in fp32.
    GPUs need compute capability 8.0 (Ampere) or newer.
    """
    if device_type == "cuda":
        return cuda_capability is not None and tuple(cuda_capability) >= CUDA_NATIVE_BF16_CAPABILITY
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags)


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def resolve_dtype(name: str) -> str:
    """``auto`` -> ``bfloat16`` where bf16 is fast on this machine's device, else ``float32``;
    other names pass through. The resolved name is logged with every run."""
    if name != "auto":
        return name
    cuda = torch.cuda.is_available()
    fast = has_fast_bf16("cuda" if cuda else "cpu", cpu_flags(),
                         torch.cuda.get_device_capability() if cuda else None)
    return "bfloat16" if fast else "float32"


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``; ``auto`` is resolved for this machine first."""
    return {"bfloat16": torch.bfloat16, "float16": torch.float16,
            "float32": torch.float32}[resolve_dtype(name)]


def choose_device() -> torch.device:
    """The one device a run uses: ``cuda:0`` when a GPU is visible, else the CPU.

    With several visible GPUs the Trainer would wrap the 16-bit LoRA model in DataParallel and
    multiply its batch by the GPU count, while the 4-bit QLoRA model is not wrapped: the two
    methods would train on different batch sizes. A run therefore refuses to start until one GPU
    is chosen; parallelism across GPUs is one stage per GPU (README "Share and distribute")."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    n = torch.cuda.device_count()
    if n > 1:
        raise UserError(
            f"{n} GPUs are visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
            "a run trains on exactly one device so that LoRA and QLoRA see the same batch size "
            "(the Trainer would split LoRA's batches over all GPUs with DataParallel, not QLoRA's). "
            "Choose one GPU per process, e.g. `CUDA_VISIBLE_DEVICES=0 dvc repro`; to use several "
            "GPUs, run several stages at once, each pinned to its own GPU.")
    return torch.device("cuda:0")


def configure_threads(threads: int) -> int:
    """Set torch's intra-op threads (0 = one per core) and return the number used."""
    n = threads or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (rounded to 0.01), None where the OS has none: how
    busy the machine was while something was timed."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
