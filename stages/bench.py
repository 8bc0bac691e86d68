"""`make bench`: the performance benchmark of issue 6 -> reports/bench.json and a table on stdout.

Runs on the pipeline's own outputs (models/base, models/quantized, data/prepared); see
qlora_diag/tools/bench/ (its __init__) for what is measured and how.
"""
from qlora_diag.core.cli import exit_quietly_while_loading

exit_quietly_while_loading()  # first: Ctrl-C while the imports below load exits 130 quietly

from pathlib import Path

from qlora_diag.core.cli import run_stage
from qlora_diag.core.config import load_params
from qlora_diag.core.machine import configure_threads
from qlora_diag.data.resolved import read_max_new_tokens
from qlora_diag.tools.bench.run import format_table, run_bench

OUT = Path("reports/bench.json")


def main() -> None:
    params = load_params("params.yaml")
    threads = configure_threads(params.train.threads)
    print(f"bench: {threads} torch thread(s); bench params {params.bench}", flush=True)
    result = run_bench(
        base_dir=Path("models/base"), quant_dir=Path("models/quantized"),
        data_dir=Path("data/prepared"), base_dtype=params.base.dtype,
        compute_dtype=params.quant.compute_dtype, lora=params.lora, train=params.train,
        bench=params.bench, gen_max_new_tokens=read_max_new_tokens(Path("data/resolved.json"),
                                               params.compare.max_new_tokens),
        gen_batch_size=params.compare.gen_batch_size, seed=params.seed, repo_dir=Path("."),
        out_path=OUT)
    print(format_table(result))
    print(f"bench: wrote {OUT} in {result['bench_wall_s']:.0f} s")


if __name__ == "__main__":
    run_stage(main)
