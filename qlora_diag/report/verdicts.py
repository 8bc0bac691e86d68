"""Verdicts on H1-H3 and the observed failure modes, computed from one run's numbers.

Every verdict is a pure function of numbers the earlier stages wrote (``reports/metrics.json``,
``ranks.csv``, ``modules.csv``, ``layers.csv``, the per-run ``run.json`` and generations). It
returns the status, the rule in words, the numbers the rule looked at (``evidence``) and a
one-paragraph summary, so the report can show *why*, not only *what*.

The yardstick throughout is the seed noise: a LoRA-vs-QLoRA difference counts only when it is
larger than the difference between two runs of the *same* method that differ only in seed
(``eval_loss_seed_spread``, ``noise_floor_cos_sim_*``). The seed runs exist at rank ``lora.r``
and targets ``lora.targets`` only, so that one noise floor is applied to every rank and preset;
the rules say so.

Thresholds that are not knobs of ``params.yaml`` are the named constants below, each with why.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable

import numpy as np
import pandas as pd

# H1: a Spearman correlation of at least 0.7 between weight similarity and output similarity
# over the sweep rows counts as "weight similarity predicts output similarity". 0.714 is the
# one-sided 5 % critical value of Spearman's rho at n = 7 (4 ranks + 3 other presets, the
# default sweep); weaker correlations are indistinguishable from chance at that n.
PREDICTIVE_RHO = 0.7
# Fewer points than this give no correlation worth quoting (at n = 3 every ordering is
# +-1, +-0.5); below it the correlation is reported as undetermined, not as evidence.
MIN_CORR_POINTS = 4
# H2: the per-layer relation between quantization error and adapter divergence counts when
# Spearman's rho is at least 0.5: with >= 30 layer x module rows that is far beyond chance (the
# two-sided 5 % critical value is ~0.36 at n = 30), and a weaker monotone relation explains
# under a quarter of the rank variance, too little to steer which layers to keep in 16 bits.
LAYER_RHO = 0.5
# Failure mode "QLoRA is slower": median step times of two runs on a shared 2-core machine
# differ by a few percent between identical runs, so only a slowdown above 5 % is reported.
SLOWDOWN_RATIO = 1.05
# Failure mode "adapters do not stop": more than 10 % of greedy outputs running into
# compare.max_new_tokens without an eos is systematic; a few long wrong answers are not.
NO_STOP_RATE = 0.10
# Failure mode "per-task drop": a task family counts when QLoRA's exact match is lower by at
# least two examples' worth (one example flipping is the smallest possible change and happens
# by chance near a greedy decision boundary) and by more than that task's seed spread.
MIN_TASK_DROP_EXAMPLES = 2
# "The QLoRA update leans towards undoing the quantization error" when its alignment with
# W - deq(Q(W)) reaches at least half of the best cosine any matrix of its rank could reach
# (the Eckart-Young ceiling); below that most of the update points elsewhere.
ALIGNED_FRACTION = 0.5

# The rule of each failure mode, in words (the report lists them all, fired or not).
FM_RULES = {
    "quality_gap": "eval_loss_gap (QLoRA − LoRA, means over seeds) > eval_loss_seed_spread",
    "memory_not_saved": "peak_mem_mb_qlora ≥ peak_mem_mb_lora (the same memory measure for both)",
    "slower": f"step_time_ratio (QLoRA / LoRA median seconds per step) > {SLOWDOWN_RATIO}",
    "transfer_gap": ("the QLoRA adapter's eval loss on the unquantized base, unmerged or merged, "
                     "exceeds its eval loss on the quantized base by more than "
                     "eval_loss_seed_spread"),
    "quantized_lora": ("the LoRA adapter's eval loss on the quantized base exceeds its eval loss "
                       "on the unquantized base by more than eval_loss_seed_spread"),
    "threshold_unreachable": ("max(noise_floor_cos_sim_lora, noise_floor_cos_sim_qlora) ≤ "
                              "compare.cos_threshold"),
    "task_drops": (f"for a task family, LoRA − QLoRA exact match (means over seeds) is at least "
                   f"{MIN_TASK_DROP_EXAMPLES} examples' worth and larger than the task's "
                   "larger same-method seed spread"),
    "no_stop": (f"more than {NO_STOP_RATE:.0%} of a method's greedy outputs hit "
                "compare.max_new_tokens, while the eval references' 95th-percentile response "
                "length (with eos) fits within it"),
}

SUPPORTED = "supported"
PARTIAL = "partially supported"
REJECTED = "rejected"
NOT_FOUND = "not found in the tested ranks"


# ---------------------------------------------------------------------------------------------
# Result types
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Verdict:
    """The verdict on one hypothesis: ``status`` (one of :data:`SUPPORTED`, :data:`PARTIAL`,
    :data:`REJECTED`, :data:`NOT_FOUND`), the rule in words, the numbers behind it."""

    hypothesis: str
    status: str
    rule: str
    evidence: dict
    summary: str


@dataclasses.dataclass(frozen=True)
class FailureMode:
    """An observed failure: what a user sees, why (with the numbers), what to do."""

    key: str
    title: str
    symptom: str
    cause: str
    mitigation: str
    rule: str
    evidence: dict


@dataclasses.dataclass(frozen=True)
class Correlation:
    """Pearson and Spearman correlation of two columns over ``n`` complete rows (nan when
    n < :data:`MIN_CORR_POINTS` or a column is constant)."""

    x: str
    y: str
    n: int
    pearson: float
    spearman: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    h1: Verdict
    h2: Verdict
    h3: Verdict
    failure_modes: list[FailureMode]

    def to_json(self) -> dict:
        """JSON-safe dict (nan -> None, numpy scalars -> Python numbers)."""
        return _json_safe({"h1": dataclasses.asdict(self.h1), "h2": dataclasses.asdict(self.h2),
                           "h3": dataclasses.asdict(self.h3),
                           "failure_modes": [dataclasses.asdict(f) for f in self.failure_modes]})

    def lines(self) -> list[str]:
        """One line per verdict and failure mode, for the stage's console output."""
        out = [f"{v.hypothesis}: {v.status} -- {v.summary}" for v in (self.h1, self.h2, self.h3)]
        out += [f"failure mode: {f.title} -- {f.symptom}" for f in self.failure_modes]
        return out


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return None if math.isnan(obj) else float(obj)
    return obj


def _num(x: Any) -> float:
    return float(x) if x is not None else math.nan


def undoes_quantization_error(alignment_mean: float, alignment_ceiling_mean: float) -> bool:
    """Whether the QLoRA update leans towards W - deq(Q(W)): alignment at least
    :data:`ALIGNED_FRACTION` of the rank-r ceiling (False when either is undefined)."""
    return (alignment_mean > 0 and alignment_ceiling_mean > 0
            and alignment_mean >= ALIGNED_FRACTION * alignment_ceiling_mean)


def _alignment_text(alignment_mean: float, alignment_ceiling_mean: float) -> str:
    numbers = (f"cos(ΔW_QLoRA − ΔW_LoRA, W − deq(Q(W))) = {alignment_mean:.3f}, best possible "
               f"at this rank {alignment_ceiling_mean:.3f}")
    if undoes_quantization_error(alignment_mean, alignment_ceiling_mean):
        return f"the QLoRA update leans towards undoing the quantization error ({numbers})"
    return f"the QLoRA update does not undo the quantization error ({numbers})"


# ---------------------------------------------------------------------------------------------
# Evidence helpers
# ---------------------------------------------------------------------------------------------

def correlation(df: pd.DataFrame, x: str, y: str) -> Correlation:
    """Pearson and Spearman (Pearson of average ranks, which is Spearman's rho with ties;
    pandas' own Spearman needs scipy) of ``df[x]`` and ``df[y]`` over rows where both exist."""
    d = df[[x, y]].astype("float64").dropna()
    n = len(d)
    if n < MIN_CORR_POINTS or d[x].nunique() < 2 or d[y].nunique() < 2:
        return Correlation(x, y, n, math.nan, math.nan)
    return Correlation(x, y, n, float(d[x].corr(d[y])),
                       float(d[x].rank().corr(d[y].rank())))


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


def per_task_table(lora_runs: list[dict], qlora_runs: list[dict],
                   n_per_task: dict[str, int]) -> pd.DataFrame:
    """Exact match per task family from the runs' ``run.json`` (``exact_match_per_task``):
    mean over seeds per method, the drop LoRA - QLoRA, and each method's seed spread (max - min
    over its seeds; 0 with one seed). ``n`` = generated examples of the task."""
    tasks = sorted(set().union(*(r["exact_match_per_task"] for r in lora_runs + qlora_runs)))
    rows = []
    for t in tasks:
        lo = [r["exact_match_per_task"][t] for r in lora_runs if t in r["exact_match_per_task"]]
        ql = [r["exact_match_per_task"][t] for r in qlora_runs if t in r["exact_match_per_task"]]
        rows.append({"task": t, "n": int(n_per_task.get(t, 0)),
                     "exact_match_lora": float(np.mean(lo)) if lo else math.nan,
                     "exact_match_qlora": float(np.mean(ql)) if ql else math.nan,
                     "spread_lora": float(np.ptp(lo)) if lo else math.nan,
                     "spread_qlora": float(np.ptp(ql)) if ql else math.nan})
    df = pd.DataFrame(rows, columns=["task", "n", "exact_match_lora", "exact_match_qlora",
                                     "spread_lora", "spread_qlora"])
    return df.assign(drop=df["exact_match_lora"] - df["exact_match_qlora"])


def max_length_rate(generations: Iterable[dict], max_new_tokens: int) -> float:
    """Share of greedy outputs that ran into ``max_new_tokens`` without emitting eos
    (generation strips eos, so a stopped output is strictly shorter than the limit)."""
    rows = list(generations)
    if not rows:
        return math.nan
    return sum(len(r["output_ids"]) >= max_new_tokens for r in rows) / len(rows)


# ---------------------------------------------------------------------------------------------
# H1: weight similarity
# ---------------------------------------------------------------------------------------------

H1_RULE = (
    "Supported when the same-seed LoRA-vs-QLoRA update cosine cos(ΔW) exceeds "
    "compare.cos_threshold θ and the eval-loss gap |QLoRA − LoRA| is within the seed spread "
    "(largest same-method eval-loss difference between seeds). Partially supported when "
    "(a) both hold but weight similarity does not predict output similarity across the sweep "
    f"(Spearman ρ(cos(ΔW), token match) < {PREDICTIVE_RHO} over the rank and preset rows), or "
    "(b) cos(ΔW) misses θ but is at least the same-method noise floor (the larger of the "
    "LoRA-vs-LoRA and QLoRA-vs-QLoRA cosines between seeds), the gap is within the seed spread "
    f"and ρ ≥ {PREDICTIVE_RHO}: the idea holds with a noise-calibrated threshold, not with θ. "
    "Rejected otherwise: cos(ΔW) above θ while the gap exceeds the seed spread (weight "
    "similarity did not carry to the outputs), or cos(ΔW) below θ without (b) (rejected as "
    f"stated). Correlations need at least {MIN_CORR_POINTS} rows, else they are undetermined."
)


def verdict_h1(*, cos_sim: float, cos_threshold: float, noise_floor_lora: float,
               noise_floor_qlora: float, cross_seed_cos_sim: float, eval_loss_gap: float,
               seed_spread: float, weights_mb_lora: float, weights_mb_qlora: float,
               peak_mem_mb_lora: float, peak_mem_mb_qlora: float,
               sweep: pd.DataFrame) -> Verdict:
    """H1: are the LoRA and QLoRA updates nearly identical (cos > θ), is θ reachable at all
    (noise floor), and does weight similarity predict output similarity (``sweep``: rows of
    :func:`sweep_rows`)?"""
    floors = [v for v in (noise_floor_lora, noise_floor_qlora) if not math.isnan(v)]
    floor = max(floors) if floors else math.nan
    above = cos_sim > cos_threshold
    reachable = floor > cos_threshold  # nan compares False: unknown counts as not shown
    within = abs(eval_loss_gap) <= seed_spread
    at_floor = cos_sim >= floor
    c_tok = correlation(sweep, "cos_sim_mean", "token_match_rate")
    c_gap = correlation(sweep, "cos_sim_mean", "abs_eval_loss_gap")
    predicts = None if math.isnan(c_tok.spearman) else c_tok.spearman >= PREDICTIVE_RHO

    if above and within:
        status = PARTIAL if predicts is False else SUPPORTED
    elif above:
        status = REJECTED
    elif at_floor and within and predicts is True:
        status = PARTIAL
    else:
        status = REJECTED

    saving = 100 * (1 - weights_mb_qlora / weights_mb_lora) if weights_mb_lora else math.nan
    parts = [f"same-seed cos(ΔW) LoRA vs QLoRA = {cos_sim:.3f} "
             f"{'>' if above else '≤'} θ = {cos_threshold:.2f}"]
    if math.isnan(floor):
        parts.append("the same-method noise floor is unknown (no seed pairs)")
    elif reachable:
        parts.append(f"θ is reachable between runs of one method (noise floor {floor:.3f})")
    else:
        parts.append(f"θ is not reached even between two runs of one method that differ only "
                     f"in seed (LoRA {noise_floor_lora:.3f}, QLoRA {noise_floor_qlora:.3f}), so "
                     "no pair of independently trained adapters passes it at this training "
                     "length")
    if not math.isnan(floor) and not above:
        parts.append("quantization moved ΔW less than a seed change does" if at_floor else
                     "quantization moved ΔW more than a seed change does")
    parts.append(f"eval-loss gap {eval_loss_gap:+.4f} is "
                 f"{'within' if within else 'beyond'} the seed spread {seed_spread:.4f}")
    if predicts is None:
        parts.append(f"whether weight similarity predicts output similarity is undetermined "
                     f"(n = {c_tok.n})")
    else:
        parts.append(f"weight similarity {'predicts' if predicts else 'does not predict'} "
                     f"token match across the sweep (Spearman ρ = {c_tok.spearman:.2f}, "
                     f"n = {c_tok.n})")
    if within:
        conclusion = (f"function-level gap within seed noise → QLoRA preferable on memory "
                      f"(weights {weights_mb_lora:.1f} → {weights_mb_qlora:.1f} MB, "
                      f"{saving:.1f} % less")
        conclusion += (")" if peak_mem_mb_qlora < peak_mem_mb_lora else
                       f"; but process peak {peak_mem_mb_qlora:.1f} MB ≥ LoRA's "
                       f"{peak_mem_mb_lora:.1f} MB on this machine)")
    else:
        conclusion = "function-level gap beyond seed noise → LoRA gives better quality here"
    lead = "Rejected as stated: " if status == REJECTED and not above else ""
    body = "; ".join(parts)
    summary = (lead + body[0].upper() + body[1:]
               + f". {conclusion[0].upper()}{conclusion[1:]}.")

    evidence = {
        "cos_sim_mean": cos_sim, "cos_threshold": cos_threshold, "above_threshold": above,
        "noise_floor_cos_sim_lora": noise_floor_lora,
        "noise_floor_cos_sim_qlora": noise_floor_qlora, "noise_floor": floor,
        "threshold_reachable": reachable, "at_or_above_noise_floor": at_floor,
        "cross_seed_cos_sim": cross_seed_cos_sim,
        "eval_loss_gap": eval_loss_gap, "eval_loss_seed_spread": seed_spread,
        "gap_within_seed_spread": within,
        "corr_cos_vs_token_match": c_tok.as_dict(), "corr_cos_vs_abs_gap": c_gap.as_dict(),
        "weight_similarity_predicts_outputs": predicts,
        "sweep_rows": list(sweep["label"]),
        "weights_mb_lora": weights_mb_lora, "weights_mb_qlora": weights_mb_qlora,
        "peak_mem_mb_lora": peak_mem_mb_lora, "peak_mem_mb_qlora": peak_mem_mb_qlora,
    }
    return Verdict("H1", status, H1_RULE, evidence, summary)


# ---------------------------------------------------------------------------------------------
# H2: module sensitivity
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# H3: rank threshold
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# Failure modes: each returns a FailureMode when its rule fires, else None
# ---------------------------------------------------------------------------------------------

def fm_quality_gap(*, eval_loss_lora: float, eval_loss_qlora: float, eval_loss_gap: float,
                   seed_spread: float, base_eval_loss: float, base_eval_loss_quantized: float,
                   alignment_mean: float, alignment_ceiling_mean: float) -> FailureMode | None:
    """QLoRA's eval loss is worse than LoRA's by more than the seed spread."""
    if not eval_loss_gap > seed_spread:
        return None
    base_hit = base_eval_loss_quantized - base_eval_loss
    return FailureMode(
        "quality_gap", "QLoRA quality below LoRA beyond seed noise",
        symptom=(f"QLoRA eval loss {eval_loss_qlora:.4f} vs LoRA {eval_loss_lora:.4f} (means "
                 f"over seeds; gap "
                 f"{eval_loss_gap:+.4f} > seed spread {seed_spread:.4f})."),
        cause=(f"The adapter trains against deq(Q(W)), not W: quantization alone raised the base "
               f"model's eval loss by {base_hit:+.4f} ({base_eval_loss:.4f} → "
               f"{base_eval_loss_quantized:.4f}), and "
               f"{_alignment_text(alignment_mean, alignment_ceiling_mean)}; a rank-r update "
               "cannot cancel an error that is close to full rank."),
        mitigation=("Use a higher rank (see the rank threshold) or adapt more modules; keep the "
                    "most error-prone layers in 16 bits; train longer; or use 16-bit LoRA when "
                    "memory allows."),
        rule=FM_RULES["quality_gap"],
        evidence={"eval_loss_lora": eval_loss_lora, "eval_loss_qlora": eval_loss_qlora,
                  "eval_loss_gap": eval_loss_gap, "eval_loss_seed_spread": seed_spread,
                  "base_eval_loss": base_eval_loss,
                  "base_eval_loss_quantized": base_eval_loss_quantized,
                  "alignment_mean": alignment_mean,
                  "alignment_ceiling_mean": alignment_ceiling_mean})


def fm_memory_not_saved(*, peak_mem_mb_lora: float, peak_mem_mb_qlora: float,
                        weights_mb_lora: float, weights_mb_qlora: float,
                        growth_mb_lora: float, growth_mb_qlora: float,
                        memory_measure: str) -> FailureMode | None:
    """QLoRA's peak memory during training is not below LoRA's."""
    if not peak_mem_mb_qlora >= peak_mem_mb_lora:
        return None
    on_cuda = "CUDA" in memory_measure
    weight_saving = weights_mb_lora - weights_mb_qlora
    cause = (f"The weights shrink by {weight_saving:.1f} MB ({weights_mb_lora:.1f} → "
             f"{weights_mb_qlora:.1f} MB), but the peak is not set by the weights: it grew by "
             f"{growth_mb_lora:.1f} MB (LoRA) and {growth_mb_qlora:.1f} MB (QLoRA) during "
             "training, which is activations, gradients of the activations, optimizer state "
             "and allocator caches")
    if on_cuda:
        cause += "; at this model size they dominate the weights."
    else:
        cause += ("; on the CPU each 4-bit layer is also dequantized into a full-size "
                  "temporary for every matmul (forward and backward), and the measure is the "
                  "whole process's resident memory, including the framework and its libraries, "
                  "which dominate a small model.")
    return FailureMode(
        "memory_not_saved", "QLoRA does not lower peak memory",
        symptom=(f"Peak memory QLoRA {peak_mem_mb_qlora:.1f} MB ≥ LoRA {peak_mem_mb_lora:.1f} "
                 f"MB ({memory_measure})."),
        cause=cause,
        mitigation=("QLoRA pays off when the frozen weights dominate memory: larger models and "
                    "CUDA. On a small model or on the CPU, use 16-bit LoRA, or cut activation "
                    "memory (smaller batch or sequence length, gradient checkpointing)."),
        rule=FM_RULES["memory_not_saved"],
        evidence={"peak_mem_mb_lora": peak_mem_mb_lora, "peak_mem_mb_qlora": peak_mem_mb_qlora,
                  "weights_mb_lora": weights_mb_lora, "weights_mb_qlora": weights_mb_qlora,
                  "peak_mem_growth_mb_lora": growth_mb_lora,
                  "peak_mem_growth_mb_qlora": growth_mb_qlora, "memory_measure": memory_measure})


def fm_slower(*, step_time_ratio: float, tokens_per_s_lora: float, tokens_per_s_qlora: float,
              gradient_checkpointing: bool) -> FailureMode | None:
    """QLoRA steps take more than :data:`SLOWDOWN_RATIO` times LoRA's."""
    if not step_time_ratio > SLOWDOWN_RATIO:
        return None
    return FailureMode(
        "slower", "QLoRA trains slower",
        symptom=(f"QLoRA's median step takes {step_time_ratio:.2f}× as long as LoRA's "
                 f"(throughput over all timed steps: {tokens_per_s_qlora:.0f} vs "
                 f"{tokens_per_s_lora:.0f} tokens/s; the median ignores the few long steps that "
                 "dominate the total)."),
        cause=("Every 4-bit weight is dequantized to the compute dtype for each matmul, in the "
               "forward pass and again in the backward pass; the matmul itself costs the same as "
               "LoRA's, so the dequantization is pure overhead."
               + (" QLoRA also trained with gradient checkpointing (train.kbit_prep), which "
                  "recomputes the forward pass during the backward pass; part of the slowdown "
                  "is that, not quantization." if gradient_checkpointing else "")),
        mitigation=("Accept the slowdown as the price of memory, or use 16-bit LoRA when the "
                    "weights fit; on CUDA, bitsandbytes' fused kernels make the overhead smaller."),
        rule=FM_RULES["slower"],
        evidence={"step_time_ratio": step_time_ratio, "tokens_per_s_lora": tokens_per_s_lora,
                  "tokens_per_s_qlora": tokens_per_s_qlora, "threshold": SLOWDOWN_RATIO,
                  "gradient_checkpointing": gradient_checkpointing})


def fm_transfer(*, native_eval_loss: float, on_base_eval_loss: float, merged_eval_loss: float,
                native_exact_match: float, on_base_exact_match: float,
                merged_exact_match: float, seed_spread: float, alignment_mean: float,
                alignment_ceiling_mean: float) -> FailureMode | None:
    """The QLoRA adapter on the unquantized base (unmerged or merged) is worse than on the
    quantized base it was trained on, by more than the seed spread."""
    d_base = on_base_eval_loss - native_eval_loss
    d_merged = merged_eval_loss - native_eval_loss
    if not (d_base > seed_spread or d_merged > seed_spread):
        return None
    return FailureMode(
        "transfer_gap", "QLoRA adapter degrades on the unquantized base",
        symptom=(f"QLoRA adapter eval loss on its quantized base {native_eval_loss:.4f}, on the "
                 f"unquantized base {on_base_eval_loss:.4f} ({d_base:+.4f}), merged "
                 f"{merged_eval_loss:.4f} ({d_merged:+.4f}); exact match "
                 f"{native_exact_match:.3f} → {on_base_exact_match:.3f} / "
                 f"{merged_exact_match:.3f}."),
        cause=("The adapter was fitted to the quantized model deq(Q(W)) + ΔW; on W every frozen "
               "layer differs by the quantization error the adapter was trained alongside. "
               + ("Here " + _alignment_text(alignment_mean, alignment_ceiling_mean)
                  + ", so that compensation becomes an error of its own on W."
                  if undoes_quantization_error(alignment_mean, alignment_ceiling_mean) else
                  "Here " + _alignment_text(alignment_mean, alignment_ceiling_mean)
                  + ": the co-adaptation is spread through the network's function, not a "
                    "low-rank correction that could be subtracted.")),
        mitigation=("Serve the adapter on the same quantized base it was trained on, or merge it "
                    "into deq(Q(W)) instead of W; to deploy on the 16-bit base, fine-tune a "
                    "few steps there."),
        rule=FM_RULES["transfer_gap"],
        evidence={"native_eval_loss": native_eval_loss, "on_base_eval_loss": on_base_eval_loss,
                  "merged_eval_loss": merged_eval_loss, "native_exact_match": native_exact_match,
                  "on_base_exact_match": on_base_exact_match,
                  "merged_exact_match": merged_exact_match,
                  "eval_loss_seed_spread": seed_spread, "alignment_mean": alignment_mean,
                  "alignment_ceiling_mean": alignment_ceiling_mean})


def fm_quantized_lora(*, native_eval_loss: float, on_quantized_eval_loss: float,
                      native_exact_match: float, on_quantized_exact_match: float,
                      seed_spread: float) -> FailureMode | None:
    """The LoRA adapter on the quantized base (quantize-after-training) is worse than on the
    base it was trained on, by more than the seed spread."""
    delta = on_quantized_eval_loss - native_eval_loss
    if not delta > seed_spread:
        return None
    return FailureMode(
        "quantized_lora", "LoRA adapter degrades on the quantized base",
        symptom=(f"LoRA adapter eval loss {native_eval_loss:.4f} on its base, "
                 f"{on_quantized_eval_loss:.4f} on the 4-bit base ({delta:+.4f}); exact match "
                 f"{native_exact_match:.3f} → {on_quantized_exact_match:.3f}."),
        cause=("The adapter was trained on W and never saw the quantization error W − deq(Q(W)); "
               "quantizing the base after training adds that error unchanged."),
        mitigation=("Train with QLoRA when the model will be served in 4 bits, or serve the "
                    "LoRA adapter on the unquantized base."),
        rule=FM_RULES["quantized_lora"],
        evidence={"native_eval_loss": native_eval_loss,
                  "on_quantized_eval_loss": on_quantized_eval_loss,
                  "native_exact_match": native_exact_match,
                  "on_quantized_exact_match": on_quantized_exact_match,
                  "eval_loss_seed_spread": seed_spread})


def fm_threshold_unreachable(*, cos_threshold: float, noise_floor_lora: float,
                             noise_floor_qlora: float, same_seed_cos_sim: float,
                             cross_seed_cos_sim: float) -> FailureMode | None:
    """The weight-level threshold is not reached even between two runs of one method."""
    floors = [v for v in (noise_floor_lora, noise_floor_qlora) if not math.isnan(v)]
    if not floors or max(floors) > cos_threshold:
        return None
    return FailureMode(
        "threshold_unreachable", "Weight-similarity threshold unreachable",
        symptom=(f"cos(ΔW) between two runs of the same method that differ only in seed is "
                 f"{noise_floor_lora:.3f} (LoRA) and {noise_floor_qlora:.3f} (QLoRA), below "
                 f"θ = {cos_threshold:.2f}; LoRA vs QLoRA is {same_seed_cos_sim:.3f} with the "
                 f"same seed and {cross_seed_cos_sim:.3f} across seeds."),
        cause=("Short training from different initializations and data orders lands on "
               "different low-rank updates with similar effect: only the top singular "
               "directions of two adapters overlap (LoRA paper, Hu et al. 2021, Sec. 7.2), so "
               "cos(ΔW) measures the parametrization more than the function."),
        mitigation=("Judge LoRA vs QLoRA on function-level numbers against the seed spread "
                    "(eval loss, KL, token match), or calibrate the weight threshold to the "
                    "measured noise floor; compare same-seed pairs to isolate quantization."),
        rule=FM_RULES["threshold_unreachable"],
        evidence={"cos_threshold": cos_threshold, "noise_floor_cos_sim_lora": noise_floor_lora,
                  "noise_floor_cos_sim_qlora": noise_floor_qlora,
                  "cos_sim_mean": same_seed_cos_sim, "cross_seed_cos_sim": cross_seed_cos_sim})


def fm_task_drops(per_task: pd.DataFrame) -> FailureMode | None:
    """Task families where QLoRA's exact match is lower than LoRA's by at least
    :data:`MIN_TASK_DROP_EXAMPLES` examples and by more than the task's seed spread."""
    d = per_task.assign(noise=per_task[["spread_lora", "spread_qlora"]].max(axis=1),
                        min_drop=MIN_TASK_DROP_EXAMPLES / per_task["n"].clip(lower=1))
    hit = d[(d["drop"] >= d["min_drop"] - 1e-9) & (d["drop"] > d["noise"])]
    if hit.empty:
        return None
    listing = "; ".join(f"{r.task}: {r.exact_match_lora:.3f} → {r.exact_match_qlora:.3f} "
                        f"(n = {r.n}, seed spread {r.noise:.3f})" for r in hit.itertuples())
    return FailureMode(
        "task_drops", "Exact match drops on some task families",
        symptom=f"QLoRA answers fewer examples exactly on {len(hit)} task famil"
                f"{'y' if len(hit) == 1 else 'ies'}: {listing}.",
        cause=("The eval loss averages over task families and hides a loss concentrated in a "
               "few: the quantization error moves every frozen weight, and the task families "
               "differ in how close their greedy answers sit to a decision boundary. With a "
               "handful of examples per task part of any drop is sampling noise, which is why "
               "the rule requires it to exceed the seed spread and two examples."),
        mitigation=("Check the affected tasks with more eval examples (data.n_eval, "
                    "compare.n_generate) and more seeds; if the drop holds, raise the rank or "
                    "adapt more modules, or use 16-bit LoRA for those tasks."),
        rule=FM_RULES["task_drops"],
        evidence={"tasks": [{"task": r.task, "n": int(r.n),
                             "exact_match_lora": float(r.exact_match_lora),
                             "exact_match_qlora": float(r.exact_match_qlora),
                             "drop": float(r.drop), "seed_spread": float(r.noise)}
                            for r in hit.itertuples()]})


def fm_no_stop(*, rate_lora: float, rate_qlora: float, max_new_tokens: int,
               reference_tokens_p95: float) -> FailureMode | None:
    """Adapters that do not learn to stop: many greedy outputs run into max_new_tokens although
    the reference answers (with eos) fit within it."""
    rates = {"LoRA": rate_lora, "QLoRA": rate_qlora}
    bad = {m: r for m, r in rates.items() if r > NO_STOP_RATE}
    if not bad or not reference_tokens_p95 <= max_new_tokens:
        return None
    who = " and ".join(bad)
    return FailureMode(
        "no_stop", f"{who} outputs do not stop",
        symptom=(f"{rate_lora:.1%} of LoRA and {rate_qlora:.1%} of QLoRA greedy outputs run "
                 f"into compare.max_new_tokens = {max_new_tokens} without an eos, although 95 % "
                 f"of the reference answers take ≤ {reference_tokens_p95:.0f} tokens with eos."),
        cause=("The eos token is one position per example in the response-only loss; with few "
               "training steps the adapter can learn the answer before it learns to end it, "
               "and then continues with more text (the outputs are in each run's "
               "generations.jsonl)."),
        mitigation=("Train longer or on more examples; check that eos is in the labels of "
                    "every untruncated example; at inference, stop on a stop string."),
        rule=FM_RULES["no_stop"],
        evidence={"rate_lora": rate_lora, "rate_qlora": rate_qlora,
                  "max_new_tokens": max_new_tokens,
                  "reference_tokens_p95": reference_tokens_p95, "threshold": NO_STOP_RATE})


# ---------------------------------------------------------------------------------------------
# Everything at once
# ---------------------------------------------------------------------------------------------

def diagnose(*, metrics: dict, ranks: pd.DataFrame, modules: pd.DataFrame, layers: pd.DataFrame,
             per_task: pd.DataFrame, native_lora: dict, native_qlora: dict,
             eval_loss_lora_mean: float, eval_loss_qlora_mean: float,
             gradient_checkpointing: bool,
             no_stop_rate_lora: float, no_stop_rate_qlora: float, reference_tokens_p95: float,
             memory_measure: str, cos_threshold: float, lora_r: int, lora_targets: str,
             max_new_tokens: int) -> Diagnosis:
    """H1-H3 and the failure modes whose rules fire. ``metrics`` is ``reports/metrics.json``;
    ``native_lora`` / ``native_qlora`` are the ``run.json`` of the headline-seed runs whose
    adapters the transfer check used; ``eval_loss_*_mean`` the means over the seed runs (the
    terms of ``eval_loss_gap``); ``gradient_checkpointing``: QLoRA trained with it
    (train.kbit_prep)."""
    m = {k: _num(v) for k, v in metrics.items()}
    spread = m["eval_loss_seed_spread"]
    h1 = verdict_h1(cos_sim=m["cos_sim_mean"], cos_threshold=cos_threshold,
                    noise_floor_lora=m["noise_floor_cos_sim_lora"],
                    noise_floor_qlora=m["noise_floor_cos_sim_qlora"],
                    cross_seed_cos_sim=m["cross_seed_cos_sim"],
                    eval_loss_gap=m["eval_loss_gap"], seed_spread=spread,
                    weights_mb_lora=m["weights_mb_lora"], weights_mb_qlora=m["weights_mb_qlora"],
                    peak_mem_mb_lora=m["peak_mem_mb_lora"],
                    peak_mem_mb_qlora=m["peak_mem_mb_qlora"],
                    sweep=sweep_rows(ranks, modules, lora_targets))
    h2 = verdict_h2(modules=modules, layers=layers, seed_spread=spread)
    h3 = verdict_h3(ranks=ranks, seed_spread=spread, lora_r=lora_r)
    modes = [
        fm_quality_gap(eval_loss_lora=eval_loss_lora_mean, eval_loss_qlora=eval_loss_qlora_mean,
                       eval_loss_gap=m["eval_loss_gap"], seed_spread=spread,
                       base_eval_loss=m["base_eval_loss"],
                       base_eval_loss_quantized=m["base_eval_loss_quantized"],
                       alignment_mean=m["alignment_mean"],
                       alignment_ceiling_mean=m["alignment_ceiling_mean"]),
        fm_memory_not_saved(peak_mem_mb_lora=m["peak_mem_mb_lora"],
                            peak_mem_mb_qlora=m["peak_mem_mb_qlora"],
                            weights_mb_lora=m["weights_mb_lora"],
                            weights_mb_qlora=m["weights_mb_qlora"],
                            growth_mb_lora=m["peak_mem_growth_mb_lora"],
                            growth_mb_qlora=m["peak_mem_growth_mb_qlora"],
                            memory_measure=memory_measure),
        fm_slower(step_time_ratio=m["step_time_ratio"], tokens_per_s_lora=m["tokens_per_s_lora"],
                  tokens_per_s_qlora=m["tokens_per_s_qlora"],
                  gradient_checkpointing=gradient_checkpointing),
        fm_transfer(native_eval_loss=_num(native_qlora["eval_loss"]),
                    on_base_eval_loss=m["transfer_qlora_on_base_eval_loss"],
                    merged_eval_loss=m["transfer_qlora_merged_eval_loss"],
                    native_exact_match=_num(native_qlora["exact_match"]),
                    on_base_exact_match=m["transfer_qlora_on_base_exact_match"],
                    merged_exact_match=m["transfer_qlora_merged_exact_match"],
                    seed_spread=spread, alignment_mean=m["alignment_mean"],
                    alignment_ceiling_mean=m["alignment_ceiling_mean"]),
        fm_quantized_lora(native_eval_loss=_num(native_lora["eval_loss"]),
                          on_quantized_eval_loss=m["transfer_lora_on_quantized_eval_loss"],
                          native_exact_match=_num(native_lora["exact_match"]),
                          on_quantized_exact_match=m["transfer_lora_on_quantized_exact_match"],
                          seed_spread=spread),
        fm_threshold_unreachable(cos_threshold=cos_threshold,
                                 noise_floor_lora=m["noise_floor_cos_sim_lora"],
                                 noise_floor_qlora=m["noise_floor_cos_sim_qlora"],
                                 same_seed_cos_sim=m["cos_sim_mean"],
                                 cross_seed_cos_sim=m["cross_seed_cos_sim"]),
        fm_task_drops(per_task),
        fm_no_stop(rate_lora=no_stop_rate_lora, rate_qlora=no_stop_rate_qlora,
                   max_new_tokens=max_new_tokens, reference_tokens_p95=reference_tokens_p95),
    ]
    return Diagnosis(h1, h2, h3, [f for f in modes if f is not None])
