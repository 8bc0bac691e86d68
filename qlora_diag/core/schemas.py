"""The contract of every file one stage writes and a later stage reads: CSV columns, JSON keys,
and the fixed names that appear as values (pair kinds, comparison cases).

Defined once here and used by both sides: the writer builds its tables with these columns (the
compare stage) or is checked against them by a test (``tests/test_schemas.py`` for the quantize,
prepare and train stages' writers), and the readers (:mod:`qlora_diag.compare.runs`,
:mod:`qlora_diag.report.inputs`) require every listed column or key, naming the file and what is
missing. Paths are relative to the repository; ``<run>`` is a run name
(:func:`qlora_diag.core.config.run_name`). No imports beyond the standard library: the plot stage
reads these without loading torch.
"""
from __future__ import annotations

# ---------------------------------------------------------------------------------------------
# Stage prepare
# ---------------------------------------------------------------------------------------------

# reports/data.json: what the prepared splits hold (DVC output of `prepare`).
# what data.splits.prepare_dataset measures ...
DATA_STATS_KEYS = ("source", "n_available", "max_length", "splits")
# ... and the whole file, after stages/prepare.py adds the settings it checked and resolved
DATA_KEYS = (*DATA_STATS_KEYS, "max_truncated_share", "max_new_tokens")
# reports/data.json["splits"]["train" | "eval"]
DATA_SPLIT_KEYS = ("n", "n_dropped", "n_truncated", "tasks", "tokens", "truncated_share", "untruncated",
                   "nearest_rank_p95")
DATA_SPLITS = ("train", "eval")

# ---------------------------------------------------------------------------------------------
# Stage quantize
# ---------------------------------------------------------------------------------------------

# reports/quantization.csv: one row per linear module and quantization configuration.
QUANTIZATION_COLUMNS = ("name", "layer", "module", "quant_type", "double_quant", "n_params",
                        "rel_frob_error", "cosine", "bits_per_param")
# reports/quantization.json: the chosen configuration's numbers, storage, every configuration.
QUANTIZATION_KEYS = (
    "quant_type", "double_quant", "blocksize", "rel_frob_error_mean", "cosine_mean",
    "bits_per_param_measured", "bits_per_param_paper", "bytes_per_param_model",
    "bytes_per_param_quantized_linear", "bytes_per_param_quoted_qlora",
    "bytes_per_param_16bit_model", "weights_mb_16bit", "weights_mb_4bit", "mb_4bit_by_category",
    "n_params", "n_params_quantized", "shared_tensors", "configs", "kept_16bit", "disk_mb_base",
    "disk_mb_quantized",
)
# Keys of reports/quantization.json["configs"]: quant type, "_dq" with double quantization.
QUANT_CONFIG_KEYS = ("nf4", "nf4_dq", "fp4", "fp4_dq")


def quant_config_key(quant_type: str, double_quant: bool) -> str:
    """``nf4`` / ``nf4_dq`` / ...: the key of one configuration in quantization.json."""
    return f"{quant_type}_dq" if double_quant else quant_type


# ---------------------------------------------------------------------------------------------
# Training stages (reports/train/<run>/)
# ---------------------------------------------------------------------------------------------

# reports/train/<run>/run.json, in the order training writes them.
RUN_KEYS = (
    "run", "method", "rank", "targets", "seed", "data_seed", "optimizer", "device", "dtype", "kbit_prep",
    "trainable_params", "eval_loss", "eval_perplexity", "eval_tokens", "train_loss_final",
    "exact_match", "exact_match_per_task", "chrf", "weights_mb", "peak_mem_mb", "peak_mem_growth_mb",
    "memory_measure", "step_time_median_s", "tokens_per_s", "timed_steps", "resumed_from_step",
    "train_steps_s", "eval_s", "generation_s", "wall_s",
)
# One line of reports/train/<run>/generations.jsonl and of
# reports/compare/generations/<case>.jsonl: a greedy generation of one eval example.
GENERATION_KEYS = ("id", "task", "prompt", "reference", "output", "output_ids", "exact_match")
# One line of reports/train/<run>/examples.jsonl and of reports/compare/examples/<name>.jsonl:
# one eval example, in eval-split order (qlora_diag.core.examples). nll_sum = summed response
# negative log-likelihood in nats (sum(nll_sum) / sum(n_tokens) is the eval loss); exact_match
# (0/1) and output (the greedy answer) for the first compare.n_generate examples, null after.
EXAMPLE_KEYS = ("id", "family", "nll_sum", "n_tokens", "exact_match", "output")

# ---------------------------------------------------------------------------------------------
# Stage compare
# ---------------------------------------------------------------------------------------------

# The numbers of one same-seed LoRA/QLoRA pair: a row of ranks.csv and of modules.csv.
PAIR_METRIC_COLUMNS = (
    "eval_loss_lora", "eval_loss_qlora", "eval_loss_gap", "exact_match_lora",
    "exact_match_qlora", "token_match_rate", "exact_output_agreement", "kl_mean",
    "hidden_cos_sim", "cos_sim_mean", "subspace_sim_mean", "rel_frob_mean", "weights_mb_lora",
    "weights_mb_qlora", "peak_mem_mb_lora", "peak_mem_mb_qlora", "step_time_lora_s",
    "step_time_qlora_s", "trainable_params",
)
# reports/ranks.csv: the rank sweep (H3), one pair per rank.
RANKS_COLUMNS = ("rank", *PAIR_METRIC_COLUMNS)
# reports/modules.csv: the target-module sweep (H2), one pair per preset.
MODULES_COLUMNS = ("targets", "rank", *PAIR_METRIC_COLUMNS, "quality_drop_pct")
# reports/layers.csv: the headline pair per adapted module.
LAYERS_COLUMNS = ("layer", "module", "cos_sim", "rel_frob", "frob_dist", "subspace_sim",
                  "norm_lora", "norm_qlora", "norm_residual", "alignment", "alignment_ceiling",
                  "quant_rel_error", "alignment_qlora", "alignment_chance")
# reports/compare/pairs.csv: every adapter pair compared at the weight level.
PAIRS_COLUMNS = ("kind", "run_a", "run_b", "rank", "targets", "seed_a", "seed_b",
                 "cos_sim_mean", "subspace_sim_mean", "rel_frob_mean")
# reports/compare/function.csv: forward passes and generations of each same-seed pair.
FUNCTION_COLUMNS = ("run_lora", "run_qlora", "rank", "targets", "eval_loss_lora_recomputed",
                    "eval_loss_qlora_recomputed", "eval_tokens", "kl_mean", "hidden_cos_sim",
                    "token_match_rate", "exact_output_agreement", "n_generations")
# reports/compare/per_task.csv: exact match per task of the headline runs and the bases.
PER_TASK_COLUMNS = ("task", "method", "run", "exact_match", "n")
# reports/compare/seeds.csv: the runs at rank lora.r, every seed.
SEEDS_COLUMNS = ("run", "method", "seed", "eval_loss", "exact_match")

# The "kind" values of pairs.csv.
SAME_SEED = "same_seed"      # QLoRA vs LoRA, one seed: quantization alone
NOISE_LORA = "noise_lora"    # LoRA vs LoRA, two seeds: the noise floor
NOISE_QLORA = "noise_qlora"  # QLoRA vs QLoRA, two seeds: the noise floor
CROSS_SEED = "cross_seed"    # QLoRA of one seed vs LoRA of another
PAIR_KINDS = (SAME_SEED, NOISE_LORA, NOISE_QLORA, CROSS_SEED)

# reports/compare/floors.csv: the weight-level noise floors, every pair of runs at rank lora.r
# on lora.targets (qlora_diag.compare.floors): one row per pair, its kind (below), the two runs
# (a = the LoRA run in LoRA-vs-QLoRA kinds, the earlier seed in same-method kinds), their init
# (seed_*) and data-order (data_seed_*) seeds, and means over adapted modules of cos(ΔW_a, ΔW_b),
# the subspace similarity phi (mean of left = column space and right = row space, and each),
# and ||ΔW_a - ΔW_b||_F / ||ΔW_b||_F.
FLOORS_COLUMNS = ("kind", "run_a", "run_b", "rank", "targets", "seed_a", "seed_b",
                  "data_seed_a", "data_seed_b", "cos_sim_mean", "subspace_sim_mean",
                  "subspace_sim_left_mean", "subspace_sim_right_mean", "rel_frob_mean",
                  "n_modules")
# reports/compare/function_floors.csv: the function-level noise floors on the eval split
# (KL(P_a || P_b) and hidden-state cosine on response positions, from one forward pass of both;
# token match and exact-output agreement of the two runs' greedy generations from training).
FUNCTION_FLOORS_COLUMNS = ("kind", "run_a", "run_b", "seed_a", "seed_b", "data_seed_a",
                           "data_seed_b", "eval_loss_a", "eval_loss_b", "kl_mean",
                           "hidden_cos_sim", "token_match_rate", "exact_output_agreement",
                           "eval_tokens", "n_generations")
# The "kind" values of floors.csv and function_floors.csv.
FLOOR_LORA = "lora-lora"                  # two seeds of LoRA (init and data order differ)
FLOOR_QLORA = "qlora-qlora"               # two seeds of QLoRA
FLOOR_CROSS = "lora-qlora-cross"          # LoRA of seed s vs QLoRA of seed t != s
FLOOR_SAME = "lora-qlora-same"            # LoRA vs QLoRA, same init and data order
FLOOR_CONTROL = "lora-qlora-control"      # LoRA of seed s vs QLoRA with init s, other data
FLOOR_LORA_CONTROL = "lora-lora-control"  # LoRA of seed s vs LoRA with init s, other data
FLOOR_QLORA_CONTROL = "qlora-qlora-control"  # QLoRA of seed s vs QLoRA with init s, other data
FLOOR_KINDS = (FLOOR_LORA, FLOOR_QLORA, FLOOR_CROSS, FLOOR_SAME, FLOOR_CONTROL,
               FLOOR_LORA_CONTROL, FLOOR_QLORA_CONTROL)

# reports/verdicts.json: one entry per hypothesis, each with the decision of its primary paired
# comparison (SPEC.md, Outputs) beside its status, rule, summary and evidence.
VERDICT_KEYS = ("hypothesis", "status", "rule", "summary", "comparison", "quantity", "unit",
                "estimate", "interval", "interval_90", "bootstrap", "margin", "n_seeds",
                "decision", "seeds_needed", "seeds_needed_for", "sentence", "evidence")
# verdicts.json[h]["interval" | "interval_90" | "bootstrap"]
VERDICT_INTERVAL_KEYS = ("low", "high", "level", "over", "method")
VERDICTS_KEYS = ("h1", "h2", "h3", "failure_modes", "margin", "margin_exact_match")

# The cases of the base reference (keys of base.json's generations) and of the transfer check
# (keys of transfer.json["cases"]); each has reports/compare/generations/<case>.jsonl.
BASE_CASES = ("base", "base_quantized")
TRANSFER_CASES = ("qlora_on_base", "qlora_merged", "lora_on_quantized")
# The headline adapters on their own base as compare evaluates them (the transfer's reference).
NATIVE_CASES = ("native_lora", "native_qlora")
# reports/compare/examples/<case>.jsonl (EXAMPLE_KEYS per line): per-example records of every
# model compare evaluates itself.
EXAMPLE_CASES = (*BASE_CASES, *NATIVE_CASES, *TRANSFER_CASES)

# reports/metrics.json: the DVC metrics, i.e. what `dvc exp show` and `dvc metrics diff` list.
# SPEC.md's headline numbers at rank lora.r plus the number of seeds behind the means; kept
# short so `dvc exp show` fits a terminal.
METRICS_KEYS = (
    "eval_loss_lora", "eval_loss_qlora", "eval_loss_gap", "exact_match_lora",
    "exact_match_qlora", "token_match_rate", "cos_sim_mean", "subspace_sim_mean",
    "noise_floor_cos_sim", "peak_mem_mb_lora", "peak_mem_mb_qlora", "weights_mb_lora",
    "weights_mb_qlora", "step_time_ratio", "n_seeds",
)
# reports/compare/headline.json: every other headline number of the comparison (flat and
# numeric, like metrics.json; the report reads both).
HEADLINE_KEYS = (
    "rank", "eval_loss_gap_same_seed",
    "eval_loss_lora_mean", "eval_loss_lora_std", "eval_loss_qlora_mean", "eval_loss_qlora_std",
    "eval_loss_seed_spread", "eval_loss_seed_spread_lora", "eval_loss_seed_spread_qlora",
    "exact_match_lora_mean", "exact_match_lora_std", "exact_match_qlora_mean",
    "exact_match_qlora_std", "exact_output_agreement", "kl_mean", "hidden_cos_sim",
    "rel_frob_mean", "same_seed_cos_sim_over_seeds", "noise_floor_cos_sim_lora",
    "noise_floor_cos_sim_qlora", "cross_seed_cos_sim", "alignment_mean", "alignment_ceiling_mean",
    "alignment_chance_mean",
    "peak_mem_growth_mb_lora", "peak_mem_growth_mb_qlora", "step_time_lora_s",
    "step_time_qlora_s", "tokens_per_s_lora", "tokens_per_s_qlora", "base_eval_loss",
    "base_eval_loss_quantized", "base_exact_match", "base_exact_match_quantized", "base_kl_mean",
    "base_hidden_cos_sim", "base_token_match_rate",
    *(f"transfer_{case}_{what}" for case in TRANSFER_CASES
      for what in ("eval_loss", "exact_match")),
    # the headline adapters on their own base, evaluated and decoded by compare itself: the
    # other side of every transfer change (change = case - native, both from compare's pass)
    *(f"transfer_native_{method}_{what}" for method in ("lora", "qlora")
      for what in ("eval_loss", "exact_match")),
    *(f"transfer_{case}_{what}_change" for case in TRANSFER_CASES
      for what in ("eval_loss", "exact_match")),
)
# reports/compare/setup.json: what the comparison ran on. model = {source, ...base_info.json},
# dtypes = the resolved {base, quant_compute} ("float32", not "auto"), device "cpu" / "cuda",
# versions = {library: version}.
SETUP_KEYS = ("model", "data", "dtypes", "device", "cpu_model", "cpu_count", "threads",
              "versions", "params", "runs", "forward_batch_size",
              "eval_loss_recompute_max_abs_diff", "timings_s")
SETUP_NESTED_KEYS = {"model": ("source",), "dtypes": ("base", "quant_compute")}


def split_headline(numbers: dict) -> tuple[dict, dict]:
    """``(metrics.json, headline.json)`` contents from all headline numbers, each in its
    schema's key order. A key in neither schema, or a schema key not in ``numbers``, is a
    ValueError: the two files together hold exactly the compare stage's headline numbers."""
    expected = (*METRICS_KEYS, *HEADLINE_KEYS)
    extra = [k for k in numbers if k not in expected]
    missing = [k for k in expected if k not in numbers]
    if extra or missing:
        raise ValueError(f"split_headline: keys not in the schema {extra}, missing {missing}")
    return ({k: numbers[k] for k in METRICS_KEYS}, {k: numbers[k] for k in HEADLINE_KEYS})
