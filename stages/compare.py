"""Stage `compare`: LoRA vs QLoRA at the weight and function level, the base models' own numbers
and the transfer check -> reports/metrics.json (DVC metrics), reports/{ranks,modules,layers}.csv
and reports/compare/ (headline numbers, pairs, per-task, base, transfer, setup), read by the
plot stage."""
from qlora_diag.core.cli import exit_quietly_while_loading

exit_quietly_while_loading()  # first: Ctrl-C while the imports below load exits 130 quietly

from pathlib import Path

from qlora_diag.compare.outputs import summary_lines, write_outputs
from qlora_diag.compare.run import ComparePaths, run_compare
from qlora_diag.core.cli import run_stage
from qlora_diag.core.config import headline_seeds, load_params
from qlora_diag.core.machine import configure_threads

PATHS = ComparePaths(
    base_dir=Path("models/base"), quant_dir=Path("models/quantized"),
    data_dir=Path("data/prepared"), resolved_json=Path("data/resolved.json"),
    adapters_dir=Path("models/adapters"),
    train_dir=Path("reports/train"), quant_csv=Path("reports/quantization.csv"),
    reports_dir=Path("reports"), compare_dir=Path("reports/compare"))


def main() -> None:
    params = load_params("params.yaml")
    threads = configure_threads(params.train.threads)
    print(f"compare: {len(params.sweep.ranks)} rank(s), {1 + len(params.sweep.targets)} "
          f"preset(s), {len(headline_seeds(params))} seed(s) at r={params.lora.r}; "
          f"{threads} thread(s)", flush=True)
    result = run_compare(params, PATHS)
    write_outputs(result, PATHS)
    for line in summary_lines(result):
        print(line)
    print(f"compare: wrote {PATHS.reports_dir}/metrics.json, ranks.csv, modules.csv, layers.csv "
          f"and {PATHS.compare_dir}/ in {result.setup['timings_s']['total_s']:.0f} s")


if __name__ == "__main__":
    run_stage(main)
