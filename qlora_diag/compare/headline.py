"""The comparison's tables and headline numbers from the measured parts: one row per same-seed
LoRA/QLoRA pair (``ranks.csv``, ``modules.csv``), the seed runs (``seeds.csv``), exact match per
task (``per_task.csv``), and the headline numbers at rank ``lora.r`` with the seed noise next to
them (``metrics.json`` and ``compare/headline.json``, split by
:func:`~qlora_diag.core.schemas.split_headline`).

The yardstick of every LoRA-vs-QLoRA difference is the seed noise: how far apart two runs of one
method land when only the seed differs (:func:`seed_stats`, :func:`noise_aware_gap`).
"""
from __future__ import annotations

import math
import statistics

import pandas as pd

from qlora_diag.core.schemas import (
    CROSS_SEED,
    MODULES_COLUMNS,
    NOISE_LORA,
    NOISE_QLORA,
    PER_TASK_COLUMNS,
    RANKS_COLUMNS,
    SAME_SEED,
    SEEDS_COLUMNS,
    TRANSFER_CASES,
)
from qlora_diag.train.generation import exact_match_summary
from qlora_diag.train.trainer import RunSpec


def seed_stats(values: list[float]) -> dict[str, float]:
    """``mean``, ``std`` and ``spread`` of one method's numbers over seeds.

    ``std`` is the sample standard deviation (ddof = 1); ``spread`` = max − min, the largest
    difference between two seeds of the method. Both are nan with a single seed: one run says
    nothing about seed-to-seed variation.
    """
    if not values:
        raise ValueError("seed_stats: no values")
    if len(values) == 1:
        return {"mean": float(values[0]), "std": math.nan, "spread": math.nan}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values),
            "spread": max(values) - min(values)}


def noise_aware_gap(lora: list[float], qlora: list[float]) -> dict[str, float]:
    """QLoRA − LoRA with the seed noise next to it.

    ``gap`` = mean over QLoRA seeds − mean over LoRA seeds; ``spread_lora``/``spread_qlora`` =
    :func:`seed_stats` spread of each method; ``seed_spread`` = the larger of the two, i.e. the
    largest same-method difference between two seeds (nan with one seed per method). A gap
    smaller than the seed spread is within the noise of training itself.
    """
    sl, sq = seed_stats(lora), seed_stats(qlora)
    spreads = [s for s in (sl["spread"], sq["spread"]) if not math.isnan(s)]
    return {"lora_mean": sl["mean"], "lora_std": sl["std"], "qlora_mean": sq["mean"],
            "qlora_std": sq["std"], "gap": sq["mean"] - sl["mean"],
            "spread_lora": sl["spread"], "spread_qlora": sq["spread"],
            "seed_spread": max(spreads) if spreads else math.nan}


def quality_drop_pct(loss_lora: float, loss_qlora: float) -> float:
    """Relative eval-loss increase of QLoRA over LoRA, in % (negative: QLoRA is better)."""
    return 100.0 * (loss_qlora - loss_lora) / loss_lora


def pair_row(lora: dict, qlora: dict, weights: dict, function: dict) -> dict:
    """The :data:`~qlora_diag.core.schemas.PAIR_METRIC_COLUMNS` of one same-seed pair:
    training's numbers from the two run.json files, the weight
    :func:`~qlora_diag.compare.adapters.summarize_adapter_comparison` and the
    :func:`~qlora_diag.compare.run.function_level` row."""
    return {
        "eval_loss_lora": lora["eval_loss"], "eval_loss_qlora": qlora["eval_loss"],
        "eval_loss_gap": qlora["eval_loss"] - lora["eval_loss"],
        "exact_match_lora": lora["exact_match"], "exact_match_qlora": qlora["exact_match"],
        "token_match_rate": function["token_match_rate"],
        "exact_output_agreement": function["exact_output_agreement"],
        "kl_mean": function["kl_mean"], "hidden_cos_sim": function["hidden_cos_sim"],
        "cos_sim_mean": weights["cos_sim_mean"], "subspace_sim_mean": weights["subspace_sim_mean"],
        "rel_frob_mean": weights["rel_frob_mean"],
        "weights_mb_lora": lora["weights_mb"], "weights_mb_qlora": qlora["weights_mb"],
        "peak_mem_mb_lora": lora["peak_mem_mb"], "peak_mem_mb_qlora": qlora["peak_mem_mb"],
        "step_time_lora_s": lora["step_time_median_s"],
        "step_time_qlora_s": qlora["step_time_median_s"],
        # PEFT adds the same A and B to a Linear4bit as to an nn.Linear: equal for both methods.
        "trainable_params": lora["trainable_params"],
    }


def rank_table(rows: dict[int, dict]) -> pd.DataFrame:
    """``ranks.csv``: ``{rank: pair_row(...)}`` of the rank sweep, one row each."""
    return pd.DataFrame([{"rank": r, **row} for r, row in rows.items()],
                        columns=list(RANKS_COLUMNS))


def module_table(rows: dict[str, tuple[int, dict]]) -> pd.DataFrame:
    """``modules.csv``: ``{targets: (rank, pair_row(...))}`` of the module sweep, with the
    :func:`quality_drop_pct` of each preset."""
    return pd.DataFrame([{"targets": t, "rank": rank, **row,
                          "quality_drop_pct": quality_drop_pct(row["eval_loss_lora"],
                                                               row["eval_loss_qlora"])}
                         for t, (rank, row) in rows.items()], columns=list(MODULES_COLUMNS))


def seed_table(runs: list[tuple[RunSpec, dict]]) -> pd.DataFrame:
    """``seeds.csv``: eval loss and exact match of each ``(run, its run.json)`` at rank
    lora.r."""
    return pd.DataFrame([{"run": s.name, "method": s.method, "seed": s.seed,
                          "eval_loss": run["eval_loss"], "exact_match": run["exact_match"]}
                         for s, run in runs], columns=list(SEEDS_COLUMNS))


def exact_match_by_task(sources: list[tuple[str, str, list[dict]]]) -> pd.DataFrame:
    """``per_task.csv``: exact match per task for each ``(method, run, generation rows)``."""
    rows = []
    for method, run, gens in sources:
        for task, em in exact_match_summary(gens)["exact_match_per_task"].items():
            rows.append({"task": task, "method": method, "run": run, "exact_match": em,
                         "n": sum(r["task"] == task for r in gens)})
    return pd.DataFrame(rows, columns=list(PER_TASK_COLUMNS))


def _mean(values) -> float:
    values = [float(v) for v in values]
    return statistics.fmean(values) if values else math.nan


def _ratio(a, b) -> float:
    return a / b if a is not None and b else math.nan


def headline_numbers(rank: int, lora: dict, qlora: dict, seed_runs: list[tuple[dict, dict]],
                     weights: dict, pairs: pd.DataFrame, function: dict, align: pd.DataFrame,
                     base: dict, transfer: dict) -> dict:
    """Every headline number, flat and numeric: ``reports/metrics.json`` and
    ``reports/compare/headline.json`` together (:func:`~qlora_diag.core.schemas.split_headline`).

    Keys without suffix describe the same-seed headline pair (rank ``lora.r``, ``lora.targets``,
    ``seed``; the ranks.csv row of that rank), except the noise-aware ``eval_loss_gap`` = mean
    QLoRA − mean LoRA over the seed runs ``seed_runs`` (``(lora, qlora)`` run.json per seed),
    next to ``eval_loss_{lora,qlora}_mean``/``_std`` and the seed spread
    (:func:`noise_aware_gap`). ``noise_floor_cos_sim*`` and ``cross_seed_cos_sim`` are means over
    pairs of ``pairs.csv`` of each pair's mean cosine over modules.
    """
    gap = noise_aware_gap([lo["eval_loss"] for lo, _ in seed_runs],
                          [q["eval_loss"] for _, q in seed_runs])
    em_l = seed_stats([lo["exact_match"] for lo, _ in seed_runs])
    em_q = seed_stats([q["exact_match"] for _, q in seed_runs])
    seed_qlora = {q["run"] for _, q in seed_runs}

    def kind_mean(*kinds) -> float:
        return _mean(pairs.loc[pairs["kind"].isin(kinds), "cos_sim_mean"])

    same = pairs[(pairs["kind"] == SAME_SEED) & pairs["run_a"].isin(seed_qlora)]
    m = {
        "rank": rank,
        "eval_loss_lora": lora["eval_loss"], "eval_loss_qlora": qlora["eval_loss"],
        "eval_loss_gap_same_seed": qlora["eval_loss"] - lora["eval_loss"],
        "exact_match_lora": lora["exact_match"], "exact_match_qlora": qlora["exact_match"],
        "n_seeds": len(seed_runs),
        "eval_loss_lora_mean": gap["lora_mean"], "eval_loss_lora_std": gap["lora_std"],
        "eval_loss_qlora_mean": gap["qlora_mean"], "eval_loss_qlora_std": gap["qlora_std"],
        "eval_loss_gap": gap["gap"], "eval_loss_seed_spread": gap["seed_spread"],
        "eval_loss_seed_spread_lora": gap["spread_lora"],
        "eval_loss_seed_spread_qlora": gap["spread_qlora"],
        "exact_match_lora_mean": em_l["mean"], "exact_match_lora_std": em_l["std"],
        "exact_match_qlora_mean": em_q["mean"], "exact_match_qlora_std": em_q["std"],
        "token_match_rate": function["token_match_rate"],
        "exact_output_agreement": function["exact_output_agreement"],
        "kl_mean": function["kl_mean"], "hidden_cos_sim": function["hidden_cos_sim"],
        "cos_sim_mean": weights["cos_sim_mean"], "subspace_sim_mean": weights["subspace_sim_mean"],
        "rel_frob_mean": weights["rel_frob_mean"],
        "same_seed_cos_sim_over_seeds": _mean(same["cos_sim_mean"]),
        "noise_floor_cos_sim": kind_mean(NOISE_LORA, NOISE_QLORA),
        "noise_floor_cos_sim_lora": kind_mean(NOISE_LORA),
        "noise_floor_cos_sim_qlora": kind_mean(NOISE_QLORA),
        "cross_seed_cos_sim": kind_mean(CROSS_SEED),
        "alignment_mean": float(align["alignment"].mean(skipna=False)),
        "alignment_ceiling_mean": float(align["alignment_ceiling"].mean(skipna=False)),
        "alignment_chance_mean": float(align["alignment_chance"].mean(skipna=False)),
        "peak_mem_mb_lora": lora["peak_mem_mb"], "peak_mem_mb_qlora": qlora["peak_mem_mb"],
        "peak_mem_growth_mb_lora": lora["peak_mem_growth_mb"],
        "peak_mem_growth_mb_qlora": qlora["peak_mem_growth_mb"],
        "weights_mb_lora": lora["weights_mb"], "weights_mb_qlora": qlora["weights_mb"],
        "step_time_lora_s": lora["step_time_median_s"],
        "step_time_qlora_s": qlora["step_time_median_s"],
        "step_time_ratio": _ratio(qlora["step_time_median_s"], lora["step_time_median_s"]),
        "tokens_per_s_lora": lora["tokens_per_s"], "tokens_per_s_qlora": qlora["tokens_per_s"],
        "base_eval_loss": base["eval_loss"], "base_eval_loss_quantized": base["eval_loss_quantized"],
        "base_exact_match": base["exact_match"],
        "base_exact_match_quantized": base["exact_match_quantized"],
        "base_kl_mean": base["kl_mean"], "base_hidden_cos_sim": base["hidden_cos_sim"],
        "base_token_match_rate": base["token_match_rate"],
    }
    for case in TRANSFER_CASES:
        m[f"transfer_{case}_eval_loss"] = transfer["cases"][case]["eval_loss"]
        m[f"transfer_{case}_exact_match"] = transfer["cases"][case]["exact_match"]
        m[f"transfer_{case}_eval_loss_change"] = transfer["cases"][case]["eval_loss_change"]
        m[f"transfer_{case}_exact_match_change"] = transfer["cases"][case]["exact_match_change"]
    for method in ("lora", "qlora"):
        for what in ("eval_loss", "exact_match"):
            m[f"transfer_native_{method}_{what}"] = transfer["native"][method][what]
    return m
