"""``python -m qlora_diag.check_params [params.yaml]``: validate the file, list every problem."""
from __future__ import annotations

import sys
from pathlib import Path

from qlora_diag.core.cli import run_stage
from qlora_diag.core.config import load_params
from qlora_diag.models.targets import check_against_model

BASE = Path("models/base")


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
