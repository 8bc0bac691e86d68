"""Stage `quantize`: the 4-bit QLoRA base (models/quantized) and what quantization costs.

Writes reports/quantization.csv (error of every linear weight under nf4/fp4 x double quant) and
reports/quantization.json (errors, bits per parameter vs the QLoRA paper, storage).
"""
from qlora_diag.core.cli import exit_quietly_while_loading

exit_quietly_while_loading()  # first: Ctrl-C while the imports below load exits 130 quietly

from qlora_diag.core.atomic import atomic_file, write_json
from qlora_diag.core.cli import run_stage
from qlora_diag.core.config import load_params
from qlora_diag.models.loading import load_base
from qlora_diag.models.quantization.per_module import model_storage, weight_error_table
from qlora_diag.models.quantization.save import quantize_and_save
from qlora_diag.models.quantization.summary import (
    dir_size_mb,
    quantization_metrics,
    summary_table,
)

BASE = "models/base"
OUT = "models/quantized"


def main() -> None:
    params = load_params("params.yaml")
    info = quantize_and_save(BASE, OUT, quant_type=params.quant.type,
                             double_quant=params.quant.double_quant,
                             compute_dtype=params.quant.compute_dtype)
    base = load_base(BASE, params.base.dtype)
    table = weight_error_table(base, blocksize=info["blocksize"])
    with atomic_file("reports/quantization.csv") as fh:
        table.to_csv(fh, index=False, float_format="%.6g")
    metrics = quantization_metrics(table, model_storage(base), info["storage"],
                        quant_type=params.quant.type, double_quant=params.quant.double_quant)
    metrics |= {"kept_16bit": "; ".join(info["kept_16bit"]),
                "disk_mb_base": dir_size_mb(BASE), "disk_mb_quantized": dir_size_mb(OUT)}
    write_json("reports/quantization.json", metrics)
    print(summary_table(table).to_string(float_format="%.4f"))
    print(f"quantize: {info['n_quantized_modules']} linear layers -> {params.quant.type}"
          f"{' + double quant' if params.quant.double_quant else ''} in {OUT}; weights "
          f"{metrics['weights_mb_16bit']:.1f} MB (16-bit) -> {metrics['weights_mb_4bit']:.1f} MB "
          f"= {metrics['bytes_per_param_model']:.3f} bytes/param (quoted QLoRA: "
          f"{metrics['bytes_per_param_quoted_qlora']}); kept 16-bit: {metrics['kept_16bit']}")


if __name__ == "__main__":
    run_stage(main)
