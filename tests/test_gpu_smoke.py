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


def test_output_check_wants_one_optimizer_and_the_paged_memory_note(tmp_path):
    """On CUDA `auto` gives both methods paged AdamW, whose state the CUDA peak leaves out: the
    check expects that note in memory_measure and refuses runs whose optimizers differ."""
    import json
    import shutil

    from qlora_diag.core.config import load_params, run_name
    from qlora_diag.tools.gpu_smoke import check_outputs
    from qlora_diag.train.memory import memory_measure

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    p = load_params(tmp_path / "params.yaml")
    note = memory_measure("CUDA peak allocated tensor memory", "paged_adamw_32bit")
    assert note != "CUDA peak allocated tensor memory"

    def write_runs(optimizer_of):
        for m in ("lora", "qlora"):
            for r in p.sweep.ranks:
                d = tmp_path / "reports/train" / run_name(m, r, p.lora.targets, p.seed)
                d.mkdir(parents=True, exist_ok=True)
                optim = optimizer_of(m)
                (d / "run.json").write_text(json.dumps({
                    "device": "cuda", "dtype": "bfloat16", "optimizer": optim,
                    "memory_measure": memory_measure("CUDA peak allocated tensor memory", optim),
                    "peak_mem_mb": 100.0}))

    def run_problems():
        return [x for x in check_outputs(tmp_path, device_type="cuda", expected_dtype="bfloat16")
                if "reports/train" not in x and not x.startswith(("compare", "reports/", str(tmp_path)))]

    write_runs(lambda m: "paged_adamw_32bit")
    assert run_problems() == []
    write_runs(lambda m: "paged_adamw_32bit" if m == "qlora" else "adamw_torch")
    assert [x for x in run_problems() if "different optimizers" in x]
