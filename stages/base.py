"""Stage `base`: resolve base.model and save it once as a plain HF directory (models/base)."""
from qlora_diag.core.cli import exit_quietly_while_loading

exit_quietly_while_loading()  # first: Ctrl-C while the imports below load exits 130 quietly

from pathlib import Path

from qlora_diag.core.atomic import write_json
from qlora_diag.core.cli import run_stage
from qlora_diag.core.config import load_params
from qlora_diag.models.loading import BASE_INFO, materialize_base
from qlora_diag.models.targets import check_against_model

OUT = "models/base"


def main() -> None:
    params = load_params("params.yaml")
    info = materialize_base(params.base.model, OUT, dtype=params.base.dtype)
    write_json(Path(OUT) / BASE_INFO, info)
    check_against_model(params, Path(OUT))  # fail now, not when the first bad run starts
    print(f"base: {info['source']} -> {OUT} ({info['n_params'] / 1e6:.1f} M parameters, "
          f"{info['dtype']})")


if __name__ == "__main__":
    run_stage(main)
