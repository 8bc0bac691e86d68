"""Stage `prepare`: load data.source, split, format Alpaca prompts, tokenize (data/prepared);
resolve compare.max_new_tokens (data/resolved.json)."""
from qlora_diag.core.cli import exit_quietly_while_loading

exit_quietly_while_loading()  # first: Ctrl-C while the imports below load exits 130 quietly

import sys
from pathlib import Path

from qlora_diag.core.atomic import write_json
from qlora_diag.core.cli import run_stage
from qlora_diag.core.config import load_params
from qlora_diag.core.errors import UserError
from qlora_diag.data.lengths import truncation_warning
from qlora_diag.data.resolved import (
    max_new_tokens_warning,
    resolve_max_new_tokens,
    write_resolved,
)
from qlora_diag.data.splits import prepare_dataset
from qlora_diag.models.loading import load_tokenizer

BASE = "models/base"
OUT = "data/prepared"
REPORT = "reports/data.json"
RESOLVED = "data/resolved.json"


def main() -> None:
    params = load_params("params.yaml")
    if not Path(BASE).is_dir():
        raise UserError(f"{BASE}: not found; the tokenizer comes from the base model, so run "
                        "`dvc repro base` first")
    stats = prepare_dataset(source=params.data.source, n_train=params.data.n_train,
                            n_eval=params.data.n_eval, max_length=params.data.max_length,
                            seed=params.seed, tokenizer=load_tokenizer(BASE), out_dir=OUT)
    gen = resolve_max_new_tokens(params.compare.max_new_tokens, stats["splits"]["train"])
    for warning in (truncation_warning(stats["splits"], params.data.max_length,
                                       params.data.max_truncated_share),
                    max_new_tokens_warning(gen)):
        if warning:
            print(warning, file=sys.stderr)
    stats["max_truncated_share"] = params.data.max_truncated_share
    stats["max_new_tokens"] = gen
    write_json(REPORT, stats)
    write_resolved(RESOLVED, gen)
    tr, ev = stats["splits"]["train"], stats["splits"]["eval"]
    print(f"prepare: {stats['source']} -> {OUT}: train {tr['n']}, eval {ev['n']} examples "
          f"({tr['n_dropped'] + ev['n_dropped']} replaced for a too long prompt, "
          f"{tr['n_truncated'] + ev['n_truncated']} truncated at {stats['max_length']} tokens; "
          f"train total tokens mean {tr['tokens']['total']['mean']}, "
          f"max {tr['tokens']['total']['max']}); compare.max_new_tokens = {gen['value']} "
          f"(train responses: 95 % within {gen['train_response_p95']} tokens)")


if __name__ == "__main__":
    run_stage(main)
