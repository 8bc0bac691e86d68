"""Stage `prepare`: load data.source, split, format Alpaca prompts, tokenize (data/prepared)."""
from qlora_diag.core.cli import exit_quietly_while_loading

exit_quietly_while_loading()  # first: Ctrl-C while the imports below load exits 130 quietly

from pathlib import Path

from qlora_diag.core.atomic import write_json
from qlora_diag.core.cli import run_stage
from qlora_diag.core.config import load_params
from qlora_diag.core.errors import UserError
from qlora_diag.data.splits import prepare_dataset
from qlora_diag.models.loading import load_tokenizer

BASE = "models/base"
OUT = "data/prepared"
REPORT = "reports/data.json"


def main() -> None:
    params = load_params("params.yaml")
    if not Path(BASE).is_dir():
        raise UserError(f"{BASE}: not found; the tokenizer comes from the base model, so run "
                        "`dvc repro base` first")
    stats = prepare_dataset(source=params.data.source, n_train=params.data.n_train,
                            n_eval=params.data.n_eval, max_length=params.data.max_length,
                            seed=params.seed, tokenizer=load_tokenizer(BASE), out_dir=OUT)
    write_json(REPORT, stats)
    tr, ev = stats["splits"]["train"], stats["splits"]["eval"]
    print(f"prepare: {stats['source']} -> {OUT}: train {tr['n']}, eval {ev['n']} examples "
          f"({tr['n_dropped'] + ev['n_dropped']} dropped, "
          f"{tr['n_truncated'] + ev['n_truncated']} truncated at {stats['max_length']} tokens; "
          f"train total tokens mean {tr['tokens']['total']['mean']}, "
          f"max {tr['tokens']['total']['max']})")


if __name__ == "__main__":
    run_stage(main)
