"""Verdict rules on hand-made numbers: every branch of H1-H3 and every failure mode, firing
and not firing."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from qlora_diag.report import evidence
from qlora_diag.report import failure_modes as fm
from qlora_diag.report import verdict_types as vt
from qlora_diag.report import verdicts as vd
from qlora_diag.report.h1_weight_similarity import verdict_h1
from qlora_diag.report.h2_module_sensitivity import verdict_h2
from qlora_diag.report.h3_rank_threshold import find_r_star, verdict_h3

THETA = 0.95
SPREAD = 0.05


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def test_correlation_spearman_is_rank_based_and_pearson_is_not():
    x = np.arange(1, 7, dtype=float)
    df = pd.DataFrame({"x": x, "y": np.exp(x)})  # monotone, not linear
    c = evidence.correlation(df, "x", "y")
    assert c.n == 6 and c.spearman == pytest.approx(1.0) and c.pearson < 0.95
    assert c.pearson == pytest.approx(np.corrcoef(x, np.exp(x))[0, 1])


def test_correlation_with_ties_matches_pearson_of_average_ranks():
    df = pd.DataFrame({"x": [1, 2, 3, 4, 5.0], "y": [5, 6, 7, 8, 7.0]})
    ranks_y = [1, 2, 3.5, 5, 3.5]
    assert evidence.correlation(df, "x", "y").spearman == pytest.approx(
        np.corrcoef([1, 2, 3, 4, 5], ranks_y)[0, 1])


def test_correlation_undetermined_below_min_points_or_constant():
    few = pd.DataFrame({"x": [1.0, 2, 3], "y": [1.0, 2, 3]})
    assert math.isnan(evidence.correlation(few, "x", "y").spearman)
    flat = pd.DataFrame({"x": [1.0, 2, 3, 4], "y": [1.0, 1, 1, 1]})
    assert math.isnan(evidence.correlation(flat, "x", "y").pearson)
    with_nan = pd.DataFrame({"x": [1.0, 2, 3, 4, np.nan], "y": [1.0, 2, 3, 4, 5]})
    assert evidence.correlation(with_nan, "x", "y").n == 4


def test_sweep_rows_drops_the_duplicate_headline_preset():
    ranks = pd.DataFrame({"rank": [2, 8], "cos_sim_mean": [0.4, 0.5],
                          "token_match_rate": [0.7, 0.8], "eval_loss_gap": [0.1, -0.02]})
    modules = pd.DataFrame({"targets": ["qv", "kv"], "cos_sim_mean": [0.5, 0.6],
                            "token_match_rate": [0.8, 0.9], "eval_loss_gap": [-0.02, 0.03]})
    rows = evidence.sweep_rows(ranks, modules, "qv")
    assert list(rows["label"]) == ["r=2", "r=8", "kv"]
    assert list(rows["abs_eval_loss_gap"]) == [0.1, 0.02, 0.03]


def test_per_task_table_means_and_spreads_over_seeds():
    lora = [{"exact_match_per_task": {"a": 0.5, "b": 1.0}},
            {"exact_match_per_task": {"a": 0.75, "b": 1.0}}]
    qlora = [{"exact_match_per_task": {"a": 0.25, "b": 1.0}},
             {"exact_match_per_task": {"a": 0.25, "b": 0.5}}]
    t = evidence.task_drop_table(lora, qlora, {"a": 4, "b": 4}).set_index("task")
    assert t.loc["a", "exact_match_lora"] == 0.625 and t.loc["a", "exact_match_qlora"] == 0.25
    assert t.loc["a", "drop"] == 0.375 and t.loc["a", "spread_lora"] == 0.25
    assert t.loc["b", "spread_qlora"] == 0.5 and t.loc["b", "n"] == 4


def test_max_length_rate_counts_outputs_without_eos():
    rows = [{"output_ids": [1] * 16}, {"output_ids": [1] * 15}, {"output_ids": []},
            {"output_ids": [1] * 16}]
    assert evidence.max_length_rate(rows, 16) == 0.5
    assert math.isnan(evidence.max_length_rate([], 16))


# ---------------------------------------------------------------------------------------------
# H1
# ---------------------------------------------------------------------------------------------

def _sweep(predictive: bool | None) -> pd.DataFrame:
    """7 rows (4 ranks + 3 presets) where token match rises with cos (predictive), falls with
    it (not predictive), or only 3 rows (undetermined)."""
    cos = np.linspace(0.4, 0.7, 7)
    tok = np.linspace(0.6, 0.9, 7) if predictive else np.linspace(0.9, 0.6, 7)
    df = pd.DataFrame({"cos_sim_mean": cos, "token_match_rate": tok,
                       "eval_loss_gap": np.linspace(0.05, 0.01, 7),
                       "label": ["r=2", "r=4", "r=8", "r=16", "kv", "attn", "attn_mlp"]})
    df = df.assign(abs_eval_loss_gap=df["eval_loss_gap"].abs())
    return df.head(3) if predictive is None else df


def _h1(cos=0.53, floor_lora=0.36, floor_qlora=0.38, gap=0.036, predictive=True, **kw):
    args = dict(cos_sim=cos, cos_threshold=THETA, noise_floor_lora=floor_lora,
                noise_floor_qlora=floor_qlora, cross_seed_cos_sim=0.23, eval_loss_gap=gap,
                seed_spread=SPREAD, weights_mb_lora=513.9, weights_mb_qlora=171.4,
                peak_mem_mb_lora=1417.3, peak_mem_mb_qlora=1502.6, sweep=_sweep(predictive))
    return verdict_h1(**(args | kw))


def test_h1_supported_when_cos_above_threshold_and_gap_within_noise():
    v = _h1(cos=0.97, floor_lora=0.96, floor_qlora=0.96, gap=0.01)
    assert v.status == vt.SUPPORTED
    assert v.evidence["threshold_reachable"] is True
    assert "θ is reachable between runs of one method" in v.summary


def test_h1_supported_when_correlation_undetermined():
    v = _h1(cos=0.97, floor_lora=0.96, floor_qlora=0.96, gap=0.01, predictive=None)
    assert v.status == vt.SUPPORTED
    assert v.evidence["weight_similarity_predicts_outputs"] is None
    assert "undetermined (n = 3)" in v.summary


def test_h1_partial_when_weight_similarity_does_not_predict_outputs():
    v = _h1(cos=0.97, floor_lora=0.96, floor_qlora=0.96, gap=0.01, predictive=False)
    assert v.status == vt.PARTIAL
    assert v.evidence["corr_cos_vs_token_match"]["spearman"] == pytest.approx(-1.0)


def test_h1_rejected_when_weights_match_but_outputs_do_not():
    v = _h1(cos=0.97, floor_lora=0.96, floor_qlora=0.96, gap=0.2)
    assert v.status == vt.REJECTED
    assert not v.summary.startswith("Rejected as stated")
    assert "LoRA gives better quality here" in v.summary


def test_h1_trial_case_partial_with_noise_calibrated_threshold():
    """The issue's trial: 0.53 same seed, 0.36 / 0.38 between seeds, far below 0.95."""
    v = _h1()
    assert v.status == vt.PARTIAL
    ev = v.evidence
    assert ev["threshold_reachable"] is False and ev["at_or_above_noise_floor"] is True
    assert ev["noise_floor"] == 0.38
    assert "not reached even between two runs of one method" in v.summary
    assert "QLoRA preferable on memory" in v.summary
    assert "1502.6 MB ≥ LoRA's 1417.3 MB" in v.summary  # the peak caveat


def test_h1_trial_case_rejected_as_stated_when_not_predictive():
    v = _h1(predictive=False)
    assert v.status == vt.REJECTED
    assert v.summary.startswith("Rejected as stated: ")
    assert "Function-level gap within seed noise → QLoRA preferable on memory" in v.summary


def test_h1_rejected_when_quantization_moves_more_than_seed_noise():
    v = _h1(cos=0.23)
    assert v.status == vt.REJECTED
    assert "quantization moved ΔW more than a seed change does" in v.summary


def test_h1_rejected_as_stated_with_gap_beyond_noise():
    v = _h1(gap=0.09)
    assert v.status == vt.REJECTED
    assert "beyond the seed spread" in v.summary and "LoRA gives better quality" in v.summary


def test_h1_without_noise_floor_cannot_claim_partial():
    v = _h1(floor_lora=math.nan, floor_qlora=math.nan)
    assert v.status == vt.REJECTED
    assert "noise floor is unknown" in v.summary


# ---------------------------------------------------------------------------------------------
# H2
# ---------------------------------------------------------------------------------------------

def _modules(gaps, kls=(0.01, 0.02, 0.03, 0.04)):
    return pd.DataFrame({"targets": ["qv", "kv", "attn", "attn_mlp"], "eval_loss_gap": gaps,
                         "quality_drop_pct": [g * 100 for g in gaps], "kl_mean": list(kls)})


def _layers(related: bool) -> pd.DataFrame:
    qerr = np.linspace(0.09, 0.11, 20)
    div = np.linspace(0.3, 0.7, 20) if related else np.tile([0.3, 0.7, 0.5, 0.4], 5)
    return pd.DataFrame({"quant_rel_error": qerr, "cos_sim": 1 - div})


def test_h2_supported_when_presets_differ_beyond_seed_spread():
    v = verdict_h2(modules=_modules([0.01, 0.02, 0.04, 0.09]), layers=_layers(False),
                      seed_spread=SPREAD)
    assert v.status == vt.SUPPORTED
    assert [r["targets"] for r in v.evidence["ranking"]] == ["attn_mlp", "attn", "kv", "qv"]
    assert v.evidence["most_sensitive"] == "attn_mlp" and v.evidence["least_sensitive"] == "qv"
    assert v.evidence["gap_range"] == pytest.approx(0.08)
    assert v.evidence["most_sensitive_by_kl"] == "attn_mlp" and "(agrees)" in v.summary


def test_h2_partial_when_only_the_layer_relation_holds():
    v = verdict_h2(modules=_modules([0.01, 0.02, 0.03, 0.04]), layers=_layers(True),
                      seed_spread=SPREAD)
    assert v.status == vt.PARTIAL
    c = v.evidence["corr_quant_error_vs_divergence"]
    assert c["n"] == 20 and c["spearman"] == pytest.approx(1.0)
    assert c["pearson"] == pytest.approx(1.0)


def test_h2_rejected_when_neither_presets_nor_layers_differ():
    v = verdict_h2(modules=_modules([0.01, 0.02, 0.03, 0.04], kls=(0.04, 0.03, 0.02, 0.01)),
                      layers=_layers(False), seed_spread=SPREAD)
    assert v.status == vt.REJECTED
    assert "no more than the seed spread" in v.summary and "(gap says attn_mlp)" in v.summary


# ---------------------------------------------------------------------------------------------
# H3
# ---------------------------------------------------------------------------------------------

def _ranks(gaps):
    order = [16, 2, 8, 4]  # unsorted on purpose: the rules sort by rank
    return pd.DataFrame({"rank": order, "eval_loss_gap": [gaps[r] for r in order]})


@pytest.mark.parametrize("gaps, r_star, status", [
    ({2: 0.09, 4: 0.07, 8: 0.03, 16: -0.01}, 8, vt.SUPPORTED),
    ({2: 0.09, 4: 0.08, 8: 0.07, 16: 0.01}, 16, vt.SUPPORTED),
    ({2: 0.01, 4: 0.07, 8: 0.03, 16: 0.01}, 8, vt.PARTIAL),
    ({2: 0.01, 4: -0.02, 8: 0.03, 16: 0.01}, 2, vt.REJECTED),
    ({2: 0.01, 4: 0.02, 8: 0.03, 16: 0.06}, None, vt.NOT_FOUND),
    ({2: 0.01, 4: 0.02, 8: math.nan, 16: 0.01}, 16, vt.PARTIAL),
])
def test_h3_rank_threshold(gaps, r_star, status):
    v = verdict_h3(ranks=_ranks(gaps), seed_spread=SPREAD, lora_r=8)
    assert find_r_star(_ranks(gaps), SPREAD) == r_star
    assert v.evidence["r_star"] == r_star and v.status == status
    assert "measured at r=8, applied to all ranks" in v.summary
    assert [r["rank"] for r in v.evidence["per_rank"]] == [2, 4, 8, 16]


def test_h3_negative_gap_beyond_spread_counts_too():
    v = verdict_h3(ranks=_ranks({2: -0.09, 4: 0.01, 8: 0.01, 16: 0.01}), seed_spread=SPREAD,
                      lora_r=8)
    assert v.evidence["r_star"] == 4 and v.status == vt.SUPPORTED


def test_h3_gap_equal_to_spread_is_within():
    assert find_r_star(_ranks({2: 0.09, 4: SPREAD, 8: 0.0, 16: 0.0}), SPREAD) == 4


# ---------------------------------------------------------------------------------------------
# Failure modes: each fires on its symptom and stays quiet without it
# ---------------------------------------------------------------------------------------------

def _quality(gap, alignment=0.02):
    return fm.fm_quality_gap(eval_loss_lora=0.18, eval_loss_qlora=0.18 + gap, eval_loss_gap=gap,
                             seed_spread=SPREAD, base_eval_loss=1.83, base_eval_loss_quantized=1.95,
                             alignment_mean=alignment, alignment_ceiling_mean=0.12)


def test_fm_quality_gap():
    f = _quality(0.08)
    assert f is not None and f.key == "quality_gap"
    assert "+0.1200" in f.cause and "does not undo" in f.cause
    assert "leans towards undoing" in _quality(0.08, alignment=0.07).cause
    assert _quality(0.05) is None and _quality(-0.2) is None


def _memory(peak_q):
    return fm.fm_memory_not_saved(peak_mem_mb_lora=1400.0, peak_mem_mb_qlora=peak_q,
                                  weights_mb_lora=513.9, weights_mb_qlora=171.4,
                                  growth_mb_lora=600.0, growth_mb_qlora=700.0,
                                  memory_measure="process peak resident memory (VmHWM)")


def test_fm_memory_not_saved():
    f = _memory(1400.0)
    assert f is not None and "dequantized into a full-size temporary" in f.cause
    assert "342.5 MB" in f.cause
    assert _memory(1200.0) is None
    cuda = fm.fm_memory_not_saved(peak_mem_mb_lora=1.0, peak_mem_mb_qlora=2.0, weights_mb_lora=1.0,
                                  weights_mb_qlora=0.5, growth_mb_lora=0.5, growth_mb_qlora=1.5,
                                  memory_measure="CUDA peak allocated tensor memory")
    assert "dominate the weights" in cuda.cause and "process" not in cuda.cause


def test_fm_slower():
    f = fm.fm_slower(step_time_ratio=1.37, tokens_per_s_lora=512.7, tokens_per_s_qlora=373.9,
                     gradient_checkpointing=False)
    assert f is not None and "1.37×" in f.symptom and "dequantized" in f.cause
    assert "checkpointing" not in f.cause
    g = fm.fm_slower(step_time_ratio=1.8, tokens_per_s_lora=500.0, tokens_per_s_qlora=280.0,
                     gradient_checkpointing=True)
    assert "recomputes the forward pass" in g.cause
    assert fm.fm_slower(step_time_ratio=fm.SLOWDOWN_RATIO, tokens_per_s_lora=1.0,
                        tokens_per_s_qlora=1.0, gradient_checkpointing=False) is None
    assert fm.fm_slower(step_time_ratio=0.9, tokens_per_s_lora=1.0, tokens_per_s_qlora=1.1,
                        gradient_checkpointing=False) is None


def _transfer(on_base, merged, alignment=0.02):
    return fm.fm_transfer(native_eval_loss=0.20, on_base_eval_loss=on_base,
                          merged_eval_loss=merged, native_exact_match=0.5,
                          on_base_exact_match=0.4, merged_exact_match=0.4, seed_spread=SPREAD,
                          alignment_mean=alignment, alignment_ceiling_mean=0.12)


def test_fm_transfer():
    assert _transfer(0.30, 0.21) is not None            # unmerged fires
    assert _transfer(0.21, 0.30) is not None            # merged fires
    assert _transfer(0.25, 0.25) is None                # exactly the spread: within noise
    assert _transfer(0.15, 0.15) is None                # better on the 16-bit base
    assert "spread through the network" in _transfer(0.3, 0.3).cause
    assert "becomes an error of its own" in _transfer(0.3, 0.3, alignment=0.1).cause


def test_fm_quantized_lora():
    f = fm.fm_quantized_lora(native_eval_loss=0.18, on_quantized_eval_loss=0.26,
                             native_exact_match=0.56, on_quantized_exact_match=0.48,
                             seed_spread=SPREAD)
    assert f is not None and "+0.0800" in f.symptom
    assert fm.fm_quantized_lora(native_eval_loss=0.18, on_quantized_eval_loss=0.2,
                                native_exact_match=0.56, on_quantized_exact_match=0.55,
                                seed_spread=SPREAD) is None


def _unreachable(lo, ql):
    return fm.fm_threshold_unreachable(cos_threshold=THETA, noise_floor_lora=lo,
                                       noise_floor_qlora=ql, same_seed_cos_sim=0.53,
                                       cross_seed_cos_sim=0.23)


def test_fm_threshold_unreachable():
    f = _unreachable(0.36, 0.38)
    assert f is not None and "0.360 (LoRA) and 0.380 (QLoRA)" in f.symptom
    assert _unreachable(0.36, 0.96) is None             # one method reaches it
    assert _unreachable(math.nan, math.nan) is None     # no seed pairs: nothing observed
    assert _unreachable(0.95, 0.95) is not None         # equal is not above


def test_fm_task_drops():
    t = pd.DataFrame({"task": ["a", "b", "c", "d"], "n": [8, 8, 8, 8],
                      "exact_match_lora": [0.75, 0.75, 0.75, 0.5],
                      "exact_match_qlora": [0.5, 0.625, 0.5, 0.75],
                      "spread_lora": [0.0, 0.0, 0.25, 0.0], "spread_qlora": [0.125, 0.0, 0.0, 0.0]})
    t = t.assign(drop=t["exact_match_lora"] - t["exact_match_qlora"])
    f = fm.fm_task_drops(t)
    # a: 2 examples, beyond spread 0.125 -> fires; b: one example; c: within spread 0.25; d: gain
    assert f is not None and [x["task"] for x in f.evidence["tasks"]] == ["a"]
    assert "1 task family" in f.symptom
    assert fm.fm_task_drops(t[t["task"] != "a"]) is None


def test_fm_no_stop():
    f = fm.fm_no_stop(rate_lora=0.02, rate_qlora=0.3, max_new_tokens=16, reference_tokens_p95=11)
    assert f is not None and f.title == "QLoRA outputs do not stop"
    assert fm.fm_no_stop(rate_lora=0.1, rate_qlora=0.05, max_new_tokens=16,
                         reference_tokens_p95=11) is None
    # long references (e.g. Alpaca with 16 new tokens): hitting the limit is expected
    assert fm.fm_no_stop(rate_lora=1.0, rate_qlora=1.0, max_new_tokens=16,
                         reference_tokens_p95=120) is None


# ---------------------------------------------------------------------------------------------
# diagnose
# ---------------------------------------------------------------------------------------------

def test_diagnose_lists_only_fired_modes_and_serializes_to_strict_json():
    metrics = {
        "eval_loss_lora": 0.18, "eval_loss_qlora": 0.19, "eval_loss_gap": 0.01,
        "eval_loss_seed_spread": SPREAD, "cos_sim_mean": 0.97, "noise_floor_cos_sim_lora": 0.96,
        "noise_floor_cos_sim_qlora": 0.96, "cross_seed_cos_sim": 0.95, "weights_mb_lora": 500.0,
        "weights_mb_qlora": 170.0, "peak_mem_mb_lora": 1400.0, "peak_mem_mb_qlora": 900.0,
        "peak_mem_growth_mb_lora": 600.0, "peak_mem_growth_mb_qlora": 500.0,
        "step_time_ratio": 1.01, "tokens_per_s_lora": 500.0, "tokens_per_s_qlora": 495.0,
        "base_eval_loss": 1.8, "base_eval_loss_quantized": 1.9, "alignment_mean": None,
        "alignment_ceiling_mean": 0.1, "transfer_qlora_on_base_eval_loss": 0.2,
        "transfer_qlora_on_base_exact_match": 0.5, "transfer_qlora_merged_eval_loss": 0.2,
        "transfer_qlora_merged_exact_match": 0.5, "transfer_lora_on_quantized_eval_loss": 0.19,
        "transfer_lora_on_quantized_exact_match": 0.5,
    }
    ranks = pd.DataFrame({"rank": [2, 4, 8, 16], "cos_sim_mean": [0.9, 0.95, 0.97, 0.98],
                          "token_match_rate": [0.8, 0.85, 0.9, 0.95],
                          "eval_loss_gap": [0.09, 0.04, 0.01, 0.0]})
    modules = pd.DataFrame({"targets": ["qv", "kv"], "cos_sim_mean": [0.97, 0.96],
                            "token_match_rate": [0.9, 0.88], "eval_loss_gap": [0.01, 0.02],
                            "quality_drop_pct": [1.0, 2.0], "kl_mean": [0.01, 0.02]})
    per_task = evidence.task_drop_table([{"exact_match_per_task": {"a": 0.5}}],
                                 [{"exact_match_per_task": {"a": 0.5}}], {"a": 8})
    d = vd.diagnose(metrics=metrics, ranks=ranks, modules=modules, layers=_layers(True),
                    per_task=per_task, native_lora={"eval_loss": 0.18, "exact_match": 0.5},
                    native_qlora={"eval_loss": 0.19, "exact_match": 0.5},
                    eval_loss_lora_mean=0.18, eval_loss_qlora_mean=0.19,
                    gradient_checkpointing=False,
                    no_stop_rate_lora=0.0, no_stop_rate_qlora=0.0, reference_tokens_p95=11.0,
                    memory_measure="process peak resident memory", cos_threshold=THETA,
                    lora_r=8, lora_targets="qv", max_new_tokens=16)
    assert d.failure_modes == []
    assert (d.h1.status, d.h2.status, d.h3.status) == (vt.SUPPORTED, vt.PARTIAL, vt.SUPPORTED)
    text = json.dumps(d.to_json(), allow_nan=False)  # nan -> null, numpy -> Python
    assert json.loads(text)["h3"]["evidence"]["r_star"] == 4
    assert len(d.lines()) == 3 and d.lines()[0].startswith("H1: supported -- ")
