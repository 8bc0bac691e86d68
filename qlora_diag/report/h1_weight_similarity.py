"""H1, weight similarity: are the LoRA and QLoRA updates ΔW as alike as two runs of one method
(judged cross-seed against the same-method noise floor), do the two functions match within the
equivalence margin (the headline paired eval-loss gap), and does weight similarity go with output
similarity across the sweep (a permutation test, not a fixed rho)?"""
from __future__ import annotations

import math

import pandas as pd

from qlora_diag.report import statistics as st
from qlora_diag.report.floors import BELOW, NOT_DETECTED, UNAVAILABLE, FloorTest, floor_sentence
from qlora_diag.report.paired import PairedEvidence, over_words
from qlora_diag.report.verdict_types import (
    INCONCLUSIVE,
    PARTIAL,
    REJECTED,
    SUPPORTED,
    Verdict,
)

H1_RULE = (
    "Function level: the headline paired eval-loss gap QLoRA − LoRA (rank lora.r, lora.targets, "
    "every seed) decided against compare.margin δ: equivalent when the 90 % t-interval lies "
    "inside ±δ, QLoRA worse/better when the 95 % interval excludes 0 and the estimate is beyond "
    "δ, else inconclusive. Weight level: cross-seed LoRA-vs-QLoRA cos(ΔW) against the "
    "same-method floor (LoRA-vs-LoRA and QLoRA-vs-QLoRA over every seed pair, floors.csv), by a "
    "two-sided permutation test of the means at 5 %; same-seed pairs share the adapter init "
    "and are not used. Supported when the gap is equivalent and the cross-seed similarity is "
    "not detected below the floor; partially supported when the gap is equivalent but the "
    "floor is unavailable; rejected when the gap is QLoRA worse/better or the cross-seed "
    "similarity is below the floor; inconclusive otherwise. compare.cos_threshold θ is "
    "reported beside the floor, not used to decide."
)


def verdict_h1(*, paired: PairedEvidence, floor: FloorTest, cos_threshold: float,
               sweep: pd.DataFrame, rng_seed: int,
               other_floors: dict[str, FloorTest] | None = None) -> Verdict:
    """H1 from the headline paired comparison, the weight-level floor test of cos(ΔW) and the
    sweep rows (:func:`~qlora_diag.report.evidence.sweep_rows`); ``other_floors``: the floor
    tests of floors.csv's other measures, reported in the evidence (they do not decide)."""
    head = paired.headline_loss
    label = head.label
    if label in (st.QLORA_WORSE, st.QLORA_BETTER) or floor.outcome == BELOW:
        status = REJECTED
    elif label == st.EQUIVALENT and floor.outcome == UNAVAILABLE:
        status = PARTIAL
    elif label == st.EQUIVALENT and floor.outcome != BELOW:
        status = SUPPORTED
    else:
        status = INCONCLUSIVE

    d = sweep[["cos_sim_mean", "token_match_rate"]].astype(float).dropna()
    corr = None
    if len(d) >= 3:
        corr = st.spearman_test(d["cos_sim_mean"], d["token_match_rate"], n_perm=st.N_PERMUTATIONS,
                                rng_seed=rng_seed)
    if corr is None or math.isnan(corr.rho):
        corr_text = (f"whether weight similarity goes with token match across the sweep is "
                     f"undetermined (n = {len(d)})")
    elif corr.p_value < st.PERMUTATION_ALPHA:
        corr_text = (f"across the sweep, cos(ΔW) and token match are "
                     f"{'positively' if corr.rho > 0 else 'negatively'} rank-correlated "
                     f"(Spearman ρ = {corr.rho:.2f}, permutation p = {corr.p_value:.3f}, "
                     f"n = {corr.n})")
    else:
        corr_text = (f"across the sweep, no rank correlation of cos(ΔW) with token match is "
                     f"detected (Spearman ρ = {corr.rho:.2f}, permutation p = "
                     f"{corr.p_value:.3f}, n = {corr.n})")
    parts = [f"Function level: {head.analysis.sentence}",
             f"Weight level: {floor_sentence(floor)}"
             + (f"; θ = {cos_threshold:.2f} lies above every same-method pair"
                if floor.outcome != UNAVAILABLE and floor.floor_max < cos_threshold else ""),
             corr_text[0].upper() + corr_text[1:] + "."]
    if status == INCONCLUSIVE and floor.outcome == NOT_DETECTED:
        parts.append("Neither level decides H1 at this number of seeds.")
    summary = " ".join(p if p.endswith(".") else p + "." for p in parts)
    evidence = {"headline_interval": over_words(head), "floor_test": floor.as_dict(),
                "other_floor_tests": {c: t.as_dict() for c, t in (other_floors or {}).items()
                                      if c != floor.column},
                "cos_threshold": cos_threshold,
                "corr_cos_vs_token_match": None if corr is None else corr.to_dict(),
                "sweep_rows": list(sweep["label"])}
    return Verdict("H1", status, H1_RULE, evidence, summary, head.fields())
