"""The diagnosis: the figures with their captions, the verdicts on H1-H3 with their rules and
the numbers behind them, and the failure modes (fired, and the rules that did not fire)."""
from __future__ import annotations

import math

from qlora_diag.core import numbers as fmt
from qlora_diag.report.failure_modes import FM_RULES
from qlora_diag.report.verdicts import Diagnosis

FIGURE_CAPTIONS = {
    "memory.png": "Memory per rank: weights of the loaded model and training peak, LoRA vs QLoRA",
    "rank_threshold.png": "Paired eval-loss gap vs rank with 95 % intervals and the ± margin "
                          "band; cos(ΔW) and token match vs rank",
    "weight_similarity_heatmap.png": "cos(ΔW_LoRA, ΔW_QLoRA) per layer and module",
    "module_sensitivity.png": "Per target preset: paired eval-loss gap with 95 % interval and "
                              "the ± margin band, quality drop and KL",
    "quantization_error.png": "Relative error of the frozen weights per module type: NF4 vs "
                              "FP4, with and without double quantization",
    "loss_curves.png": "Train and eval loss of the headline and seed runs",
}


def _number(key: str, v: float) -> str:
    """A number in the format of its kind, told by its key (:mod:`qlora_diag.core.numbers`)."""
    if "_mb" in key:
        return fmt.mb(v)
    if "pct" in key:
        return fmt.fixed(v, 1)
    if "rate" in key or "ratio" in key:
        return fmt.fixed(v, 2)
    if any(k in key for k in ("cos", "sim", "floor", "alignment", "threshold")):
        return fmt.sim(v)
    return fmt.fixed(v, 4)  # losses, gaps, spreads, KL


def _evidence_value(v, key: str = "") -> str:
    if isinstance(v, bool):
        return fmt.yes_no(v)
    if v is None:
        return "undetermined"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else _number(key, v)
    if isinstance(v, dict) and {"pearson", "spearman", "n"} <= set(v):
        return (f"Pearson r = {fmt.fixed(v['pearson'], 3)}, "
                f"Spearman ρ = {fmt.fixed(v['spearman'], 3)}, n = {v['n']}")
    if isinstance(v, dict):
        # nested results (intervals, tests): one "key value" each, the full record in
        # verdicts.json
        return ", ".join(f"{k} {_evidence_value(x, k)}" for k, x in v.items()
                         if not isinstance(x, (dict, list)))
    if isinstance(v, float) and math.isnan(v):
        return "n/a"
    if isinstance(v, list):
        return "; ".join(", ".join(f"{k} {_evidence_value(x, k)}" for k, x in item.items())
                         if isinstance(item, dict) else str(item) for item in v)
    return str(v)


def _evidence(evidence: dict) -> str:
    return "\n".join(f"  - `{k}`: {_evidence_value(v, k)}" for k, v in evidence.items())


def section_figures(figure_dir: str) -> str:
    return "\n\n".join(f"**{cap}.**\n\n![{cap}]({figure_dir}/{name})"
                       for name, cap in FIGURE_CAPTIONS.items())


def section_verdicts(diag: Diagnosis) -> str:
    out = []
    for v in (diag.h1, diag.h2, diag.h3):
        out.append(f"### {v.hypothesis}: {v.status}\n\n{v.summary}\n\n**Rule.** {v.rule}\n\n"
                   f"**Numbers behind it:**\n\n{_evidence(v.evidence)}")
    return "\n\n".join(out)


def section_failures(diag: Diagnosis) -> str:
    out = []
    for f in diag.failure_modes:
        out.append(f"### {f.title}\n\n- **Symptom**: {f.symptom}\n- **Cause**: {f.cause}\n"
                   f"- **Mitigation**: {f.mitigation}\n- **Rule**: fires when {f.rule}.")
    fired = {f.key for f in diag.failure_modes}
    quiet = [f"- `{k}`: {rule}" for k, rule in FM_RULES.items() if k not in fired]
    head = ("Only modes whose rule fired on this run are listed."
            if diag.failure_modes else "No failure-mode rule fired on this run.")
    tail = ("\n\nRules checked that did not fire:\n\n" + "\n".join(quiet)) if quiet else ""
    return head + ("\n\n" + "\n\n".join(out) if out else "") + tail
