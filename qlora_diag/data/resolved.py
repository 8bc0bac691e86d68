"""Settings that ``prepare`` resolves from the data: ``compare.max_new_tokens: auto``.

A fixed generation length fits one data set only: the probe's answers take <= 15 tokens with eos,
an Alpaca sample's ~100 on average and ~217 at the 95th percentile (issue 15), so 16 new tokens
cut almost every free-form answer and its exact match is 0 by construction. ``auto`` takes the
length from the train split (never the eval split, whose references are what generation is scored
against). ``prepare`` writes the result to a small JSON file (``data/resolved.json``, a DVC output
of prepare) that the training and compare stages read with :func:`read_max_new_tokens`, and
records it in ``reports/data.json``.
"""
from __future__ import annotations

import json
from pathlib import Path

from qlora_diag.core.atomic import write_json
from qlora_diag.core.errors import UserError

AUTO = "auto"
RULE = ("the smallest length that 95 % of the train split's responses (eos included, before "
        "truncation at data.max_length) fit in: nearest_rank_p95.response of the train split")


def resolve_max_new_tokens(setting: int | str, train_split_stats: dict) -> dict:
    """``{setting, value, train_response_p95, rule}``: ``value`` is ``setting`` itself when it is
    a number, else the train split's ``nearest_rank_p95.response`` (from the prepare stats).

    Response lengths count the eos token, which generation also spends a step on: an answer of
    k tokens needs ``max_new_tokens >= k + 1`` to end by itself.
    """
    p95 = int(train_split_stats["nearest_rank_p95"]["response"])
    value = p95 if setting == AUTO else int(setting)
    return {"setting": setting, "value": value, "train_response_p95": p95, "rule": RULE}


def max_new_tokens_warning(resolved: dict) -> str | None:
    """A paragraph for stderr when a fixed ``compare.max_new_tokens`` is shorter than the length
    95 % of the train responses need (:func:`resolve_max_new_tokens`'s result), else None."""
    value, p95 = resolved["value"], resolved["train_response_p95"]
    if value >= p95:
        return None
    return (f"warning: compare.max_new_tokens = {value} is shorter than the {p95} tokens (eos "
            f"included) that 95 % of the train split's responses take; generation stops there, "
            f"so longer answers are cut and cannot match their reference exactly. Set "
            f"compare.max_new_tokens to {p95}, or to auto.")


def write_resolved(path: str | Path, max_new_tokens: dict) -> None:
    """The resolved-settings file (atomically): ``{"compare.max_new_tokens": {...}}``."""
    write_json(path, {"compare.max_new_tokens": max_new_tokens})


def read_max_new_tokens(path: str | Path, setting: int | str) -> int:
    """The number of new tokens to generate for ``compare.max_new_tokens = setting``, as
    ``prepare`` resolved it into ``path``.

    The file must have been resolved from the same setting: DVC re-runs prepare when the key
    changes (it is among prepare's params), so a mismatch means prepare was not re-run, and using
    the old value would silently generate to another length than params.yaml says.
    """
    path = Path(path)
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))["compare.max_new_tokens"]
        recorded, value = entry["setting"], entry["value"]
    except FileNotFoundError:
        raise UserError(f"{path}: not found; prepare resolves compare.max_new_tokens into it, so "
                        "run `dvc repro prepare` first") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: cannot read compare.max_new_tokens from it ({type(exc).__name__}"
                        f": {exc}); re-create it with `dvc repro -f prepare`") from None
    if type(value) is not int or value < 1:
        raise UserError(f"{path}: compare.max_new_tokens is {value!r}, not a positive integer; "
                        "re-create it with `dvc repro -f prepare`")
    if type(recorded) is not type(setting) or recorded != setting:
        raise UserError(f"{path}: holds compare.max_new_tokens resolved from {recorded!r} "
                        f"(= {value}), but params.yaml has {setting!r}; run `dvc repro prepare` "
                        "to resolve it again")
    return value
