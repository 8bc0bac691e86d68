"""Peak memory of each method's training, each in a fresh process.

Peak memory of two methods cannot be measured in one process (the second inherits the first's
heap), so each method's training runs again in a subprocess of its own under
:class:`~qlora_diag.train.memory.PeakMemory`.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from qlora_diag.core.atomic import write_json
from qlora_diag.core.machine import choose_device, configure_threads
from qlora_diag.models.loading import load_tokenizer
from qlora_diag.tools.bench.training import TrainSetup, project_trainer
from qlora_diag.train.memory import PeakMemory

MB = 2**20


def measure_training_memory(setup: TrainSetup, method: str, device: torch.device) -> dict:
    """Peak memory of the project's training path for ``method`` -- run in a fresh process.

    ``rss_baseline_mb`` is the process after imports, ``rss_loaded_mb`` after loading the model,
    ``start_mb`` after paging its weights in and building the Trainer, ``peak_mb`` the peak
    during training (process peak RSS on CPU, peak allocated tensor memory on CUDA; see
    PeakMemory.description), ``weights_mb`` the model's parameters and buffers
    (``get_memory_footprint``; bitsandbytes' quantization constants are not parameters and are
    not counted in it).

    Weights loaded from safetensors on CPU are memory-mapped and become resident only when
    first read -- in the first training step, where they would be counted as growth (seen:
    +87 MB RSS after loading SmolLM2's 515 MB). Reading every tensor once before the
    measurement puts them in ``start_mb``, so ``peak_growth_mb`` is what training adds.
    """
    import psutil

    rss = lambda: psutil.Process().memory_info().rss / MB  # noqa: E731
    baseline = rss()
    pad_id = load_tokenizer(setup.base_dir).pad_token_id
    model = setup.project_model(method, device)
    loaded = rss()
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.sum()  # reads every page of the tensor
    with tempfile.TemporaryDirectory(prefix="qlora-bench-mem-") as tmp:
        trainer = project_trainer(model, setup, method, device, pad_id, Path(tmp))
        with PeakMemory(device) as mem:
            trainer.train()
    return {"method": method, "measure": mem.description, "backend": mem.backend,
            "rss_baseline_mb": baseline, "rss_loaded_mb": loaded, "start_mb": mem.start_mb,
            "peak_mb": mem.peak_mb,
            "peak_growth_mb": mem.growth_mb, "weights_mb": model.get_memory_footprint() / MB,
            "steps": setup.train.max_steps}


def memory_in_subprocess(setup: TrainSetup, method: str) -> dict:
    """:func:`measure_training_memory` in a fresh Python process (nothing inherited). The
    methods run one after the other, never side by side: two processes of 2 torch threads each
    on 2 cores make OpenMP threads wait for each other and a run takes many times longer."""
    with tempfile.TemporaryDirectory(prefix="qlora-bench-mem-") as tmp:
        spec, out = Path(tmp) / "setup.json", Path(tmp) / "memory.json"
        spec.write_text(json.dumps(dataclasses.asdict(setup)))
        proc = subprocess.run([sys.executable, "-c", WORKER, method, str(spec), str(out),
                               str(torch.get_num_threads())], capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"memory benchmark of {method} failed (exit {proc.returncode}):\n"
                               f"{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def memory_worker(argv: list[str]) -> None:
    """Entry point of a memory subprocess: ``<method> <setup.json> <out.json> <threads>``."""
    method, spec, out, threads = argv
    configure_threads(int(threads))
    setup = TrainSetup.from_json(json.loads(Path(spec).read_text()))
    write_json(out, measure_training_memory(setup, method, choose_device()))


# The subprocess imports this very copy of qlora_diag (the repository holding it first on
# sys.path: qlora_diag/tools/bench/memory.py -> parents[3]), not whatever `qlora_diag` the
# working directory would shadow it with.
WORKER = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[3])!r}); "
          "from qlora_diag.tools.bench.memory import memory_worker; memory_worker(sys.argv[1:])")
