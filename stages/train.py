"""Stage `train_*`: train the LoRA or QLoRA adapters of one setting, one run per seed, in one
process over one loaded base (dvc.yaml passes the setting and its seeds)."""
from qlora_diag.core.cli import exit_quietly_while_loading

exit_quietly_while_loading()  # first: Ctrl-C while the imports below load exits 130 quietly

import argparse
from pathlib import Path

from qlora_diag.core.cli import run_stage
from qlora_diag.core.config import load_params
from qlora_diag.core.machine import configure_threads
from qlora_diag.data.resolved import read_max_new_tokens
from qlora_diag.models.targets import check_against_model
from qlora_diag.train.multi_run import train_group
from qlora_diag.train.trainer import GenerationCfg, RunSpec, run_summary


def seed_list(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: comma-separated integer seeds, e.g. 42,1,2") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: a seed is listed twice")
    return seeds


def parse_runs() -> list[RunSpec]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", choices=["lora", "qlora"], required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--targets", required=True)
    parser.add_argument("--seeds", type=seed_list, required=True,
                        help="comma-separated adapter init seeds, one run each, e.g. 42,1,2")
    parser.add_argument("--data-seed", type=int, default=None,
                        help="batch order and dropout seed of every run (default: each run's "
                             "init seed); another seed makes the same-init control")
    a = parser.parse_args()
    return [RunSpec(method=a.method, rank=a.rank, targets=a.targets, seed=s,
                    data_seed=a.data_seed) for s in a.seeds]


def main() -> None:
    params = load_params("params.yaml")
    specs = parse_runs()
    check_against_model(params, Path("models/base"))
    # prepare resolved the setting (a number, or auto from the train responses) into this file
    max_new_tokens = read_max_new_tokens(Path("data/resolved.json"), params.compare.max_new_tokens)
    threads = configure_threads(params.train.threads)
    print(f"{', '.join(s.name for s in specs)}: training on {threads} thread(s)", flush=True)
    train_group(
        specs, base_dir=Path("models/base"), quant_dir=Path("models/quantized"),
        data_dir=Path("data/prepared"), base_dtype=params.base.dtype,
        compute_dtype=params.quant.compute_dtype, lora=params.lora, train=params.train,
        gen=GenerationCfg(n_generate=params.compare.n_generate,
                          max_new_tokens=max_new_tokens,
                          batch_size=params.compare.gen_batch_size),
        adapters_root=Path("models/adapters"), reports_root=Path("reports/train"),
        checkpoint_root=Path("models/checkpoints"), on_run=lambda m: print(run_summary(m)))


if __name__ == "__main__":
    run_stage(main)
