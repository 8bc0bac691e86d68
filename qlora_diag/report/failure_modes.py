"""Failure modes: each ``fm_*`` returns a :class:`~qlora_diag.report.verdict_types.FailureMode`
when its rule fires on this run's numbers, else None. Thresholds that are not knobs of
``params.yaml`` are the named constants below, each with why."""
from __future__ import annotations

import math

from qlora_diag.report import statistics as st
from qlora_diag.report.evidence import alignment_text, undoes_quantization_error
from qlora_diag.report.paired import Comparison
from qlora_diag.report.verdict_types import FailureMode

# Failure mode "QLoRA is slower": median step times of two runs on a shared 2-core machine
# differ by a few percent between identical runs, so only a slowdown above 5 % is reported.
SLOWDOWN_RATIO = 1.05
# Failure mode "adapters do not stop": more than 10 % of greedy outputs running into
# compare.max_new_tokens without an eos is systematic; a few long wrong answers are not.
NO_STOP_RATE = 0.10
# The rule of each failure mode, in words (the report lists them all, fired or not).
FM_RULES = {
    "quality_gap": ("the headline paired eval-loss gap QLoRA − LoRA is decided QLoRA worse "
                    "(95 % interval excludes 0 and the estimate is beyond compare.margin)"),
    "memory_not_saved": "peak_mem_mb_qlora ≥ peak_mem_mb_lora (the same memory measure for both)",
    "slower": f"step_time_ratio (QLoRA / LoRA median seconds per step) > {SLOWDOWN_RATIO}",
    "transfer_gap": ("the QLoRA adapter's eval loss on the unquantized base, unmerged or merged, "
                     "exceeds its eval loss on the quantized base (both from the compare pass) "
                     "by more than compare.margin; one adapter, no interval (the transfer "
                     "passes keep no per-example records)"),
    "quantized_lora": ("the LoRA adapter's eval loss on the quantized base exceeds its eval loss "
                       "on the unquantized base (both from the compare pass) by more than "
                       "compare.margin; one adapter, no interval"),
    "threshold_unreachable": ("max(noise_floor_cos_sim_lora, noise_floor_cos_sim_qlora) ≤ "
                              "compare.cos_threshold"),
    "task_drops": ("for a task family, the paired exact-match gap QLoRA − LoRA (generated "
                   "examples of every seed) is decided QLoRA worse against "
                   "compare.margin_exact_match"),
    "no_stop": (f"more than {NO_STOP_RATE:.0%} of a method's greedy outputs hit "
                "compare.max_new_tokens, while the eval references' 95th-percentile response "
                "length (with eos) fits within it"),
}


def fm_quality_gap(*, headline: Comparison, eval_loss_lora: float, eval_loss_qlora: float,
                   base_eval_loss: float, base_eval_loss_quantized: float,
                   alignment_mean: float, alignment_ceiling_mean: float) -> FailureMode | None:
    """The headline paired eval-loss gap is decided *QLoRA worse*."""
    if headline.label != st.QLORA_WORSE:
        return None
    base_hit = base_eval_loss_quantized - base_eval_loss
    return FailureMode(
        "quality_gap", "QLoRA quality below LoRA beyond the margin",
        symptom=(f"QLoRA eval loss {eval_loss_qlora:.4f} vs LoRA {eval_loss_lora:.4f} (means "
                 f"over the paired seeds). {headline.analysis.sentence}"),
        cause=(f"The adapter trains against deq(Q(W)), not W: quantization alone raised the base "
               f"model's eval loss by {base_hit:+.4f} ({base_eval_loss:.4f} → "
               f"{base_eval_loss_quantized:.4f}, one pass, no interval), and "
               f"{alignment_text(alignment_mean, alignment_ceiling_mean)}."),
        mitigation=("Options to test: a higher rank (see the rank threshold), more modules, the "
                    "most error-prone layers in 16 bits, longer training, or 16-bit LoRA when "
                    "memory allows."),
        rule=FM_RULES["quality_gap"],
        evidence={"eval_loss_lora": eval_loss_lora, "eval_loss_qlora": eval_loss_qlora,
                  **headline.fields(), "base_eval_loss": base_eval_loss,
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


def fm_transfer(*, eval_loss_change_base: float, eval_loss_change_merged: float,
                exact_match_change_base: float, exact_match_change_merged: float,
                margin: float, alignment_mean: float,
                alignment_ceiling_mean: float) -> FailureMode | None:
    """The QLoRA adapter on the unquantized base (unmerged or merged) has a higher eval loss
    than on its quantized base by more than ``margin`` (changes from one compare pass:
    transfer.json's ``eval_loss_change``)."""
    if not (eval_loss_change_base > margin or eval_loss_change_merged > margin):
        return None
    return FailureMode(
        "transfer_gap", "QLoRA adapter degrades on the unquantized base",
        symptom=(f"QLoRA adapter eval loss on the unquantized base {eval_loss_change_base:+.4f} "
                 f"nats/token against its quantized base, merged {eval_loss_change_merged:+.4f} "
                 f"(margin {margin:g}; one adapter of the main seed, no interval); exact match "
                 f"{100 * exact_match_change_base:+.1f} / {100 * exact_match_change_merged:+.1f} "
                 "points."),
        cause=("The adapter was fitted to the quantized model deq(Q(W)) + ΔW; on W every frozen "
               "layer differs by the quantization error the adapter was trained alongside. Here "
               + alignment_text(alignment_mean, alignment_ceiling_mean) + "."),
        mitigation=("Serve the adapter on the same quantized base it was trained on, or merge it "
                    "into deq(Q(W)) instead of W; to deploy on the 16-bit base, fine-tune a "
                    "few steps there."),
        rule=FM_RULES["transfer_gap"],
        evidence={"eval_loss_change_base": eval_loss_change_base,
                  "eval_loss_change_merged": eval_loss_change_merged,
                  "exact_match_change_base": exact_match_change_base,
                  "exact_match_change_merged": exact_match_change_merged, "margin": margin,
                  "alignment_mean": alignment_mean,
                  "alignment_ceiling_mean": alignment_ceiling_mean,
                  "undoes_quantization_error": undoes_quantization_error(
                      alignment_mean, alignment_ceiling_mean)})


def fm_quantized_lora(*, eval_loss_change: float, exact_match_change: float,
                      margin: float) -> FailureMode | None:
    """The LoRA adapter on the quantized base (quantize-after-training) has a higher eval loss
    than on its own base by more than ``margin`` (one compare pass)."""
    if not eval_loss_change > margin:
        return None
    return FailureMode(
        "quantized_lora", "LoRA adapter degrades on the quantized base",
        symptom=(f"LoRA adapter eval loss on the 4-bit base {eval_loss_change:+.4f} nats/token "
                 f"against its own base (margin {margin:g}; one adapter of the main seed, no "
                 f"interval); exact match {100 * exact_match_change:+.1f} points."),
        cause=("The adapter was trained on W and never saw the quantization error W − deq(Q(W)); "
               "quantizing the base after training adds that error unchanged."),
        mitigation=("Serve the LoRA adapter on the unquantized base; whether training with QLoRA "
                    "does better on the 4-bit base is not tested here."),
        rule=FM_RULES["quantized_lora"],
        evidence={"eval_loss_change": eval_loss_change,
                  "exact_match_change": exact_match_change, "margin": margin})


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
        mitigation=("Judge LoRA vs QLoRA on paired function-level gaps against the margin "
                    "(eval loss, KL, token match), or calibrate the weight threshold to the "
                    "measured noise floor; compare cross-seed LoRA-vs-QLoRA pairs with the same-method "
                    "floor (same-seed pairs share the adapter init)."),
        rule=FM_RULES["threshold_unreachable"],
        evidence={"cos_threshold": cos_threshold, "noise_floor_cos_sim_lora": noise_floor_lora,
                  "noise_floor_cos_sim_qlora": noise_floor_qlora,
                  "cos_sim_mean": same_seed_cos_sim, "cross_seed_cos_sim": cross_seed_cos_sim})


def fm_task_drops(families: dict[str, Comparison]) -> FailureMode | None:
    """Task families whose paired exact-match gap is decided *QLoRA worse*."""
    hit = {f: c for f, c in families.items() if c.label == st.QLORA_WORSE}
    if not hit:
        return None
    listing = " ".join(c.analysis.sentence for c in hit.values())
    return FailureMode(
        "task_drops", "Exact match drops on some task families",
        symptom=f"QLoRA answers fewer examples exactly on {len(hit)} task famil"
                f"{'y' if len(hit) == 1 else 'ies'}: {listing}",
        cause=("The eval loss averages over task families and can hide a loss concentrated in a "
               "few. Each family is tested on its own at 5 %, without a multiplicity "
               "correction over the families."),
        mitigation=("Check the affected tasks with more eval examples (data.n_eval, "
                    "compare.n_generate) and more seeds before acting on them."),
        rule=FM_RULES["task_drops"],
        evidence={"tasks": {f: c.fields() for f, c in hit.items()}})


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
