"""H2, module sensitivity: do the target presets differ in how much quantization costs them
(paired contrasts of their eval-loss gaps against the margin), and does per-layer quantization
error go with per-layer adapter divergence (a permutation test)?"""
from __future__ import annotations

import math

import pandas as pd

from qlora_diag.report import statistics as st
from qlora_diag.report.paired import PairedEvidence, no_comparison_fields, over_words
from qlora_diag.report.verdict_types import (
    INCONCLUSIVE,
    PARTIAL,
    REJECTED,
    SUPPORTED,
    Verdict,
)


def contrast_words(label: str, preset: str, base: str) -> str:
    """A contrast's decision in words (its label compares ``preset``'s gap with ``base``'s)."""
    return {st.QLORA_WORSE: f"{preset} more sensitive than {base}",
            st.QLORA_BETTER: f"{preset} less sensitive than {base}",
            st.EQUIVALENT: f"{preset} and {base} equally sensitive within the margin",
            st.INCONCLUSIVE: f"undecided between {preset} and {base}"}[label]

H2_RULE = (
    "Per preset, the paired eval-loss gap QLoRA − LoRA with its interval (one seed per preset "
    "except lora.targets: over eval examples, omitting seed noise). Each other preset is "
    "contrasted with lora.targets by the paired difference of their gaps per eval example of "
    "the main seed, decided against compare.margin like a gap (difference: 95 % interval "
    "excludes 0 and the estimate is beyond δ; equivalent: 90 % interval inside ±δ). Supported "
    "when some contrast is a difference; rejected when every contrast is equivalent; partially "
    "supported when neither but per-layer quantization error and adapter divergence "
    "(1 − cos(ΔW), layers.csv) are positively rank-correlated (permutation p < 0.05); "
    "inconclusive otherwise. Each contrast is tested at 5 % without a multiplicity correction, "
    "and presets differ in trainable-parameter count (capacity), which a contrast does not "
    "separate from quantization sensitivity."
)


def verdict_h2(*, paired: PairedEvidence, modules: pd.DataFrame, layers: pd.DataFrame,
               rng_seed: int) -> Verdict:
    """H2 on the preset gaps and contrasts of ``paired`` and the per-layer table."""
    contrasts = paired.contrasts
    labels = [c.label for c in contrasts.values()]
    div = layers.assign(divergence=1 - layers["cos_sim"])[["quant_rel_error", "divergence"]]
    div = div.astype(float).dropna()
    corr = (st.spearman_test(div["quant_rel_error"], div["divergence"], n_perm=st.N_PERMUTATIONS,
                             rng_seed=rng_seed) if len(div) >= 3 else None)
    layer_rel = corr is not None and corr.p_value < st.PERMUTATION_ALPHA and corr.rho > 0
    if any(lab in (st.QLORA_WORSE, st.QLORA_BETTER) for lab in labels):
        status = SUPPORTED
    elif labels and all(lab == st.EQUIVALENT for lab in labels):
        status = REJECTED
    elif layer_rel:
        status = PARTIAL
    else:
        status = INCONCLUSIVE

    params = dict(zip(modules["targets"].astype(str), modules["trainable_params"]))
    gaps = "; ".join(f"{t} {c.estimate:+.3f} [{c.decision.interval95.low:+.3f}, "
                     f"{c.decision.interval95.high:+.3f}] ({c.label})"
                     for t, c in paired.per_preset.items())
    parts = [f"Gaps per preset with 95 % intervals: {gaps}"]
    for t, c in contrasts.items():
        i = c.decision.interval95
        parts.append(f"{c.name}: {c.estimate:+.3f} nats/token [{i.low:+.3f}, {i.high:+.3f}] "
                     f"({over_words(c)}), "
                     f"{contrast_words(c.label, t, paired.lora_targets)}"
                     + (f", {int(params[t]):,} vs {int(params[paired.lora_targets]):,} "
                        "trainable parameters" if t in params and paired.lora_targets in params
                        else ""))
    if corr is None or math.isnan(corr.rho):
        parts.append(f"per-layer correlation undetermined (n = {len(div)})")
    else:
        parts.append(f"per-layer quantization error vs divergence: Spearman ρ = {corr.rho:.2f}, "
                     f"permutation p = {corr.p_value:.3f} (n = {corr.n})")
    summary = "; ".join(parts) + "."
    if contrasts:
        # The primary comparison: the contrast with the largest |estimate| (named as such; it
        # is selected after looking, so its 5 % error rate holds per contrast, not for the set).
        name, primary = max(contrasts.items(), key=lambda kv: abs(kv[1].estimate))
        fields = primary.fields()
        fields["comparison"] = f"largest of {len(contrasts)} contrast(s): " + fields["comparison"]
    else:
        fields = no_comparison_fields("no other preset in sweep.targets to contrast with")
    evidence = {
        "per_preset": {t: c.fields() for t, c in paired.per_preset.items()},
        "contrasts": {t: c.fields() for t, c in contrasts.items()},
        "trainable_params": {t: int(v) for t, v in params.items()},
        "corr_quant_error_vs_divergence": None if corr is None else corr.to_dict(),
        "layer_relation": layer_rel,
    }
    return Verdict("H2", status, H2_RULE, evidence, summary, fields)
