"""Failure modes: each ``fm_*`` returns a :class:`~qlora_diag.report.verdict_types.FailureMode`
when its rule fires on this run's numbers, else None. Thresholds that are not knobs of
``params.yaml`` are the named constants below, each with why."""
from __future__ import annotations

import math

import pandas as pd

from qlora_diag.report.evidence import alignment_text, undoes_quantization_error
from qlora_diag.report.verdict_types import FailureMode

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
               f"{alignment_text(alignment_mean, alignment_ceiling_mean)}; a rank-r update "
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
               + ("Here " + alignment_text(alignment_mean, alignment_ceiling_mean)
                  + ", so that compensation becomes an error of its own on W."
                  if undoes_quantization_error(alignment_mean, alignment_ceiling_mean) else
                  "Here " + alignment_text(alignment_mean, alignment_ceiling_mean)
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
