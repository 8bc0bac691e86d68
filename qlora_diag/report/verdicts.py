"""Verdicts on H1-H3 and the observed failure modes, computed from one run's numbers.

Every verdict is a pure function of numbers the earlier stages wrote (``reports/metrics.json``
and ``reports/compare/headline.json``, ``ranks.csv``, ``modules.csv``, ``layers.csv``, the
per-run ``run.json`` and generations). It returns the status, the rule in words, the numbers the
rule looked at (``evidence``) and a one-paragraph summary, so the report can show *why*, not
only *what*. The hypotheses are judged in :mod:`~qlora_diag.report.h1_weight_similarity`,
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
from qlora_diag.report.h1_weight_similarity import verdict_h1
from qlora_diag.report.h2_module_sensitivity import verdict_h2
from qlora_diag.report.h3_rank_threshold import verdict_h3
from qlora_diag.report.verdict_types import FailureMode, Verdict


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    """The verdicts on H1-H3 and the failure modes whose rules fired
    (``reports/verdicts.json``)."""

    h1: Verdict
    h2: Verdict
    h3: Verdict
    failure_modes: list[FailureMode]

    def to_json(self) -> dict:
        """JSON-safe dict (nan -> None, numpy scalars -> Python numbers:
        :func:`~qlora_diag.core.numbers.json_safe`)."""
        return json_safe({"h1": dataclasses.asdict(self.h1), "h2": dataclasses.asdict(self.h2),
                          "h3": dataclasses.asdict(self.h3),
                          "failure_modes": [dataclasses.asdict(f) for f in self.failure_modes]})

    def lines(self) -> list[str]:
        """One line per verdict and failure mode, for the stage's console output."""
        out = [f"{v.hypothesis}: {v.status} -- {v.summary}" for v in (self.h1, self.h2, self.h3)]
        out += [f"failure mode: {f.title} -- {f.symptom}" for f in self.failure_modes]
        return out


def _num(x: Any) -> float:
    return float(x) if x is not None else math.nan


def diagnose(*, metrics: dict, ranks: pd.DataFrame, modules: pd.DataFrame, layers: pd.DataFrame,
             per_task: pd.DataFrame, native_lora: dict, native_qlora: dict,
             eval_loss_lora_mean: float, eval_loss_qlora_mean: float,
             gradient_checkpointing: bool,
             no_stop_rate_lora: float, no_stop_rate_qlora: float, reference_tokens_p95: float,
             memory_measure: str, cos_threshold: float, lora_r: int, lora_targets: str,
             max_new_tokens: int) -> Diagnosis:
    """H1-H3 and the failure modes whose rules fire. ``metrics`` holds the headline numbers
    (``reports/metrics.json`` and ``reports/compare/headline.json`` together);
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
