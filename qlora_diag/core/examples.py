"""Per-example eval records (``examples.jsonl``): what one model scored on each eval example.

One line per eval example, in eval-split order, with the keys of
:data:`~qlora_diag.core.schemas.EXAMPLE_KEYS`: the example's ``id`` and task ``family``, its
summed response negative log-likelihood ``nll_sum`` (nats) and response token count
``n_tokens`` (so the model's eval loss is ``sum(nll_sum) / sum(n_tokens)``), and for the first
``compare.n_generate`` examples the greedy ``output`` and its ``exact_match`` (0/1); both are
``null`` for the examples that were not generated.

Written by training (``reports/train/<run>/examples.jsonl``) and by compare
(``reports/compare/examples/<name>.jsonl``); read by compare and the report. Standard library
only, like :mod:`qlora_diag.core.schemas`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from qlora_diag.core.errors import UserError
from qlora_diag.core.schemas import EXAMPLE_KEYS


def example_rows(records: list[dict], nll_sums: list[float], n_tokens: list[int],
                 generations: list[dict]) -> list[dict]:
    """The ``examples.jsonl`` rows of one model: ``records`` (prepared eval rows, eval order),
    their per-example ``nll_sums`` and response ``n_tokens`` (same order), and ``generations``
    (:func:`~qlora_diag.train.generation.generation_records` rows of the first examples, same
    ids in the same order). The task family is the record's ``task`` (the probe's task family;
    the source's name for free-form data)."""
    if not len(records) == len(nll_sums) == len(n_tokens):
        raise ValueError(f"example_rows: {len(records)} records, {len(nll_sums)} nll sums, "
                         f"{len(n_tokens)} token counts")
    if len(generations) > len(records):
        raise ValueError(f"example_rows: {len(generations)} generations for {len(records)} records")
    rows = []
    for i, (rec, nll, n) in enumerate(zip(records, nll_sums, n_tokens)):
        gen = generations[i] if i < len(generations) else None
        if gen is not None and gen["id"] != rec["id"]:
            raise ValueError(f"example_rows: generation {i} is of {gen['id']!r}, record of "
                             f"{rec['id']!r}")
        rows.append({"id": rec["id"], "family": rec["task"], "nll_sum": float(nll),
                     "n_tokens": int(n),
                     "exact_match": None if gen is None else int(bool(gen["exact_match"])),
                     "output": None if gen is None else gen["output"]})
    return rows


def write_examples(path: Path, rows: list[dict]) -> None:
    """``rows`` as JSON lines at ``path`` (the caller makes the write atomic)."""
    with open(path, "w") as fh:
        for row in rows:
            fh.write(json.dumps({k: row[k] for k in EXAMPLE_KEYS}) + "\n")


def _bad(path: Path, lineno: int, what: str, fix: str) -> UserError:
    return UserError(f"{path} line {lineno}: {what}; {fix}")


def read_examples(path: str | Path, fix: str = "re-create it with the stage that writes it "
                  "(`dvc repro -f <stage>`)") -> list[dict]:
    """The rows of an ``examples.jsonl`` file, each checked: every key of
    :data:`~qlora_diag.core.schemas.EXAMPLE_KEYS`, ``nll_sum`` a finite number >= 0,
    ``n_tokens`` a positive integer, ``exact_match`` 0, 1 or null, ``output`` a string or null
    (null exactly when ``exact_match`` is), unique ids. A bad file is a :class:`UserError`
    naming the file, the line and what is wrong; ``fix`` says how to re-create it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: per-example eval records not found; {fix}")
    rows, seen = [], set()
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _bad(path, lineno, f"not valid JSON ({exc.msg})", fix) from None
        if not isinstance(row, dict):
            raise _bad(path, lineno, f"expected a JSON object, got {type(row).__name__}", fix)
        missing = [k for k in EXAMPLE_KEYS if k not in row]
        if missing:
            raise _bad(path, lineno, f"missing key(s) {', '.join(missing)} (written by an older "
                       "code?)", fix)
        nll, n, em, out = row["nll_sum"], row["n_tokens"], row["exact_match"], row["output"]
        if not isinstance(row["id"], str) or not isinstance(row["family"], str) or not row["family"]:
            raise _bad(path, lineno, f"id {row['id']!r} and family {row['family']!r} must be "
                       "strings (family non-empty)", fix)
        if row["id"] in seen:
            raise _bad(path, lineno, f"id {row['id']!r} appears twice", fix)
        seen.add(row["id"])
        if isinstance(nll, bool) or not isinstance(nll, (int, float)) or not math.isfinite(nll) \
                or nll < 0:
            raise _bad(path, lineno, f"nll_sum = {nll!r} must be a finite number >= 0", fix)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise _bad(path, lineno, f"n_tokens = {n!r} must be a positive integer", fix)
        if em not in (0, 1, None) or isinstance(em, bool):
            raise _bad(path, lineno, f"exact_match = {em!r} must be 0, 1 or null", fix)
        if (em is None) != (out is None) or not (out is None or isinstance(out, str)):
            raise _bad(path, lineno, f"exact_match = {em!r} with output = {out!r}: a generated "
                       "example has both (output a string), one not generated has both null",
                       fix)
        rows.append(row)
    if not rows:
        raise UserError(f"{path}: no per-example eval records (empty file); {fix}")
    return rows


def mean_loss(rows: list[dict]) -> float:
    """Token-weighted eval loss of ``examples.jsonl`` rows: sum(nll_sum) / sum(n_tokens)."""
    return math.fsum(r["nll_sum"] for r in rows) / sum(r["n_tokens"] for r in rows)


def exact_match_rate(rows: list[dict]) -> float:
    """Exact match over the generated rows (``exact_match`` not null); nan when none were."""
    gen = [r["exact_match"] for r in rows if r["exact_match"] is not None]
    return sum(gen) / len(gen) if gen else math.nan
