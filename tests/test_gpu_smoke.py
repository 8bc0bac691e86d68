"""`make gpu-smoke` on a machine without a GPU refuses at once; its output check catches CPU runs."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from qlora_diag.tools.gpu_smoke import refusal

REPO = Path(__file__).resolve().parents[1]


def test_refusal_names_the_build_and_what_to_do():
    cpu_build = refusal(False, "2.13.0+cpu", None)
    assert "no CUDA device" in cpu_build and "CPU-only build" in cpu_build
    assert "make smoke" in cpu_build
    assert "built for CUDA 12.8" in refusal(False, "2.13.0", "12.8")
    assert refusal(True, "2.13.0", "12.8") is None


def test_gpu_smoke_refuses_cleanly_on_this_cpu_machine():
    if torch.cuda.is_available():  # on a GPU host the command runs the real check instead
        return
    proc = subprocess.run([sys.executable, "-m", "qlora_diag.tools.gpu_smoke"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.startswith("gpu-smoke: no CUDA device is visible")
    assert "Traceback" not in proc.stderr
