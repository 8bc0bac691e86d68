"""H2, module sensitivity: which target presets are most sensitive to quantization, and does
per-layer quantization error predict per-layer adapter divergence?"""
from __future__ import annotations

import math

import pandas as pd

from qlora_diag.report.evidence import correlation
from qlora_diag.report.verdict_types import PARTIAL, REJECTED, SUPPORTED, Verdict

# The per-layer relation between quantization error and adapter divergence counts when
# Spearman's rho is at least 0.5: with >= 30 layer x module rows that is far beyond chance (the
# two-sided 5 % critical value is ~0.36 at n = 30), and a weaker monotone relation explains
# under a quarter of the rank variance, too little to steer which layers to keep in 16 bits.
LAYER_RHO = 0.5

H2_RULE = (
    "Presets are ranked by eval-loss gap (QLoRA − LoRA of the main-seed pair, modules.csv; "
    "largest = most sensitive), with the quality drop % and the KL divergence next to it. "
    "Supported when the gaps of the presets "
    "differ by more than the seed spread (max − min gap > spread; the spread is measured at "
    "lora.r on lora.targets and applied to every preset). Partially supported when they do "
    "not, but per-layer quantization error (relative Frobenius error of W, layers.csv) and "
    f"adapter divergence (1 − cos(ΔW)) correlate with Spearman ρ ≥ {LAYER_RHO}. Rejected "
    "otherwise."
)


def verdict_h2(*, modules: pd.DataFrame, layers: pd.DataFrame, seed_spread: float) -> Verdict:
    """H2: which target presets are most sensitive to quantization, and does per-layer
    quantization error predict per-layer adapter divergence?"""
    ranked = modules.sort_values("eval_loss_gap", ascending=False, kind="stable")
    gap_range = float(ranked["eval_loss_gap"].max() - ranked["eval_loss_gap"].min())
    differ = gap_range > seed_spread
    div = layers.assign(divergence=1 - layers["cos_sim"])
    c_layer = correlation(div, "quant_rel_error", "divergence")
    layer_rel = not math.isnan(c_layer.spearman) and c_layer.spearman >= LAYER_RHO
    status = SUPPORTED if differ else (PARTIAL if layer_rel else REJECTED)

    most, least = ranked.iloc[0], ranked.iloc[-1]
    by_kl = modules.sort_values("kl_mean", ascending=False, kind="stable").iloc[0]["targets"]
    order = " > ".join(f"{t} ({g:+.4f})"
                       for t, g in zip(ranked["targets"], ranked["eval_loss_gap"]))
    parts = [f"gap order {order}",
             f"the presets differ by {gap_range:.4f} in gap, "
             f"{'more' if differ else 'no more'} than the seed spread {seed_spread:.4f}",
             f"most sensitive by KL: {by_kl}"
             + (" (agrees)" if by_kl == most["targets"] else f" (gap says {most['targets']})")]
    if math.isnan(c_layer.spearman):
        parts.append(f"per-layer correlation undetermined (n = {c_layer.n})")
    else:
        parts.append(f"per-layer quantization error vs divergence: Pearson r = "
                     f"{c_layer.pearson:.2f}, Spearman ρ = {c_layer.spearman:.2f} "
                     f"(n = {c_layer.n})")
    body = "; ".join(parts)
    summary = body[0].upper() + body[1:] + "."
    evidence = {
        "ranking": [{"targets": str(r["targets"]), "eval_loss_gap": float(r["eval_loss_gap"]),
                     "quality_drop_pct": float(r["quality_drop_pct"]),
                     "kl_mean": float(r["kl_mean"]),
                     "gap_beyond_seed_spread": bool(abs(r["eval_loss_gap"]) > seed_spread)}
                    for _, r in ranked.iterrows()],
        "most_sensitive": str(most["targets"]), "least_sensitive": str(least["targets"]),
        "most_sensitive_by_kl": str(by_kl),
        "gap_range": gap_range, "eval_loss_seed_spread": seed_spread,
        "presets_differ_beyond_noise": differ,
        "corr_quant_error_vs_divergence": c_layer.as_dict(),
        "layer_relation": layer_rel,
    }
    return Verdict("H2", status, H2_RULE, evidence, summary)
