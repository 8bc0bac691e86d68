"""Which answer measures mean something for a data source, and the reference-based one that
does for free-form answers: chrF.

Exact match checks an answer against its reference after normalization; it means something for
``embedded:probe``, whose answers are short and exactly checkable, and nothing for free-form
instruction data (Alpaca-style answers of ~100 tokens): every run, base and fine-tuned, scores
0 there (issue 15). For every source the runs are also scored with chrF (Popović 2015, the
character n-gram F-score with recall weighted twice, beta = 2) from ``sacrebleu``: it gives
partial credit to an answer that shares words and word pieces with the reference, and on a
corpus of answers it is one number from pooled n-gram counts (not a mean of per-answer scores).
"""
from __future__ import annotations

from qlora_diag.data.sources import PROBE


def exact_match_applies(source: str) -> bool:
    """Whether exact match is a quality measure for ``data.source``: the probe only."""
    return source == PROBE


def chrf(outputs: list[str], references: list[str]) -> float:
    """Corpus chrF (0..100) of ``outputs`` against one reference each (sacrebleu's defaults:
    character 6-grams, no word n-grams, beta 2). 100 when every output equals its reference.
    Asymmetric: ``references`` is the side whose recall weighs twice."""
    from sacrebleu.metrics import CHRF

    if len(outputs) != len(references) or not outputs:
        raise ValueError(f"chrf: need equally many outputs and references, got {len(outputs)} "
                         f"and {len(references)}")
    return float(CHRF().corpus_score(list(outputs), [list(references)]).score)


def reference_chrf(rows: list[dict]) -> float:
    """chrF of generation rows (``output`` vs ``reference``, as in ``generations.jsonl``)."""
    return chrf([r["output"] for r in rows], [r["reference"] for r in rows])
