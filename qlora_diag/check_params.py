"""``python -m qlora_diag.check_params [params.yaml]``: validate the file, list every problem."""
from __future__ import annotations

import sys

from qlora_diag.cli import run_stage
from qlora_diag.config import load_params


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else "params.yaml"
    load_params(path)
    print(f"{path}: ok")


if __name__ == "__main__":
    run_stage(main)
