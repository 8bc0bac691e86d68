"""Stage `train_*`: train one LoRA or QLoRA adapter (dvc.yaml passes the run's identity)."""
from qlora_diag.core.cli import exit_quietly_while_loading

exit_quietly_while_loading()  # first: Ctrl-C while the imports below load exits 130 quietly

import argparse
from pathlib import Path

from qlora_diag.core.cli import run_stage
from qlora_diag.core.config import load_params
from qlora_diag.core.machine import configure_threads
from qlora_diag.data.resolved import read_max_new_tokens
from qlora_diag.models.targets import check_against_model
from qlora_diag.train.trainer import GenerationCfg, RunSpec, run_summary, train_adapter


def parse_run() -> RunSpec:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", choices=["lora", "qlora"], required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--targets", required=True)
    parser.add_argument("--seed", type=int, required=True, help="adapter init seed")
    parser.add_argument("--data-seed", type=int, default=None,
                        help="batch order and dropout seed (default: --seed); another seed "
                             "makes the same-init control")
    a = parser.parse_args()
    return RunSpec(method=a.method, rank=a.rank, targets=a.targets, seed=a.seed,
                   data_seed=a.data_seed)


def main() -> None:
    params = load_params("params.yaml")
    spec = parse_run()
    check_against_model(params, Path("models/base"))
    # prepare resolved the setting (a number, or auto from the train responses) into this file
    max_new_tokens = read_max_new_tokens(Path("data/resolved.json"), params.compare.max_new_tokens)
    threads = configure_threads(params.train.threads)
    print(f"{spec.name}: training on {threads} thread(s)", flush=True)
    m = train_adapter(
        spec, base_dir=Path("models/base"), quant_dir=Path("models/quantized"),
        data_dir=Path("data/prepared"), base_dtype=params.base.dtype,
        compute_dtype=params.quant.compute_dtype, lora=params.lora, train=params.train,
        gen=GenerationCfg(n_generate=params.compare.n_generate,
                          max_new_tokens=max_new_tokens,
                          batch_size=params.compare.gen_batch_size),
        adapter_out=Path("models/adapters") / spec.name,
        report_dir=Path("reports/train") / spec.name,
        checkpoint_root=Path("models/checkpoints"))
    print(run_summary(m))


if __name__ == "__main__":
    run_stage(main)
