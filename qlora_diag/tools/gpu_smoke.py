"""``make gpu-smoke``: every stage on a tiny model on CUDA, then a check of what a GPU changes.

The CUDA paths (device placement, the CUDA allocator's peak memory, bf16 by compute capability,
one pinned device) cannot run on the CPU machines this project is developed on. This command is
the one step that verifies them on the first machine with a GPU: the real pipeline with real
``dvc repro`` on ``embedded:tiny-llama`` in a scratch copy (about a minute of work on any GPU),
then :func:`check_outputs` reads what the stages recorded. Without a GPU it refuses at once.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from qlora_diag.core.config import load_params, run_name
from qlora_diag.tools.smoke import SMOKE_PARAMS, run_scratch_pipeline
from qlora_diag.train.memory import memory_measure

GPU_SMOKE_PARAMS = {"base.model": "embedded:tiny-llama", **SMOKE_PARAMS}
# What train.memory.PeakMemory records on each backend (run.json "memory_measure").
MEMORY_MEASURE = {"cuda": "CUDA peak allocated tensor memory"}
HEADLINE_KEYS = ("eval_loss_lora", "eval_loss_qlora", "eval_loss_gap", "peak_mem_mb_lora",
                 "peak_mem_mb_qlora", "weights_mb_lora", "weights_mb_qlora", "step_time_ratio")


def refusal(cuda_available: bool, torch_version: str, cuda_version: str | None) -> str | None:
    """The message that stops the check on a machine without a usable GPU, else None."""
    if cuda_available:
        return None
    build = (f"built for CUDA {cuda_version}" if cuda_version
             else "a CPU-only build; a GPU host needs the CUDA build of the same version")
    return (f"gpu-smoke: no CUDA device is visible to torch {torch_version} ({build}). This check "
            "exercises the GPU paths of every stage and has nothing to test on a CPU; run "
            "`make gpu-smoke` on a GPU host (check `nvidia-smi` and CUDA_VISIBLE_DEVICES there). "
            "On this machine, `make smoke` runs the same pipeline on the CPU.")


def _read_json(path: Path, problems: list[str]) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        problems.append(f"{path}: cannot be read ({exc})")
        return {}


def check_outputs(project: Path, *, device_type: str, expected_dtype: str) -> list[str]:
    """Every problem with the outputs of a finished run in ``project``: each training run and
    the compare stage on ``device_type``, in ``expected_dtype`` (the 16-bit base and the 4-bit
    compute dtype), memory measured by that device's allocator, headline metrics finite and a
    report without placeholders. An empty list means the check passed."""
    problems: list[str] = []
    p = load_params(project / "params.yaml")
    runs = [run_name(m, r, p.lora.targets, p.seed) for m in ("lora", "qlora") for r in p.sweep.ranks]
    for run in runs:
        info = _read_json(project / "reports/train" / run / "run.json", problems)
        if not info:
            continue
        if info.get("device") != device_type:
            problems.append(f"{run}: trained on {info.get('device')!r}, expected {device_type!r}")
        if info.get("dtype") != expected_dtype:
            problems.append(f"{run}: dtype {info.get('dtype')!r}, expected {expected_dtype!r}")
        want = MEMORY_MEASURE.get(device_type)
        if want:  # with what the optimizer's paged state leaves out of it
            want = memory_measure(want, str(info.get("optimizer")))
        if want and info.get("memory_measure") != want:
            problems.append(f"{run}: memory measured as {info.get('memory_measure')!r}, "
                            f"expected {want!r}")
        peak = info.get("peak_mem_mb")
        if not isinstance(peak, (int, float)) or not peak > 0:
            problems.append(f"{run}: peak_mem_mb = {peak!r}, expected a positive number")
    optimizers = {_read_json(project / "reports/train" / run / "run.json", []).get("optimizer")
                  for run in runs}
    if len(optimizers) > 1:
        problems.append(f"the runs used different optimizers {sorted(map(str, optimizers))}; "
                        "LoRA and QLoRA must differ in the base only")
    setup = _read_json(project / "reports/compare/setup.json", problems)
    if setup and setup.get("device") != device_type:
        problems.append(f"compare: ran on {setup.get('device')!r}, expected {device_type!r}")
    metrics = _read_json(project / "reports/metrics.json", problems)
    for key in HEADLINE_KEYS:
        v = metrics.get(key)
        if metrics and not (isinstance(v, (int, float)) and v == v and abs(v) != float("inf")):
            problems.append(f"reports/metrics.json: {key} = {v!r}, expected a finite number")
    report = project / "reports/report.md"
    if not report.is_file():
        problems.append(f"{report}: missing")
    elif any(mark in report.read_text() for mark in ("TODO", "TBD", "[FILL")):
        problems.append(f"{report}: holds a placeholder")
    return problems


def main() -> None:
    import torch

    from qlora_diag.core.machine import resolve_dtype

    message = refusal(torch.cuda.is_available(), torch.__version__, torch.version.cuda)
    if message:
        sys.exit(message)
    print(f"gpu-smoke: {torch.cuda.get_device_name(0)}, capability "
          f"{torch.cuda.get_device_capability(0)}", flush=True)
    dest = run_scratch_pipeline(GPU_SMOKE_PARAMS, "gpu-smoke")
    problems = check_outputs(dest, device_type="cuda", expected_dtype=resolve_dtype("auto"))
    if problems:
        sys.exit("gpu-smoke: FAILED\n" + "\n".join(f"  - {x}" for x in problems))
    print(f"gpu-smoke: passed (devices, dtypes, memory keys, report); outputs in {dest}")


if __name__ == "__main__":
    main()
