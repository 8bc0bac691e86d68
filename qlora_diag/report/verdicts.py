"""Verdicts on H1-H3 and the observed failure modes, computed from one run's numbers.

Every verdict is a pure function of numbers the earlier stages wrote: the per-example eval
records of every run (``reports/train/<run>/examples.jsonl``) through the one paired estimator of
:mod:`~qlora_diag.report.paired`, the noise floors (``reports/compare/floors.csv``) and the
tables (``ranks.csv``, ``modules.csv``, ``layers.csv``, ``reports/metrics.json``,
``reports/compare/headline.json``, ``transfer.json``). It returns the status, the rule in
words, the numbers the rule looked at (``evidence``) and a one-paragraph summary, so the
report can show *why*, not only *what*. The hypotheses are judged in
:mod:`~qlora_diag.report.h1_weight_similarity`,
:mod:`~qlora_diag.report.h2_module_sensitivity` and :mod:`~qlora_diag.report.h3_rank_threshold`
on the evidence of :mod:`~qlora_diag.report.evidence`; the failure modes in
:mod:`~qlora_diag.report.failure_modes`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import pandas as pd

from qlora_diag.core.numbers import json_safe
from qlora_diag.report.evidence import sweep_rows
from qlora_diag.report.failure_modes import (
    fm_memory_not_saved,
    fm_no_stop,
    fm_quality_gap,
    fm_quantized_lora,
    fm_slower,
    fm_task_drops,
    fm_threshold_unreachable,
    fm_transfer,
)
from qlora_diag.report.floors import floor_test, floor_tests
from qlora_diag.report.h1_weight_similarity import verdict_h1
from qlora_diag.report.h2_module_sensitivity import verdict_h2
from qlora_diag.report.h3_rank_threshold import verdict_h3
from qlora_diag.report.paired import PairedEvidence
from qlora_diag.report.verdict_types import FailureMode, Verdict


def _verdict_json(v: Verdict) -> dict:
    """One hypothesis of verdicts.json: the primary comparison's fields (estimate, intervals,
    margin, n_seeds, decision, seeds needed) beside the status, rule, summary and evidence."""
    return {"hypothesis": v.hypothesis, "status": v.status, "rule": v.rule,
            "summary": v.summary, **v.primary, "evidence": v.evidence}


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    """The verdicts on H1-H3 and the failure modes whose rules fired
    (``reports/verdicts.json``), with the paired evidence they rest on."""

    h1: Verdict
    h2: Verdict
    h3: Verdict
    failure_modes: list[FailureMode]
    paired: PairedEvidence

    def to_json(self) -> dict:
        """JSON-safe dict (nan -> None, numpy scalars -> Python numbers:
        :func:`~qlora_diag.core.numbers.json_safe`)."""
        return json_safe({"h1": _verdict_json(self.h1), "h2": _verdict_json(self.h2),
                          "h3": _verdict_json(self.h3),
                          "failure_modes": [dataclasses.asdict(f) for f in self.failure_modes],
                          "margin": self.paired.margin,
                          "margin_exact_match": self.paired.margin_exact_match})

    def lines(self) -> list[str]:
        """One line per verdict and failure mode, for the stage's console output."""
        out = [f"{v.hypothesis}: {v.status} ({v.primary['decision']}) -- {v.summary}"
               for v in (self.h1, self.h2, self.h3)]
        out += [f"failure mode: {f.title} -- {f.symptom}" for f in self.failure_modes]
        return out


def _num(x: Any) -> float:
    return float(x) if x is not None else math.nan


def diagnose(*, paired: PairedEvidence, floors: pd.DataFrame | None, metrics: dict,
             ranks: pd.DataFrame, modules: pd.DataFrame, layers: pd.DataFrame,
             transfer: dict | None, gradient_checkpointing: bool,
             no_stop_rate_lora: float, no_stop_rate_qlora: float, reference_tokens_p95: float,
             memory_measure: str, cos_threshold: float, lora_targets: str,
             max_new_tokens: int, rng_seed: int) -> Diagnosis:
    """H1-H3 and the failure modes whose rules fire. ``paired``: every paired comparison
    (:func:`~qlora_diag.report.paired.build_paired_evidence`); ``floors``: floors.csv or None
    when absent; ``metrics`` the headline numbers (``reports/metrics.json`` and
    ``reports/compare/headline.json``); ``transfer``: compare/transfer.json or None;
    ``gradient_checkpointing``: QLoRA trained with it (train.kbit_prep)."""
    m = {k: _num(v) for k, v in metrics.items()}
    floor = floor_test(floors, "cos_sim_mean", rng_seed=rng_seed)
    h1 = verdict_h1(paired=paired, floor=floor, cos_threshold=cos_threshold,
                    sweep=sweep_rows(ranks, modules, lora_targets), rng_seed=rng_seed,
                    other_floors=floor_tests(floors, rng_seed=rng_seed))
    h2 = verdict_h2(paired=paired, modules=modules, layers=layers, rng_seed=rng_seed)
    h3 = verdict_h3(paired=paired)
    seeds = paired.seed_table
    modes = [
        fm_quality_gap(headline=paired.headline_loss,
                       eval_loss_lora=float(seeds["eval_loss_lora"].mean()),
                       eval_loss_qlora=float(seeds["eval_loss_qlora"].mean()),
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
        fm_threshold_unreachable(cos_threshold=cos_threshold,
                                 noise_floor_lora=m["noise_floor_cos_sim_lora"],
                                 noise_floor_qlora=m["noise_floor_cos_sim_qlora"],
                                 same_seed_cos_sim=m["cos_sim_mean"],
                                 cross_seed_cos_sim=m["cross_seed_cos_sim"]),
        fm_task_drops(paired.families_em),
        fm_no_stop(rate_lora=no_stop_rate_lora, rate_qlora=no_stop_rate_qlora,
                   max_new_tokens=max_new_tokens, reference_tokens_p95=reference_tokens_p95),
    ]
    if transfer is not None:
        cases = transfer["cases"]
        modes += [
            fm_transfer(eval_loss_change_base=_num(cases["qlora_on_base"]["eval_loss_change"]),
                        eval_loss_change_merged=_num(cases["qlora_merged"]["eval_loss_change"]),
                        exact_match_change_base=_num(cases["qlora_on_base"]["exact_match_change"]),
                        exact_match_change_merged=_num(
                            cases["qlora_merged"]["exact_match_change"]),
                        margin=paired.margin, alignment_mean=m["alignment_mean"],
                        alignment_ceiling_mean=m["alignment_ceiling_mean"]),
            fm_quantized_lora(
                eval_loss_change=_num(cases["lora_on_quantized"]["eval_loss_change"]),
                exact_match_change=_num(cases["lora_on_quantized"]["exact_match_change"]),
                margin=paired.margin),
        ]
    return Diagnosis(h1, h2, h3, [f for f in modes if f is not None], paired)
