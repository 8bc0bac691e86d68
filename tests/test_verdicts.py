"""Verdict rules on hand-built paired records with known answers: every branch of H1-H3 and every
failure mode, firing and not firing, including negative gaps, a gap exactly at the margin, one
seed, and missing noise floors.

The records are built so the answers are known by construction: per eval example the QLoRA nll is
the LoRA nll plus a planted gap plus an alternating jitter of ±2^-10 (n even, so each seed's gap
is exactly the planted one), and the margin is 1/16 (dyadic, so a gap of exactly the margin
stays exact in floating point). Two seeds at r=8: gaps 0 and 1/128 give mean 1/256, se 1/256
and a 90 % t-interval 1/256 ± 6.314/256 = [-0.0207, +0.0286], inside ±0.0625: equivalent;
gaps 0.30 and 0.31 give mean 0.305, se 0.005 and a 95 % interval 0.305 ± 12.706·0.005 =
[0.241, 0.369], excluding 0 with the estimate beyond the margin: QLoRA worse.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from qlora_diag.core import schemas
from qlora_diag.core.run_names import run_name
from qlora_diag.report import evidence
from qlora_diag.report import failure_modes as fm
from qlora_diag.report import statistics as st
from qlora_diag.report import verdict_types as vt
from qlora_diag.report import verdicts as vd
from qlora_diag.report.floors import floor_test
from qlora_diag.report.h1_weight_similarity import verdict_h1
from qlora_diag.report.h2_module_sensitivity import verdict_h2
from qlora_diag.report.h3_rank_threshold import find_r_star, verdict_h3
from qlora_diag.report.paired import Comparison, build_paired_evidence, guard_zero_width

THETA = 0.95
MARGIN = 1 / 16
JIT = 2.0 ** -10
N = 32
FAMILIES = ("a", "b", "c", "d")
EQ8 = (0.0, 1 / 128)       # the two r=8 seed gaps that are equivalent (see the docstring)
WORSE8 = (0.30, 0.31)      # ... and that are QLoRA worse


def pair_rows(gap: float, jitter: float = JIT, em_drop: str | None = None):
    """LoRA and QLoRA examples.jsonl rows of one seed with the planted ``gap``; exact match on
    the first 16 examples, where QLoRA loses every example of family ``em_drop``."""
    lora, qlora = [], []
    for i in range(N):
        base = 1.0 + (i % 4) / 4
        fam = FAMILIES[i % 4]
        em = None if i >= 16 else 1
        em_q = None if em is None else (0 if fam == em_drop else 1)
        common = {"id": f"{i:04d}", "family": fam, "n_tokens": 1, "output": None}
        lora.append(common | {"nll_sum": base, "exact_match": em})
        qlora.append(common | {"nll_sum": base + gap + (jitter if i % 2 == 0 else -jitter),
                               "exact_match": em_q})
    return lora, qlora


def paired(rank_gaps: dict, r8=EQ8, presets=None, preset_jitter=None, em_drop=None):
    """PairedEvidence for lora.r = 8 on qv, seeds 42 and 1, ranks 2-16, presets kv and attn.
    ``rank_gaps``: the seed-42 gap at ranks 2, 4, 16; ``r8``: the gaps of seeds 42 and 1 at
    r=8; ``presets``: the seed-42 gaps of kv and attn (0 if not given)."""
    presets = presets or {"kv": 0.0, "attn": 0.0}
    preset_jitter = preset_jitter or {}
    ex = {}

    def put(rank, targets, seed, gap, jitter=JIT):
        lo, ql = pair_rows(gap, jitter, em_drop)
        ex[run_name("lora", rank, targets, seed)] = lo
        ex[run_name("qlora", rank, targets, seed)] = ql

    for r, g in rank_gaps.items():
        put(r, "qv", 42, g)
    put(8, "qv", 42, r8[0])
    put(8, "qv", 1, r8[1])
    for t, g in presets.items():
        put(8, t, 42, g, preset_jitter.get(t, 2 * JIT))
    return build_paired_evidence(ex, seed=42, sweep_seeds=[1], lora_r=8, lora_targets="qv",
                                 ranks=[2, 4, 8, 16], presets=list(presets), margin=MARGIN,
                                 margin_exact_match=5.0, n_boot=200)


def floors(cross, same_method) -> pd.DataFrame:
    kinds = ["lora-qlora-cross"] * len(cross) + ["lora-lora"] * len(same_method)
    return pd.DataFrame({"kind": kinds, "seed_a": 1, "seed_b": 2,
                         "cos_sim_mean": list(cross) + list(same_method)})


def sweep() -> pd.DataFrame:
    ranks = pd.DataFrame({"rank": [2, 4, 8, 16], "cos_sim_mean": [0.4, 0.5, 0.6, 0.7],
                          "token_match_rate": [0.6, 0.7, 0.8, 0.9],
                          "eval_loss_gap": [0.1, 0.05, 0.0, 0.0]})
    modules = pd.DataFrame({"targets": ["qv", "kv", "attn"], "cos_sim_mean": [0.6, 0.45, 0.65],
                            "token_match_rate": [0.8, 0.65, 0.85],
                            "eval_loss_gap": [0.0, 0.0, 0.0]})
    return evidence.sweep_rows(ranks, modules, "qv")


ALL_EQ = {2: 0.0, 4: 0.0, 16: 0.0}
SAME_FLOOR = floors([0.2, 0.21, 0.22], [0.2, 0.21, 0.22])


# ---------------------------------------------------------------------------------------------
# The estimator: known answers
# ---------------------------------------------------------------------------------------------

def test_headline_intervals_match_the_hand_computed_values():
    d = paired(ALL_EQ).headline_loss.decision
    assert d.interval95.estimate == pytest.approx(1 / 256, abs=1e-12)
    assert d.interval90.low == pytest.approx(1 / 256 - 6.313752 / 256, abs=1e-5)
    assert d.interval90.high == pytest.approx(1 / 256 + 6.313752 / 256, abs=1e-5)
    assert d.label == st.EQUIVALENT and d.over == st.OVER_SEEDS and d.interval95.n_seeds == 2
    w = paired(ALL_EQ, r8=WORSE8).headline_loss.decision
    assert w.interval95.low == pytest.approx(0.305 - 12.706205 * 0.005, abs=1e-5)
    assert w.label == st.QLORA_WORSE


def test_one_seed_ranks_are_over_examples_and_say_so():
    pe = paired({2: 0.3, 4: 0.0, 16: 0.0})
    c = pe.per_rank[2]
    assert c.decision.over == st.OVER_EXAMPLES and c.decision.interval95.n_seeds == 1
    assert c.estimate == pytest.approx(0.3, abs=1e-12) and c.label == st.QLORA_WORSE
    assert "omitting seed noise" in c.analysis.sentence
    assert pe.per_rank[8].decision.over == st.OVER_SEEDS


def test_seed_table_has_both_losses_and_the_paired_gap_per_seed():
    t = paired(ALL_EQ, r8=WORSE8).seed_table.set_index("seed")
    assert t.loc[42, "eval_loss_lora"] == pytest.approx(1.375)      # mean of 1, 1.25, 1.5, 1.75
    assert t.loc[1, "eval_loss_gap"] == pytest.approx(0.31)
    assert t.loc[42, "exact_match_lora"] == 100.0 and t.loc[42, "n_generated"] == 16


def test_preset_contrast_is_the_difference_of_the_two_gaps():
    pe = paired(ALL_EQ, presets={"kv": 0.3, "attn": 0.0})
    assert pe.contrasts["kv"].estimate == pytest.approx(0.3, abs=1e-12)   # 0.3 − 0 at seed 42
    assert pe.contrasts["kv"].label == st.QLORA_WORSE
    assert pe.contrasts["attn"].label == st.EQUIVALENT


# ---------------------------------------------------------------------------------------------
# H1
# ---------------------------------------------------------------------------------------------

def _h1(pe, fl):
    return verdict_h1(paired=pe, floor=floor_test(fl), cos_threshold=THETA, sweep=sweep(),
                      rng_seed=0)


def test_h1_supported_when_equivalent_and_not_below_the_floor():
    v = _h1(paired(ALL_EQ), SAME_FLOOR)
    assert v.status == vt.SUPPORTED and v.primary["decision"] == st.EQUIVALENT
    assert "not a test of equivalence" in v.summary


def test_h1_partial_without_floors():
    v = _h1(paired(ALL_EQ), None)
    assert v.status == vt.PARTIAL and "floors.csv is absent" in v.summary


def test_h1_rejected_when_cross_seed_below_the_floor():
    v = _h1(paired(ALL_EQ), floors([0.1, 0.11, 0.12, 0.13], [0.2, 0.21, 0.22, 0.23]))
    assert v.status == vt.REJECTED and "more than a seed change" in v.summary


def test_h1_rejected_and_sign_aware_for_either_direction():
    worse = _h1(paired(ALL_EQ, r8=WORSE8), SAME_FLOOR)
    assert worse.status == vt.REJECTED and "higher than LoRA's" in worse.summary
    better = _h1(paired(ALL_EQ, r8=(-0.30, -0.31)), SAME_FLOOR)
    assert better.primary["decision"] == st.QLORA_BETTER
    assert better.status == vt.REJECTED and "lower than LoRA's" in better.summary
    assert "LoRA gives better quality" not in better.summary


def test_h1_inconclusive_never_says_equivalent():
    v = _h1(paired(ALL_EQ, r8=(0.3, -0.2)), SAME_FLOOR)
    assert v.status == vt.INCONCLUSIVE and v.primary["decision"] == st.INCONCLUSIVE
    assert v.primary["seeds_needed"] is not None and v.primary["seeds_needed"] > 2
    assert "equivalent at this margin" not in v.summary and "preferable" not in v.summary


def test_h1_correlation_is_judged_by_its_permutation_p():
    v = _h1(paired(ALL_EQ), SAME_FLOOR)
    corr = v.evidence["corr_cos_vs_token_match"]
    # cos and token match rise together over 6 rows: rho = 1, exact p = 2/6! = 1/360
    assert corr["rho"] == pytest.approx(1.0) and corr["p_value"] == pytest.approx(2 / 720)
    assert "positively rank-correlated" in v.summary


# ---------------------------------------------------------------------------------------------
# H2
# ---------------------------------------------------------------------------------------------

def _layers(related: bool) -> pd.DataFrame:
    qerr = np.linspace(0.09, 0.11, 20)
    div = np.linspace(0.3, 0.7, 20) if related else np.tile([0.3, 0.7, 0.5, 0.4], 5)
    return pd.DataFrame({"quant_rel_error": qerr, "cos_sim": 1 - div})


def _modules():
    return pd.DataFrame({"targets": ["qv", "kv", "attn"], "trainable_params": [100, 100, 200]})


def _h2(pe, related=False):
    return verdict_h2(paired=pe, modules=_modules(), layers=_layers(related), rng_seed=0)


def test_h2_supported_when_a_contrast_is_a_difference():
    v = _h2(paired(ALL_EQ, presets={"kv": 0.3, "attn": 0.0}))
    assert v.status == vt.SUPPORTED and "kv more sensitive than qv" in v.summary
    assert v.primary["comparison"].startswith("largest of 2 contrast(s): kv − qv")
    assert "capacity" in v.rule


def test_h2_negative_contrast_is_less_sensitive():
    v = _h2(paired(ALL_EQ, presets={"kv": -0.3, "attn": 0.0}))
    assert v.status == vt.SUPPORTED and "kv less sensitive than qv" in v.summary


def test_h2_rejected_when_every_contrast_is_equivalent():
    assert _h2(paired(ALL_EQ)).status == vt.REJECTED


def test_h2_partial_or_inconclusive_when_contrasts_cannot_decide():
    wide = paired(ALL_EQ, presets={"kv": 0.0, "attn": 0.0}, preset_jitter={"kv": 0.5})
    assert wide.contrasts["kv"].label == st.INCONCLUSIVE
    assert _h2(wide, related=True).status == vt.PARTIAL
    assert _h2(wide, related=False).status == vt.INCONCLUSIVE


# ---------------------------------------------------------------------------------------------
# H3
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gaps, r8, r_star, status", [
    ({2: 0.3, 4: 0.3, 16: 0.0}, EQ8, 8, vt.SUPPORTED),
    (ALL_EQ, EQ8, 2, vt.REJECTED),
    ({2: 0.3, 4: 0.3, 16: 0.3}, WORSE8, None, vt.NOT_FOUND),
    ({2: 0.0, 4: 0.3, 16: 0.0}, EQ8, 8, vt.PARTIAL),
    ({2: 0.3, 4: 0.3, 16: 0.0}, (0.3, -0.2), 16, vt.INCONCLUSIVE),   # r=8 inconclusive
])
def test_h3_rank_threshold(gaps, r8, r_star, status):
    pe = paired(gaps, r8=r8)
    v = verdict_h3(paired=pe)
    assert (find_r_star(pe.per_rank), v.status) == (r_star, status)
    assert v.primary["comparison"].startswith("r=2")


def test_h3_negative_gaps_below_r_star_do_not_support_a_threshold():
    v = verdict_h3(paired=paired({2: -0.3, 4: -0.3, 16: 0.0}))
    assert v.primary["decision"] == st.QLORA_BETTER and v.status == vt.INCONCLUSIVE


def test_h3_gap_exactly_at_the_margin_is_inconclusive_not_worse():
    pe = paired({2: 0.0, 4: 0.0, 16: MARGIN})
    c = pe.per_rank[16]
    assert c.estimate == MARGIN                          # exact by construction
    assert c.label == st.INCONCLUSIVE and c.decision.nonzero and not c.decision.beyond_margin
    assert "not beyond the margin" in c.analysis.sentence
    assert verdict_h3(paired=pe).status == vt.INCONCLUSIVE


def test_h3_trend_uses_every_seed_at_lora_r():
    t = paired({2: 0.3, 4: 0.2, 16: 0.0}).trend
    assert t.n_points == 5 and t.n_ranks == 4 and t.replicated and t.slope < 0


# ---------------------------------------------------------------------------------------------
# Failure modes: each fires on its symptom and stays quiet without it
# ---------------------------------------------------------------------------------------------

def _quality(pe, alignment=0.02):
    return fm.fm_quality_gap(headline=pe.headline_loss, eval_loss_lora=1.375,
                             eval_loss_qlora=1.68, base_eval_loss=1.83,
                             base_eval_loss_quantized=1.95, alignment_mean=alignment,
                             alignment_ceiling_mean=0.12)


def test_fm_quality_gap_fires_only_on_qlora_worse():
    f = _quality(paired(ALL_EQ, r8=WORSE8))
    assert f is not None and f.key == "quality_gap"
    # alignment 0.02 of a ceiling 0.12 is below half of it; 0.07 is above
    assert "+0.1200" in f.cause and "stays below 0.5 of the best" in f.cause
    assert "reaches 0.5 of the best" in _quality(paired(ALL_EQ, r8=WORSE8), alignment=0.07).cause
    assert _quality(paired(ALL_EQ)) is None                         # equivalent
    assert _quality(paired(ALL_EQ, r8=(-0.30, -0.31))) is None      # QLoRA better
    assert _quality(paired(ALL_EQ, r8=(0.3, -0.2))) is None         # inconclusive


def _transfer(base, merged):
    return fm.fm_transfer(eval_loss_change_base=base, eval_loss_change_merged=merged,
                          exact_match_change_base=-0.1, exact_match_change_merged=-0.1,
                          margin=MARGIN, alignment_mean=0.02, alignment_ceiling_mean=0.12)


def test_fm_transfer():
    assert _transfer(0.1, 0.01) is not None              # unmerged fires
    assert _transfer(0.01, 0.1) is not None              # merged fires
    assert _transfer(MARGIN, MARGIN) is None             # at the margin: does not fire
    assert _transfer(-0.1, -0.1) is None                 # better on the 16-bit base
    assert "no interval" in _transfer(0.1, 0.1).symptom


def test_fm_quantized_lora():
    f = fm.fm_quantized_lora(eval_loss_change=0.08, exact_match_change=-0.08, margin=MARGIN)
    assert f is not None and "+0.0800" in f.symptom and "-8.0 points" in f.symptom
    assert "served in 4 bits" not in f.mitigation
    assert fm.fm_quantized_lora(eval_loss_change=0.05, exact_match_change=0.0,
                                margin=MARGIN) is None


def _em_family(em_qlora: list[int]) -> Comparison:
    """One seed, 20 examples of family a; LoRA answers all, QLoRA as given."""
    rec = st.SeedRecords(7, [1.0] * 20, [1.0] * 20, [1] * 20, [1] * 20, em_qlora, ["a"] * 20)
    a = guard_zero_width(st.analyze([rec], "exact_match", margin=5.0, n_boot=200, rng_seed=0,
                                    examples_shared=True, family="a"))
    return Comparison("a", "family a", a)


def test_fm_task_drops_on_the_paired_exact_match_test():
    # 16 of 20 lost: mean −80, sd 41.04, se 9.18, 95 % t(19) interval −80 ± 19.2: QLoRA worse
    lost = _em_family([0] * 16 + [1] * 4)
    assert lost.label == st.QLORA_WORSE
    assert lost.decision.interval95.high == pytest.approx(-80 + 2.093024 * 9.176629, abs=1e-3)
    f = fm.fm_task_drops({"a": lost})
    assert f is not None and list(f.evidence["tasks"]) == ["a"] and "1 task family" in f.symptom
    # 2 of 20 lost: −10 ± 2.093·6.88 = [−24.4, +4.4] includes 0: inconclusive, does not fire
    assert fm.fm_task_drops({"a": _em_family([0] * 2 + [1] * 18)}) is None


def test_zero_width_interval_decides_nothing():
    same = _em_family([1] * 20)                      # every paired difference is 0
    assert same.decision.interval95.se == 0 and same.label == st.INCONCLUSIVE
    assert "zero width" in same.analysis.sentence and "equivalent" not in same.analysis.sentence
    all_lost = _em_family([0] * 20)                  # −100 on every example, no variation
    assert all_lost.label == st.INCONCLUSIVE and fm.fm_task_drops({"a": all_lost}) is None


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def test_sweep_rows_drops_the_duplicate_headline_preset():
    ranks = pd.DataFrame({"rank": [2, 8], "cos_sim_mean": [0.4, 0.5],
                          "token_match_rate": [0.7, 0.8], "eval_loss_gap": [0.1, -0.02]})
    modules = pd.DataFrame({"targets": ["qv", "kv"], "cos_sim_mean": [0.5, 0.6],
                            "token_match_rate": [0.8, 0.9], "eval_loss_gap": [-0.02, 0.03]})
    rows = evidence.sweep_rows(ranks, modules, "qv")
    assert list(rows["label"]) == ["r=2", "r=8", "kv"]
    assert list(rows["abs_eval_loss_gap"]) == [0.1, 0.02, 0.03]


def test_max_length_rate_counts_outputs_without_eos():
    rows = [{"output_ids": [1] * 16}, {"output_ids": [1] * 15}, {"output_ids": []},
            {"output_ids": [1] * 16}]
    assert evidence.max_length_rate(rows, 16) == 0.5
    assert math.isnan(evidence.max_length_rate([], 16))


# ---------------------------------------------------------------------------------------------
# Failure modes on measured numbers (memory, speed, threshold, stopping)
# ---------------------------------------------------------------------------------------------

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

def test_diagnose_serializes_every_hypothesis_with_its_decision_to_strict_json():
    metrics = {
        "cos_sim_mean": 0.97, "noise_floor_cos_sim_lora": 0.96,
        "noise_floor_cos_sim_qlora": 0.96, "cross_seed_cos_sim": 0.95, "weights_mb_lora": 500.0,
        "weights_mb_qlora": 170.0, "peak_mem_mb_lora": 1400.0, "peak_mem_mb_qlora": 900.0,
        "peak_mem_growth_mb_lora": 600.0, "peak_mem_growth_mb_qlora": 500.0,
        "step_time_ratio": 1.01, "tokens_per_s_lora": 500.0, "tokens_per_s_qlora": 495.0,
        "base_eval_loss": 1.8, "base_eval_loss_quantized": 1.9, "alignment_mean": None,
        "alignment_ceiling_mean": 0.1,
    }
    ranks = pd.DataFrame({"rank": [2, 4, 8, 16], "cos_sim_mean": [0.9, 0.95, 0.97, 0.98],
                          "token_match_rate": [0.8, 0.85, 0.9, 0.95],
                          "eval_loss_gap": [0.09, 0.04, 0.01, 0.0]})
    modules = pd.DataFrame({"targets": ["qv", "kv", "attn"], "cos_sim_mean": [0.97, 0.96, 0.9],
                            "token_match_rate": [0.9, 0.88, 0.8], "eval_loss_gap": [0.0] * 3,
                            "trainable_params": [10, 10, 20]})
    transfer = {"cases": {c: {"eval_loss_change": 0.0, "exact_match_change": 0.0}
                          for c in ("qlora_on_base", "qlora_merged", "lora_on_quantized")}}
    d = vd.diagnose(paired=paired({2: 0.3, 4: 0.3, 16: 0.0}), floors=None, metrics=metrics,
                    ranks=ranks, modules=modules, layers=_layers(True), transfer=transfer,
                    gradient_checkpointing=False, no_stop_rate_lora=0.0,
                    no_stop_rate_qlora=0.0, reference_tokens_p95=11.0,
                    memory_measure="process peak resident memory", cos_threshold=THETA,
                    lora_targets="qv", max_new_tokens=16, rng_seed=0)
    assert d.failure_modes == []
    assert (d.h1.status, d.h2.status, d.h3.status) == (vt.PARTIAL, vt.REJECTED, vt.SUPPORTED)
    out = json.loads(json.dumps(d.to_json(), allow_nan=False))  # nan -> null, numpy -> Python
    assert tuple(out) == schemas.VERDICTS_KEYS
    for h in ("h1", "h2", "h3"):
        assert tuple(out[h]) == schemas.VERDICT_KEYS
        assert tuple(out[h]["interval"]) == schemas.VERDICT_INTERVAL_KEYS
    assert out["h3"]["evidence"]["r_star"] == 8 and out["margin"] == MARGIN
    assert out["h1"]["interval"]["over"] == "seeds" and out["h1"]["n_seeds"] == 2
    assert out["h3"]["interval"]["over"] == "examples" and out["h3"]["n_seeds"] == 1
    assert len(d.lines()) == 3 and d.lines()[0].startswith("H1: partially supported (equivalent)")
    assert not math.isnan(out["h1"]["estimate"])
