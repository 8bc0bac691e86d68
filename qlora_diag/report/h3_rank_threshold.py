"""H3, rank threshold: the smallest rank r* from which on the paired QLoRA − LoRA eval-loss gap is
equivalent to zero within compare.margin, and a trend test of the gap over rank."""
from __future__ import annotations

from qlora_diag.report import statistics as st
from qlora_diag.report.paired import Comparison, PairedEvidence, over_words
from qlora_diag.report.verdict_types import (
    INCONCLUSIVE,
    NOT_FOUND,
    PARTIAL,
    REJECTED,
    SUPPORTED,
    Verdict,
)

H3_RULE = (
    "Per tested rank, the paired eval-loss gap QLoRA − LoRA with its interval (over seeds at "
    "lora.r; over the eval examples of the one seed elsewhere, omitting seed noise), decided "
    "against compare.margin δ. r* is the smallest tested rank from which on every tested rank "
    "is equivalent (90 % interval inside ±δ). Supported when r* exists above the smallest "
    "tested rank and every rank below it is QLoRA worse (95 % interval excludes 0, estimate "
    "beyond δ); partially supported when r* exists above the smallest rank but a rank below it "
    "is equivalent too; rejected when every tested rank is equivalent (no threshold in the "
    "tested ranks); not found in the tested ranks when no r* exists and the largest rank is "
    "QLoRA worse; inconclusive otherwise. The trend of the gap per doubling of rank (least "
    "squares on log2 rank, t-interval and permutation p) is reported beside it. verdicts.json's "
    "estimate and decision are those of the smallest tested rank, where H3 expects a gap."
)


def find_r_star(per_rank: dict[int, Comparison]) -> int | None:
    """Smallest rank from which on every tested rank is *equivalent*; None if the largest
    tested rank is not."""
    r_star = None
    for r in sorted(per_rank, reverse=True):
        if per_rank[r].label != st.EQUIVALENT:
            break
        r_star = r
    return r_star


def verdict_h3(*, paired: PairedEvidence) -> Verdict:
    """H3 on the per-rank comparisons and the trend of ``paired``."""
    per_rank = paired.per_rank
    ranks = sorted(per_rank)
    r_star = find_r_star(per_rank)
    below = [r for r in ranks if r_star is not None and r < r_star]
    if r_star is None:
        status = NOT_FOUND if per_rank[ranks[-1]].label == st.QLORA_WORSE else INCONCLUSIVE
        text = (f"No r*: the gap at the largest tested rank (r={ranks[-1]}) is "
                f"{per_rank[ranks[-1]].label}, not equivalent")
    elif not below:
        status = REJECTED
        text = f"No threshold: every tested rank is equivalent within ±{paired.margin:g}"
    elif all(per_rank[r].label == st.QLORA_WORSE for r in below):
        status = SUPPORTED
        text = f"r* = {r_star}: every rank below it is QLoRA worse beyond the margin"
    elif any(per_rank[r].label == st.EQUIVALENT for r in below):
        status = PARTIAL
        text = (f"r* = {r_star}, but rank(s) "
                f"{', '.join(str(r) for r in below if per_rank[r].label == st.EQUIVALENT)} "
                "below it are equivalent too, so the gap is not a clean function of rank")
    else:
        status = INCONCLUSIVE
        text = (f"r* = {r_star} on this evidence, but rank(s) below it are inconclusive, so "
                "no threshold is shown")
    table = "; ".join(f"r={r}: {c.estimate:+.3f} [{c.decision.interval95.low:+.3f}, "
                      f"{c.decision.interval95.high:+.3f}] {c.label} ({over_words(c)})"
                      for r, c in per_rank.items())
    t = paired.trend
    if t is None:
        trend = "trend of the gap over rank: too few points"
    else:
        trend = (f"trend of the gap per doubling of rank {t.slope:+.3f} nats/token, 95 % "
                 f"interval [{t.low:+.3f}, {t.high:+.3f}], permutation p = {t.p_value_perm:.3f} "
                 f"({t.n_points} points over {t.n_ranks} ranks"
                 + ("" if t.replicated else "; no rank has several seeds, so the residual mixes "
                    "seed noise with departures from a line") + ")")
    summary = f"{text}. Gaps with 95 % intervals: {table}. {trend[0].upper()}{trend[1:]}."
    evidence = {"r_star": r_star, "per_rank": {str(r): c.fields() for r, c in per_rank.items()},
                "trend": None if t is None else t.to_dict()}
    return Verdict("H3", status, H3_RULE, evidence, summary, per_rank[ranks[0]].fields())
