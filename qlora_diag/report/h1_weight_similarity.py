"""H1, weight similarity: are the LoRA and QLoRA updates ΔW nearly identical (cos(ΔW) above
compare.cos_threshold θ), is θ reachable at all between two runs of one method (the noise
floor), and does weight similarity predict output similarity across the sweep?"""
from __future__ import annotations

import math

import pandas as pd

from qlora_diag.report.evidence import MIN_CORR_POINTS, correlation
from qlora_diag.report.verdict_types import PARTIAL, REJECTED, SUPPORTED, Verdict

# A Spearman correlation of at least 0.7 between weight similarity and output similarity
# over the sweep rows counts as "weight similarity predicts output similarity". 0.714 is the
# one-sided 5 % critical value of Spearman's rho at n = 7 (4 ranks + 3 other presets, the
# default sweep); weaker correlations are indistinguishable from chance at that n.
PREDICTIVE_RHO = 0.7

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
