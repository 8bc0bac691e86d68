"""Verdict code on hand-built paired records: negative gaps, one seed, missing floors, and no
"equivalent"/"same" wording when the decision is inconclusive. Expected labels are known by
construction (a constant per-example gap far from or inside the margin)."""
from __future__ import annotations

import pandas as pd

from qlora_diag.report import statistics as st
from qlora_diag.report.floors import UNAVAILABLE, floor_sentence, floor_test
from qlora_diag.report.paired import paired_seed_records


def rows(nll, em=None):
    return [{"id": str(i), "family": "f", "nll_sum": v, "n_tokens": 1,
             "exact_match": None if em is None else em[i], "output": None}
            for i, v in enumerate(nll)]


def test_one_seed_negative_gap_is_qlora_better_over_examples():
    # QLoRA is 0.5 nats lower on every example (+-0.01 jitter): gap -0.5, margin 0.05
    lora = [2.0, 2.1, 1.9, 2.0, 2.05, 1.95]
    qlora = [v - 0.5 + d for v, d in zip(lora, [0.01, -0.01, 0.0, 0.01, -0.01, 0.0])]
    rec = paired_seed_records(rows(lora), rows(qlora), seed=3)
    a = st.analyze([rec], "eval_loss", margin=0.05, n_boot=200, rng_seed=0,
                   examples_shared=True)
    assert a.decision.label == st.QLORA_BETTER
    assert a.decision.over == st.OVER_EXAMPLES
    assert "omitting seed noise" in a.sentence and "lower than LoRA's" in a.sentence


def test_exact_match_reads_only_generated_examples():
    lora = rows([1.0] * 4, em=[1, 0, None, None])
    qlora = rows([1.0] * 4, em=[1, 1, None, None])
    rec = paired_seed_records(lora, qlora, seed=1, quantity="exact_match")
    assert rec.n_examples == 2
    assert paired_seed_records(rows([1.0]), rows([1.0]), 1, "exact_match") is None


def test_inconclusive_text_never_says_equivalent_or_same():
    # two seeds with gaps +0.3 and -0.25: interval wide, decision inconclusive
    recs = [paired_seed_records(rows([1.0, 1.0]), rows([1.3, 1.3]), seed=1),
            paired_seed_records(rows([1.0, 1.0]), rows([0.75, 0.75]), seed=2)]
    a = st.analyze(recs, "eval_loss", margin=0.05, n_boot=200, rng_seed=0,
                   examples_shared=True)
    assert a.decision.label == st.INCONCLUSIVE
    assert "equivalent" not in a.sentence.replace("to show equivalence", "")
    assert " same" not in a.sentence


def test_missing_floors_are_unavailable_not_invented():
    t = floor_test(None)
    assert t.outcome == UNAVAILABLE and "absent" in floor_sentence(t)
    t = floor_test(pd.DataFrame({"kind": ["lora-lora"], "seed_a": [1], "seed_b": [2],
                                 "cos_sim_mean": [0.2]}))
    assert t.outcome == UNAVAILABLE


def test_floor_test_detects_cross_seed_below_floor_exactly():
    # 3 cross values all below 3 floor values: the most extreme of C(6,3) = 20 splits, two-sided
    # -> p = 2/20 = 0.1 (not significant at 5 %); with 4 vs 4: p = 2/70 < 0.05
    def df(cross, floor):
        kinds = ["lora-qlora-cross"] * len(cross) + ["lora-lora"] * len(floor)
        return pd.DataFrame({"kind": kinds,
                             "seed_a": 0, "seed_b": 1, "cos_sim_mean": cross + floor})
    t = floor_test(df([0.1, 0.11, 0.12], [0.2, 0.21, 0.22]))
    assert abs(t.p_value - 0.1) < 1e-12 and t.outcome != "below the floor"
    t = floor_test(df([0.1, 0.11, 0.12, 0.13], [0.2, 0.21, 0.22, 0.23]))
    assert abs(t.p_value - 2 / 70) < 1e-12 and t.outcome == "below the floor"


def test_one_seed_everywhere_builds_every_comparison_over_examples():
    """No extra seeds: the headline is over eval examples (omits seed noise), a task family with
    one generated example gets no exact-match interval instead of an error, and the headline
    gap is the planted 0.25 exactly (dyadic values)."""
    from qlora_diag.core.run_names import run_name
    from qlora_diag.report.paired import build_paired_evidence

    def runs(gap):
        fams = ["x"] * 9 + ["y"]                          # y's one example is generated
        lora = [{"id": str(i), "family": fams[i], "nll_sum": 1.0 + (i % 2) / 2, "n_tokens": 2,
                 "exact_match": int(i % 3 == 0) if i >= 5 or i == 9 else None,
                 "output": None} for i in range(10)]
        qlora = [r | {"nll_sum": r["nll_sum"] + 2 * gap + (2 ** -8 if i % 2 else -2 ** -8)}
                 for i, r in enumerate(lora)]
        return lora, qlora

    ex = {}
    for r in (2, 8):
        lo, ql = runs(0.25)
        ex[run_name("lora", r, "qv", 5)], ex[run_name("qlora", r, "qv", 5)] = lo, ql
    pe = build_paired_evidence(ex, seed=5, sweep_seeds=[], lora_r=8, lora_targets="qv",
                               ranks=[2, 8], presets=["qv"], margin=0.05,
                               margin_exact_match=5.0, n_boot=200)
    d = pe.headline_loss.decision
    assert d.over == st.OVER_EXAMPLES and d.interval95.estimate == 0.25
    assert "omitting seed noise" in pe.headline_loss.analysis.sentence
    assert "y" not in pe.families_em and set(pe.families_em) <= {"x"}
    assert pe.trend is None and pe.contrasts == {}
