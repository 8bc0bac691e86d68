"""H3, rank threshold: the smallest rank r* from which on the QLoRA − LoRA eval-loss gap stays
within the seed noise."""
from __future__ import annotations

import pandas as pd

from qlora_diag.report.verdict_types import (
    NOT_FOUND,
    PARTIAL,
    REJECTED,
    SUPPORTED,
    Verdict,
)

H3_RULE = (
    "r* is the smallest tested rank from which on every tested rank has |eval-loss gap| ≤ the "
    "seed spread, the gap being QLoRA − LoRA of the main-seed pair at that rank (ranks.csv; one "
    "seed per rank). The seed spread is measured at rank lora.r and applied to all ranks. "
    "Supported when r* exists, is above the smallest tested rank, and every rank below r* is "
    "beyond the spread; partially supported when r* exists but some rank below it is also "
    "within the spread (no clean threshold); rejected when every tested rank is within the "
    "spread (no threshold: r* ≤ the smallest rank tested); not found in the tested ranks when "
    "the largest rank is still beyond the spread."
)


def find_r_star(ranks: pd.DataFrame, seed_spread: float) -> int | None:
    """Smallest rank from which on every tested rank has |gap| ≤ ``seed_spread``; None if
    the largest tested rank is beyond it."""
    d = ranks.sort_values("rank")
    r_star = None
    for rank, gap in zip(reversed(list(d["rank"])), reversed(list(d["eval_loss_gap"]))):
        if not abs(gap) <= seed_spread:  # nan counts as beyond
            break
        r_star = int(rank)
    return r_star


def verdict_h3(*, ranks: pd.DataFrame, seed_spread: float, lora_r: int) -> Verdict:
    """H3: the smallest rank r* at which the QLoRA gap is within the seed noise."""
    d = ranks.sort_values("rank")
    r_star = find_r_star(d, seed_spread)
    within = {int(r): bool(abs(g) <= seed_spread) for r, g in zip(d["rank"], d["eval_loss_gap"])}
    below = [r for r in within if r_star is not None and r < r_star]
    table = ", ".join(f"r={r}: {g:+.4f}" for r, g in zip(d["rank"], d["eval_loss_gap"]))
    if r_star is None:
        status = NOT_FOUND
        text = (f"No r*: the gap at the largest tested rank (r={int(d['rank'].max())}) is "
                "still beyond the seed spread")
    elif not below:
        status = REJECTED
        text = (f"No threshold: every tested rank is within the seed spread, so r* ≤ "
                f"{r_star}")
    elif any(within[r] for r in below):
        status = PARTIAL
        text = (f"r* = {r_star}, but rank(s) {', '.join(str(r) for r in below if within[r])} "
                "below it are within the spread too, so the gap is not a clean function of rank")
    else:
        status = SUPPORTED
        text = f"r* = {r_star}: every rank below it is beyond the spread"
    summary = (f"{text}. Gaps {table}; seed spread {seed_spread:.4f} (measured at r={lora_r}, "
               "applied to all ranks).")
    evidence = {"r_star": r_star, "eval_loss_seed_spread": seed_spread,
                "noise_floor_rank": lora_r,
                "per_rank": [{"rank": int(r), "eval_loss_gap": float(g), "within": within[int(r)]}
                             for r, g in zip(d["rank"], d["eval_loss_gap"])]}
    return Verdict("H3", status, H3_RULE, evidence, summary)
