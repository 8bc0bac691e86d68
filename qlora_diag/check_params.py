"""``python -m qlora_diag.check_params [params.yaml]``: validate the file, list every problem."""
from __future__ import annotations

import sys
from pathlib import Path

from qlora_diag.cli import run_stage
from qlora_diag.config import Params, load_params

BASE = Path("models/base")


def check_against_model(params: Params, model_dir: Path) -> None:
    """Targets and ranks of every run of the sweep against the model's architecture (reads the
    config only), so a preset the model cannot express fails before hours of training."""
    from qlora_diag.targets import check_architecture

    check_architecture(model_dir, lora_targets=params.lora.targets, lora_r=params.lora.r,
                       ranks=params.sweep.ranks, sweep_targets=params.sweep.targets)


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else "params.yaml"
    params = load_params(path)
    if (BASE / "config.json").is_file():
        check_against_model(params, BASE)
        print(f"{path}: ok (also checked against {BASE})")
    else:
        print(f"{path}: ok ({BASE} not built yet: targets and ranks are checked against the "
              "model when the base stage runs)")


if __name__ == "__main__":
    run_stage(main)
