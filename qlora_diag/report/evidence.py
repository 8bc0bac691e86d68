"""Descriptive evidence beside the paired tests: the sweep rows (for H1's rank correlation), how
many greedy outputs ran into the token limit, and whether the QLoRA update leans towards undoing
the quantization error.

Paired gaps and their decisions are in :mod:`~qlora_diag.report.paired`; this module holds the
descriptive helpers beside them.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import pandas as pd

# "The QLoRA update leans towards undoing the quantization error" when its alignment with
# W - deq(Q(W)) reaches at least half of the best cosine any matrix of its rank could reach
# (the Eckart-Young ceiling); below that most of the update points elsewhere.
ALIGNED_FRACTION = 0.5


def sweep_rows(ranks: pd.DataFrame, modules: pd.DataFrame, lora_targets: str) -> pd.DataFrame:
    """The rank-sweep rows plus the module-sweep rows of the *other* presets (the preset
    ``lora_targets`` at rank lora.r is the same pair of runs as the rank row at lora.r), with a
    ``label`` column (``r=8``, ``kv``) and the columns the H1 correlation uses."""
    cols = ["cos_sim_mean", "token_match_rate", "eval_loss_gap"]
    r = ranks[cols].assign(label=[f"r={int(v)}" for v in ranks["rank"]])
    m = modules[modules["targets"] != lora_targets]
    m = m[cols].assign(label=list(m["targets"].astype(str)))
    out = pd.concat([r, m], ignore_index=True)
    return out.assign(abs_eval_loss_gap=out["eval_loss_gap"].abs())


def max_length_rate(generations: Iterable[dict], max_new_tokens: int) -> float:
    """Share of greedy outputs that ran into ``max_new_tokens`` without emitting eos
    (generation strips eos, so a stopped output is strictly shorter than the limit)."""
    rows = list(generations)
    if not rows:
        return math.nan
    return sum(len(r["output_ids"]) >= max_new_tokens for r in rows) / len(rows)


def undoes_quantization_error(alignment_mean: float, alignment_ceiling_mean: float) -> bool:
    """Whether the QLoRA update leans towards W - deq(Q(W)): alignment at least
    :data:`ALIGNED_FRACTION` of the rank-r ceiling (False when either is undefined)."""
    return (alignment_mean > 0 and alignment_ceiling_mean > 0
            and alignment_mean >= ALIGNED_FRACTION * alignment_ceiling_mean)


def alignment_text(alignment_mean: float, alignment_ceiling_mean: float) -> str:
    """The alignment in words, with its numbers (for the failure modes' causes)."""
    numbers = (f"cos(ΔW_QLoRA − ΔW_LoRA, W − deq(Q(W))) = {alignment_mean:.3f}, best possible "
               f"at this rank {alignment_ceiling_mean:.3f}")
    if undoes_quantization_error(alignment_mean, alignment_ceiling_mean):
        return (f"the QLoRA update's alignment with the quantization error reaches "
                f"{ALIGNED_FRACTION:g} of the best its rank allows ({numbers}; one adapter, a "
                "descriptive threshold, not a test)")
    return (f"the QLoRA update's alignment with the quantization error stays below "
            f"{ALIGNED_FRACTION:g} of the best its rank allows ({numbers}; one adapter, a "
            "descriptive threshold, not a test)")
