"""`make bench`: the performance benchmark of issue 6 -> reports/bench.json and a table on stdout.

Runs on the pipeline's own outputs (models/base, models/quantized, data/prepared); see
qlora_diag/tools/bench/ (its __init__) for what is measured and how.
"""
from qlora_diag.core.cli import exit_quietly_while_loading

exit_quietly_while_loading()  # first: Ctrl-C while the imports below load exits 130 quietly

import argparse
from pathlib import Path

from qlora_diag.core.cli import run_stage
from qlora_diag.core.config import headline_seeds, load_params
from qlora_diag.core.machine import configure_threads
from qlora_diag.data.resolved import read_max_new_tokens
from qlora_diag.tools.bench.run import format_table, paired_line, run_bench

OUT = Path("reports/bench.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--paired-only", action="store_true",
                        help="only the paired-seeds-per-minute measurement, merged into an "
                             "existing reports/bench.json")
    a = parser.parse_args()
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
        out_path=OUT, paired_seeds=headline_seeds(params)[:params.bench.paired_seeds],
        params_file=Path("params.yaml"), threads=threads, paired_only=a.paired_only)
    if not a.paired_only:
        print(format_table(result))
    print(paired_line(result))
    print(f"bench: wrote {OUT}" + ("" if a.paired_only else f" in {result['bench_wall_s']:.0f} s"))


if __name__ == "__main__":
    run_stage(main)
