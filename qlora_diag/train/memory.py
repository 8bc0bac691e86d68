"""Peak memory during a block of work, measured the same way for LoRA and QLoRA.

- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (tensor memory).
- CPU on Linux: the kernel's high-water mark of resident memory (VmHWM), reset through
  ``/proc/self/clear_refs`` at the start, so the peak belongs to this block only; it counts the
  whole process (weights, activations, optimizer state, allocator caches, libraries).
- elsewhere: a sampling thread reading RSS every 20 ms (may miss short spikes).
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import psutil
import torch

CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")


def choose_backend(device_type: str, clear_refs_writable: bool) -> str:
    """Which measurement applies: ``cuda``, ``rss_hwm`` or ``rss_sampler``."""
    if device_type == "cuda":
        return "cuda"
    return "rss_hwm" if clear_refs_writable else "rss_sampler"


# bitsandbytes allocates paged optimizer state with cudaMallocManaged, which the caching
# allocator never sees: torch.cuda.max_memory_allocated leaves it out (issue 15).
PAGED_STATE_NOTE = ("; excludes the paged optimizer state (CUDA managed memory, not counted by "
                    "max_memory_allocated)")


def memory_measure(description: str, optimizer: str) -> str:
    """``description`` (:attr:`PeakMemory.description`) with what it leaves out under
    ``optimizer``: paged optimizers keep their state outside the measured allocator. Both
    methods use one optimizer, so the omission is the same for both, but the peak is low."""
    return description + PAGED_STATE_NOTE if optimizer.startswith("paged") else description


def _vm_hwm_bytes() -> int:
    for line in STATUS.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not in /proc/self/status")


def _clear_refs_writable() -> bool:
    return CLEAR_REFS.exists() and os.access(CLEAR_REFS, os.W_OK)


class PeakMemory:
    """``with PeakMemory(device) as pm: ...`` then ``pm.peak_mb``, ``pm.start_mb``, ``pm.backend``."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.backend = choose_backend(self.device.type, _clear_refs_writable())
        self.start_mb = self.peak_mb = float("nan")
        self._stop = threading.Event()
        self._max = 0
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        proc = psutil.Process()
        if self.backend == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_mb = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            self.start_mb = proc.memory_info().rss / 2**20
            if self.backend == "rss_hwm":
                CLEAR_REFS.write_text("5")  # "5" resets the peak RSS counter (proc(5))
            else:
                self._max = proc.memory_info().rss
                self._thread = threading.Thread(target=self._sample, args=(proc,), daemon=True)
                self._thread.start()
        return self

    def _sample(self, proc) -> None:
        while not self._stop.wait(0.02):
            self._max = max(self._max, proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        if self.backend == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self.backend == "rss_hwm":
            self.peak_mb = _vm_hwm_bytes() / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = self._max / 2**20

    @property
    def growth_mb(self) -> float:
        return self.peak_mb - self.start_mb

    @property
    def description(self) -> str:
        return {"cuda": "CUDA peak allocated tensor memory",
                "rss_hwm": "process peak resident memory (VmHWM, reset at start)",
                "rss_sampler": "process peak resident memory (sampled every 20 ms)"}[self.backend]
