"""``reports/report.md`` and the README summary, written from one run's outputs.

:func:`read_inputs` reads every file the earlier stages wrote (and checks each has the keys or
columns this module uses, naming the file and what is missing); :func:`diagnose_inputs` hands
the numbers to :mod:`qlora_diag.report.verdicts`; :func:`render_report` and :func:`readme_summary` turn
both into markdown. Every number in the text comes from those files; nothing is typed in here.

Number formats are the same everywhere: losses and their gaps 4 decimals, similarities 3,
MB 1, percentages 1, seconds 3, ratios 2.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pandas as pd

from qlora_diag.core.config import SMOLLM2, SMOLLM2_GGUF, Params, run_name
from qlora_diag.core.errors import UserError
from qlora_diag.report import verdicts as vd

# The contract with the compare / quantize / prepare / train stages: what this module reads.
METRIC_KEYS = (
    "eval_loss_lora", "eval_loss_qlora", "eval_loss_gap", "eval_loss_seed_spread",
    "exact_match_lora", "exact_match_qlora", "token_match_rate", "exact_output_agreement",
    "kl_mean", "hidden_cos_sim", "cos_sim_mean", "subspace_sim_mean", "rel_frob_mean",
    "noise_floor_cos_sim", "noise_floor_cos_sim_lora", "noise_floor_cos_sim_qlora",
    "cross_seed_cos_sim", "alignment_mean", "alignment_ceiling_mean",
    "peak_mem_mb_lora", "peak_mem_mb_qlora", "peak_mem_growth_mb_lora", "peak_mem_growth_mb_qlora",
    "weights_mb_lora", "weights_mb_qlora", "step_time_ratio", "tokens_per_s_lora",
    "tokens_per_s_qlora", "base_eval_loss", "base_eval_loss_quantized", "base_exact_match",
    "base_exact_match_quantized", "transfer_qlora_on_base_eval_loss",
    "transfer_qlora_on_base_exact_match", "transfer_qlora_merged_eval_loss",
    "transfer_qlora_merged_exact_match", "transfer_lora_on_quantized_eval_loss",
    "transfer_lora_on_quantized_exact_match",
)
_PAIR_METRICS = ("eval_loss_lora", "eval_loss_qlora", "eval_loss_gap", "exact_match_lora",
                 "exact_match_qlora", "token_match_rate", "exact_output_agreement", "kl_mean",
                 "hidden_cos_sim", "cos_sim_mean", "subspace_sim_mean", "rel_frob_mean",
                 "weights_mb_lora", "weights_mb_qlora", "peak_mem_mb_lora", "peak_mem_mb_qlora")
RANK_COLUMNS = ("rank", *_PAIR_METRICS, "step_time_lora_s", "step_time_qlora_s",
                "trainable_params")
MODULE_COLUMNS = ("targets", *_PAIR_METRICS, "step_time_lora_s", "step_time_qlora_s",
                  "trainable_params", "quality_drop_pct")
LAYER_COLUMNS = ("layer", "module", "cos_sim", "rel_frob", "frob_dist", "subspace_sim",
                 "norm_lora", "norm_qlora", "norm_residual", "alignment", "alignment_ceiling",
                 "quant_rel_error")
PAIR_COLUMNS = ("kind", "run_a", "run_b", "cos_sim_mean", "subspace_sim_mean", "rel_frob_mean")
QUANT_COLUMNS = ("name", "layer", "module", "quant_type", "double_quant", "n_params",
                 "rel_frob_error", "cosine", "bits_per_param")
QUANT_KEYS = ("quant_type", "double_quant", "blocksize", "rel_frob_error_mean",
              "bits_per_param_measured", "bits_per_param_paper",
              "bytes_per_param_model", "bytes_per_param_quantized_linear",
              "bytes_per_param_quoted_qlora", "bytes_per_param_16bit_model", "weights_mb_16bit",
              "weights_mb_4bit", "mb_4bit_by_category", "n_params", "n_params_quantized",
              "kept_16bit", "configs")
# reports/compare/setup.json: model {source, ...base_info.json}, resolved dtypes
# {base, quant_compute} ("float32", not "auto"), device ("cpu"/"cuda"), CPU model, torch
# threads, {library: version}.
SETUP_KEYS = ("model", "dtypes", "device", "cpu_model", "threads", "versions")
SETUP_NESTED_KEYS = {"model": ("source",), "dtypes": ("base", "quant_compute")}
RUN_KEYS = ("seed", "eval_loss", "exact_match", "exact_match_per_task", "memory_measure",
            "optimizer")
PAIR_KINDS = {
    "same_seed": "LoRA vs QLoRA, same seed (quantization alone)",
    "noise_lora": "LoRA vs LoRA, other seed (noise floor)",
    "noise_qlora": "QLoRA vs QLoRA, other seed (noise floor)",
    "cross_seed": "LoRA vs QLoRA, other seed",
}
QUANT_CONFIG_LABELS = {"nf4": "NF4", "nf4_dq": "NF4 + double quant", "fp4": "FP4",
                       "fp4_dq": "FP4 + double quant"}
# RESEARCH.md: QLoRA paper (Dettmers et al. 2023) Table 2, mean perplexity over 125M-13B
# models, and Sec. 3: double quantization cuts the constants from 0.5 to 0.127 bits/param.
PAPER_PPL_NF4_DQ = 27.41
PAPER_PPL_FP4 = 31.07
PAPER_DQ_OVERHEAD_BITS = (0.5, 0.127)
# The quoted memory model (RESEARCH.md): full fine-tuning ~ 12 bytes/param; the adapter term
# 24·k·r·d bytes is 12 bytes per trainable adapter parameter (A and B hold 2·k·r·d of them).
# The 16-bit term 2p is the same number as qlora_diag.models.quantization.QUOTED_BYTES_PER_PARAM_16BIT;
# it is not imported from there because that module loads bitsandbytes (~10 s per plot run).
# The QLoRA term 0.52p and the paper's bits/param are read from reports/quantization.json.
QUOTED_FULL_FT_BYTES_PER_PARAM = 12
QUOTED_ADAPTER_BYTES_PER_PARAM = 12
QUOTED_BYTES_PER_PARAM_16BIT = 2

SECTIONS = (
    "Summary", "Setup", "Headline numbers", "Memory per rank", "Memory accounting",
    "Quality per rank", "Training efficiency", "Noise floor", "Weight similarity per layer",
    "Does the QLoRA adapter undo the quantization error?", "Module sensitivity",
    "Rank threshold", "Quantization error", "Transfer check", "Base model reference",
    "Exact match per task family", "Figures", "Verdicts", "Failure modes", "Caveats",
)
FIGURE_CAPTIONS = {
    "memory.png": "Memory per rank: weights of the loaded model and training peak, LoRA vs QLoRA",
    "rank_threshold.png": "Eval-loss gap vs rank within the ± seed-spread band; cos(ΔW) and "
                          "token match vs rank",
    "weight_similarity_heatmap.png": "cos(ΔW_LoRA, ΔW_QLoRA) per layer and module",
    "module_sensitivity.png": "Per target preset: eval-loss gap, quality drop and KL",
    "quantization_error.png": "Relative error of the frozen weights per module type: NF4 vs "
                              "FP4, with and without double quantization",
    "loss_curves.png": "Train and eval loss of the headline and seed runs",
}


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ReportInputs:
    """Everything the report, the figures and the verdicts read, as loaded from disk."""

    metrics: dict
    ranks: pd.DataFrame
    modules: pd.DataFrame
    layers: pd.DataFrame
    pairs: pd.DataFrame
    quant_table: pd.DataFrame
    quant: dict
    data: dict
    setup: dict
    headline: dict[str, str]          # method -> run name at (lora.r, lora.targets, seed)
    seed_runs: dict[str, list[str]]   # method -> run names of every seed at lora.r
    runs: dict[str, dict]             # run name -> run.json
    run_dirs: dict[str, Path]         # run name -> reports/train/<run>
    per_task: pd.DataFrame            # verdicts.per_task_table over the seed runs
    no_stop_rate: dict[str, float]    # method -> share of outputs hitting max_new_tokens

    @property
    def memory_measure(self) -> str:
        return self.runs[self.headline["lora"]]["memory_measure"]

    @property
    def n_seeds(self) -> int:
        return len(self.seed_runs["lora"])

    @property
    def model(self) -> str:
        return self.setup["model"]["source"]

    @property
    def base_dtype(self) -> str:
        return self.setup["dtypes"]["base"]

    @property
    def compute_dtype(self) -> str:
        return self.setup["dtypes"]["quant_compute"]

    def headline_run(self, method: str) -> dict:
        """``run.json`` of the headline-seed run of ``method`` (``lora`` / ``qlora``)."""
        return self.runs[self.headline[method]]

    def seed_mean(self, method: str, key: str) -> float:
        """Mean of ``run.json[key]`` over the seed runs of ``method`` at rank lora.r."""
        return sum(float(self.runs[n][key]) for n in self.seed_runs[method]) / self.n_seeds


def _need(path: Path) -> Path:
    if not path.exists():
        raise UserError(f"{path}: not found; it is written by an earlier stage, so run "
                        "`dvc repro` (the plot stage reads it)")
    return path


def _read_json(path: Path, keys: tuple[str, ...]) -> dict:
    try:
        obj = json.loads(_need(path).read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno}); re-create it "
                        "with `dvc repro -f` of the stage that writes it") from None
    missing = [k for k in keys if k not in obj]
    if missing:
        raise UserError(f"{path}: missing key(s) {', '.join(missing)}; the stage that writes it "
                        "and the report disagree on its contract")
    return obj


def _read_csv(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    df = pd.read_csv(_need(path))
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)} (has "
                        f"{', '.join(df.columns)}); the stage that writes it and the report "
                        "disagree on its contract")
    if df.empty:
        raise UserError(f"{path}: has no rows")
    return df


def _read_setup(path: Path) -> dict:
    setup = _read_json(path, SETUP_KEYS)
    for key, inner in SETUP_NESTED_KEYS.items():
        missing = [k for k in inner if not isinstance(setup[key], dict) or k not in setup[key]]
        if missing:
            raise UserError(f"{path}: {key} lacks key(s) {', '.join(missing)}; the compare stage "
                            "and the report disagree on its contract")
    return setup


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in _need(path).read_text().splitlines() if line.strip()]


def run_sets(params: Params) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(headline run per method, every seed run per method at rank lora.r, main seed first)."""
    seeds = [params.seed, *params.sweep.seeds]
    headline = {m: run_name(m, params.lora.r, params.lora.targets, params.seed)
                for m in ("lora", "qlora")}
    seed_runs = {m: [run_name(m, params.lora.r, params.lora.targets, s) for s in seeds]
                 for m in ("lora", "qlora")}
    return headline, seed_runs


def read_inputs(reports: Path, params: Params) -> ReportInputs:
    """Read the outputs under ``reports`` (the repository's ``reports/``) for ``params``."""
    reports = Path(reports)
    headline, seed_runs = run_sets(params)
    names = [n for m in ("lora", "qlora") for n in seed_runs[m]]
    run_dirs = {n: reports / "train" / n for n in names}
    runs = {n: _read_json(d / "run.json", RUN_KEYS) for n, d in run_dirs.items()}
    gens = {n: _read_jsonl(d / "generations.jsonl") for n, d in run_dirs.items()}
    first = gens[headline["lora"]]
    n_per_task = pd.Series([r["task"] for r in first]).value_counts().to_dict()
    per_task = vd.per_task_table([runs[n] for n in seed_runs["lora"]],
                                 [runs[n] for n in seed_runs["qlora"]], n_per_task)
    no_stop = {m: vd.max_length_rate([r for n in seed_runs[m] for r in gens[n]],
                                     params.compare.max_new_tokens) for m in ("lora", "qlora")}
    # JSON has no nan: the compare stage writes an undefined number (e.g. no step timed in a
    # tiny run) as null; here it becomes nan again and prints as "n/a".
    metrics = {k: math.nan if v is None else v
               for k, v in _read_json(reports / "metrics.json", METRIC_KEYS).items()}
    return ReportInputs(
        metrics=metrics,
        ranks=_read_csv(reports / "ranks.csv", RANK_COLUMNS).sort_values("rank", ignore_index=True),
        modules=_read_csv(reports / "modules.csv", MODULE_COLUMNS),
        layers=_read_csv(reports / "layers.csv", LAYER_COLUMNS),
        pairs=_read_csv(reports / "compare" / "pairs.csv", PAIR_COLUMNS),
        quant_table=_read_csv(reports / "quantization.csv", QUANT_COLUMNS),
        quant=_read_json(reports / "quantization.json", QUANT_KEYS),
        data=_read_json(reports / "data.json", ("source", "max_length", "splits")),
        setup=_read_setup(reports / "compare" / "setup.json"),
        headline=headline, seed_runs=seed_runs, runs=runs, run_dirs=run_dirs,
        per_task=per_task, no_stop_rate=no_stop)


def diagnose_inputs(inputs: ReportInputs, params: Params) -> vd.Diagnosis:
    """:func:`qlora_diag.report.verdicts.diagnose` on the loaded inputs."""
    return vd.diagnose(
        metrics=inputs.metrics, ranks=inputs.ranks, modules=inputs.modules,
        layers=inputs.layers, per_task=inputs.per_task,
        native_lora=inputs.headline_run("lora"), native_qlora=inputs.headline_run("qlora"),
        eval_loss_lora_mean=inputs.seed_mean("lora", "eval_loss"),
        eval_loss_qlora_mean=inputs.seed_mean("qlora", "eval_loss"),
        gradient_checkpointing=params.train.kbit_prep,
        no_stop_rate_lora=inputs.no_stop_rate["lora"],
        no_stop_rate_qlora=inputs.no_stop_rate["qlora"],
        reference_tokens_p95=float(inputs.data["splits"]["eval"]["tokens"]["response"]["p95"]),
        memory_measure=inputs.memory_measure, cos_threshold=params.compare.cos_threshold,
        lora_r=params.lora.r, lora_targets=params.lora.targets,
        max_new_tokens=params.compare.max_new_tokens)


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------

def _isnan(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _f(x, nd: int) -> str:
    """Fixed decimals; n/a for a missing or undefined number (e.g. a nan subspace similarity)."""
    return "n/a" if _isnan(x) else f"{float(x):.{nd}f}"


def _loss(x) -> str:
    return _f(x, 4)


def _gap(x) -> str:
    return "n/a" if _isnan(x) else f"{float(x):+.4f}"


def _sim(x) -> str:
    return _f(x, 3)


def _mb(x) -> str:
    return _f(x, 1)


def _pct(frac) -> str:
    """A fraction in [0, 1] as a percentage."""
    return "n/a" if _isnan(frac) else f"{100 * float(frac):.1f} %"


def _pct_value(x) -> str:
    """A number already in percent."""
    return "n/a" if _isnan(x) else f"{float(x):.1f} %"


def _s(x) -> str:
    return _f(x, 3)


def _ratio(x) -> str:
    return "n/a" if _isnan(x) else f"{float(x):.2f}×"


def _int(x) -> str:
    return f"{int(x):,}"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _reduction(before: float, after: float) -> str:
    return "n/a" if not before else _pct_value(100 * (before - after) / before)


def _list(items) -> str:
    return ", ".join(str(x) for x in items)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _number(key: str, v: float) -> str:
    """A number in the format of its kind, told by its key (see the module docstring)."""
    if "_mb" in key:
        return _mb(v)
    if "pct" in key:
        return _f(v, 1)
    if "rate" in key or "ratio" in key:
        return _f(v, 2)
    if any(k in key for k in ("cos", "sim", "floor", "alignment", "threshold")):
        return _sim(v)
    return _f(v, 4)  # losses, gaps, spreads, KL


def _evidence_value(v, key: str = "") -> str:
    if isinstance(v, bool):
        return _yes(v)
    if v is None:
        return "undetermined"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return _number(key, v)
    if isinstance(v, dict) and {"pearson", "spearman", "n"} <= set(v):
        return (f"Pearson r = {_f(v['pearson'], 3)}, Spearman ρ = {_f(v['spearman'], 3)}, "
                f"n = {v['n']}")
    if isinstance(v, list):
        return "; ".join(", ".join(f"{k} {_evidence_value(x, k)}" for k, x in item.items())
                         if isinstance(item, dict) else str(item) for item in v)
    return str(v)


def _evidence(evidence: dict) -> str:
    return "\n".join(f"  - `{k}`: {_evidence_value(v, k)}" for k, v in evidence.items())


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------

def _row_at(df: pd.DataFrame, col: str, value) -> pd.Series:
    hit = df[df[col] == value]
    if hit.empty:
        raise UserError(f"no row with {col} = {value} in the {col} table; the sweep and "
                        "params.yaml disagree (re-run `dvc repro`)")
    return hit.iloc[0]


def _section_setup(inp: ReportInputs, p: Params) -> str:
    s, d, m = inp.setup, inp.data, inp.metrics
    tr, ev = d["splits"]["train"], d["splits"]["eval"]
    info = s["model"]
    extra = ", ".join(f"{k} {info[k]}" for k in ("class", "model_type") if k in info)
    size = f", {_int(info['n_params'])} parameters" if "n_params" in info else ""
    lines = [f"- **Base model**: `{inp.model}`" + (f" ({extra}{size})." if extra or size else ".")]
    if inp.model == SMOLLM2:
        lines.append(
            f"  It is shipped as `{SMOLLM2_GGUF}`, a Q4_1 GGUF file: the unquantized base "
            "used for LoRA is those Q4_1 weights dequantized, and QLoRA's base re-quantizes "
            "them to NF4. The quantization error measured here is NF4 on top of an earlier "
            "4-bit rounding, not NF4 of original 16-bit weights.")
    lines.append(
        f"- **Data**: `{d['source']}`, {tr['n']} training and {ev['n']} eval examples over "
        f"{len(ev['tasks'])} task families; max length {d['max_length']} tokens "
        f"({tr['n_truncated'] + ev['n_truncated']} truncated, "
        f"{tr['n_dropped'] + ev['n_dropped']} dropped); eval responses "
        f"{_f(ev['tokens']['response']['mean'], 1)} tokens on average (95th percentile "
        f"{_f(ev['tokens']['response']['p95'], 1)}, with eos). The first "
        f"{p.compare.n_generate} eval examples are decoded greedily (at most "
        f"{p.compare.max_new_tokens} new tokens).")
    versions = ", ".join(f"{k} {v}" for k, v in s["versions"].items())
    lines.append(f"- **Hardware**: {s['device']} ({s['cpu_model']}), {s['threads']} torch threads; "
                 f"peak memory is the {inp.memory_measure}.")
    dtype_line = (f"- **Dtypes (resolved)**: LoRA base `{inp.base_dtype}` (base.dtype = "
                  f"`{p.base.dtype}`), QLoRA compute dtype `{inp.compute_dtype}` "
                  f"(quant.compute_dtype = `{p.quant.compute_dtype}`); adapters train in "
                  "float32.")
    if inp.base_dtype == "float32":
        why = ("`auto` chose float32 because bf16 is emulated on this CPU (no AVX512-BF16/AMX) "
               "and runs several times slower than float32" if p.base.dtype == "auto" else
               "base.dtype asks for float32")
        dtype_line += (f" The \"16-bit\" LoRA base therefore computes and is stored in float32 "
                       f"({why}), so LoRA's weight memory is 4 bytes per parameter here, not 2.")
    lines.append(dtype_line)
    lines.append(
        f"- **Quantization**: {p.quant.type.upper()}"
        f"{' + double quantization' if p.quant.double_quant else ''}, blocks of "
        f"{inp.quant['blocksize']} weights; kept unquantized: {inp.quant['kept_16bit']}.")
    run = inp.runs[inp.headline["lora"]]
    lines.append(
        f"- **Training**: {p.train.max_steps} steps × batch {p.train.batch_size} "
        f"({p.train.max_steps * p.train.batch_size} examples seen), lr {p.train.lr:g} "
        f"({p.train.lr_scheduler}, {p.train.warmup_steps} warm-up steps), optimizer "
        f"{run['optimizer']}, LoRA alpha {p.lora.alpha:g}, dropout {p.lora.dropout:g}, "
        f"targets `{p.lora.targets}`; QLoRA "
        + ("with peft's prepare_model_for_kbit_training (train.kbit_prep: gradient "
           "checkpointing, norms and embeddings upcast to float32)." if p.train.kbit_prep else
           "without prepare_model_for_kbit_training (train.kbit_prep = false: no gradient "
           "checkpointing, the same training code path as LoRA).")
        + (" Prompt prefixes that rows of a batch share are encoded once per step "
           "(train.share_prefix: the same loss and gradient; LoRA dropout on those positions "
           "draws one mask per distinct prefix)." if p.train.share_prefix else ""))
    lines.append(
        f"- **Runs**: rank sweep {_list(p.sweep.ranks)} on `{p.lora.targets}` (seed {p.seed}); "
        f"noise floor: seeds {_list([p.seed, *p.sweep.seeds])} at rank {p.lora.r}; module "
        f"sweep {_list(p.sweep.targets)} at rank {p.lora.r}; H1 threshold θ = "
        f"{p.compare.cos_threshold:.2f}; subspace similarity over the top "
        f"{p.compare.subspace_k} singular directions.")
    lines.append(f"- **Libraries**: {versions}.")
    lines.append(f"- **Reference**: base model eval loss {_loss(m['base_eval_loss'])} "
                 f"({inp.base_dtype}), {_loss(m['base_eval_loss_quantized'])} quantized.")
    return "\n".join(lines)


def _section_headline(inp: ReportInputs, p: Params) -> str:
    m, hl, hq = inp.metrics, inp.headline_run("lora"), inp.headline_run("qlora")
    rows = [
        [f"eval loss, seed {p.seed} (nats/token)", _loss(hl["eval_loss"]),
         _loss(hq["eval_loss"]), f"gap {_gap(hq['eval_loss'] - hl['eval_loss'])}"],
        [f"eval loss, mean over {inp.n_seeds} seeds", _loss(inp.seed_mean("lora", "eval_loss")),
         _loss(inp.seed_mean("qlora", "eval_loss")), f"gap {_gap(m['eval_loss_gap'])}; seed "
         f"spread {_loss(m['eval_loss_seed_spread'])}"],
        [f"exact match, seed {p.seed}", _pct(hl["exact_match"]), _pct(hq["exact_match"]),
         f"base {_pct(m['base_exact_match'])}"],
        [f"exact match, mean over {inp.n_seeds} seeds", _pct(inp.seed_mean("lora", "exact_match")),
         _pct(inp.seed_mean("qlora", "exact_match")),
         f"base quantized {_pct(m['base_exact_match_quantized'])}"],
        ["weights (MB)", _mb(m["weights_mb_lora"]), _mb(m["weights_mb_qlora"]),
         f"{_reduction(m['weights_mb_lora'], m['weights_mb_qlora'])} less"],
        ["training peak (MB)", _mb(m["peak_mem_mb_lora"]), _mb(m["peak_mem_mb_qlora"]),
         inp.memory_measure],
        ["training peak growth (MB)", _mb(m["peak_mem_growth_mb_lora"]),
         _mb(m["peak_mem_growth_mb_qlora"]), "peak minus memory at the start of training"],
        ["tokens per second", _f(m["tokens_per_s_lora"], 1), _f(m["tokens_per_s_qlora"], 1),
         f"QLoRA / LoRA step time {_ratio(m['step_time_ratio'])}"],
    ]
    out = _table(["at rank " + str(p.lora.r) + f", `{p.lora.targets}`", "LoRA", "QLoRA", "note"],
                 rows)
    pair = [
        ["greedy token match rate", _pct(m["token_match_rate"])],
        ["exact output agreement", _pct(m["exact_output_agreement"])],
        ["KL divergence of next-token distributions (nats/token)", _f(m["kl_mean"], 4)],
        ["embedding (final hidden state) cosine similarity", _sim(m["hidden_cos_sim"])],
        ["cos(ΔW), same seed (mean over modules)", _sim(m["cos_sim_mean"])],
        [f"subspace similarity φ({p.compare.subspace_k}, {p.compare.subspace_k})",
         _sim(m["subspace_sim_mean"])],
        ["relative difference ‖ΔW_QLoRA − ΔW_LoRA‖ / ‖ΔW‖", _pct(m["rel_frob_mean"])],
        ["cos(ΔW) noise floor (same method, other seed)", _sim(m["noise_floor_cos_sim"])],
    ]
    return (out + "\n\nLoRA vs QLoRA at the same seed, function and weights:\n\n"
            + _table(["measure", "value"], pair))


def _section_memory(inp: ReportInputs) -> str:
    rows = [[int(r["rank"]), _int(r["trainable_params"]), _mb(r["weights_mb_lora"]),
             _mb(r["weights_mb_qlora"]), _reduction(r["weights_mb_lora"], r["weights_mb_qlora"]),
             _mb(r["peak_mem_mb_lora"]), _mb(r["peak_mem_mb_qlora"]),
             _reduction(r["peak_mem_mb_lora"], r["peak_mem_mb_qlora"])]
            for _, r in inp.ranks.iterrows()]
    device = inp.setup["device"]
    cuda_note = ("" if device == "cuda" else
                 f" There is no CUDA peak: the runs trained on {device}, where the only "
                 "comparable measure is the process's resident memory.")
    return (_table(["rank", "trainable params", "weights LoRA (MB)", "weights QLoRA (MB)",
                    "weights reduction", "peak LoRA (MB)", "peak QLoRA (MB)", "peak reduction"],
                   rows)
            + "\n\n*Weights*: parameters and buffers of the loaded model with its adapter "
              "(`get_memory_footprint`). *Peak*: the " + inp.memory_measure + " during "
              "training, measured the same way for both methods." + cuda_note)


def _section_accounting(inp: ReportInputs, p: Params) -> str:
    q, m = inp.quant, inp.metrics
    n = float(q["n_params"])
    t = float(_row_at(inp.ranks, "rank", p.lora.r)["trainable_params"])
    mb = 2 ** 20
    adapter_mb = QUOTED_ADAPTER_BYTES_PER_PARAM * t / mb
    quoted_qlora = float(q["bytes_per_param_quoted_qlora"])
    paper_bits = float(q["bits_per_param_paper"])
    paper_bytes = paper_bits / 8
    rows = [
        ["unquantized base, bytes/param", _f(QUOTED_BYTES_PER_PARAM_16BIT, 3),
         _f(q["bytes_per_param_16bit_model"], 3), f"stored as {inp.base_dtype}"],
        ["4-bit model as a whole, bytes/param", _f(q["bytes_per_param_quoted_qlora"], 3),
         _f(q["bytes_per_param_model"], 3), "embeddings, norms and LM head stay unquantized"],
        ["quantized linear layers only, bytes/param", _f(paper_bytes, 3),
         _f(q["bytes_per_param_quantized_linear"], 3),
         f"paper {_f(paper_bits, 3)} bits, measured "
         f"{_f(q['bits_per_param_measured'], 3)} bits"],
        ["unquantized base weights (MB)", _mb(QUOTED_BYTES_PER_PARAM_16BIT * n / mb),
         _mb(q["weights_mb_16bit"]), f"p = {_int(n)} parameters"],
        ["4-bit base weights (MB)", _mb(quoted_qlora * n / mb),
         _mb(q["weights_mb_4bit"]), f"{_int(q['n_params_quantized'])} of them quantized"],
        [f"LoRA training at r={p.lora.r} (MB)",
         _mb(QUOTED_BYTES_PER_PARAM_16BIT * n / mb + adapter_mb), _mb(m["peak_mem_mb_lora"]),
         f"quoted 2p + 24·k·r·d, {_int(t)} adapter params; measured: training peak"],
        [f"QLoRA training at r={p.lora.r} (MB)",
         _mb(quoted_qlora * n / mb + adapter_mb), _mb(m["peak_mem_mb_qlora"]),
         "quoted 0.52p + 24·k·r·d; measured: training peak"],
        ["full 16-bit fine-tuning (MB)", _mb(QUOTED_FULL_FT_BYTES_PER_PARAM * n / mb),
         "not measured", "quoted 12p"],
    ]
    cats = q["mb_4bit_by_category"]
    total_4bit = float(q["weights_mb_4bit"])
    unq = {k: v for k, v in cats.items() if k not in ("packed_4bit", "quant_constants") and v}
    share = ", ".join(f"{k} {_mb(v)} MB ({_pct(v / total_4bit)})" for k, v in unq.items())
    extra_bits = float(q["bits_per_param_measured"]) - paper_bits
    peak_ratio = float(m["peak_mem_mb_qlora"]) / (quoted_qlora * n / mb + adapter_mb)
    wrong = [
        f"- The 4-bit model takes {_f(q['bytes_per_param_model'], 3)} bytes/param, not "
        f"{_f(q['bytes_per_param_quoted_qlora'], 3)}: the quoted figure counts every parameter "
        f"as quantized, but these stay unquantized: {share}.",
        f"- The quantized layers alone take {_f(q['bytes_per_param_quantized_linear'], 3)} "
        f"bytes/param against the paper's {_f(paper_bytes, 3)} ({_f(extra_bits, 3)} bits/param "
        + ("more: each matrix also stores its code books, and a partial last block where its "
           "size is not a multiple of the block size; the paper's per-block accounting leaves "
           "both out)." if extra_bits > 0 else
           "difference: the paper's per-block accounting holds here)."),
        f"- The training peak is {_ratio(peak_ratio)} the quoted QLoRA total: the model "
        "ignores activations, their gradients, the framework and its allocator caches, which "
        "dominate a model of this size.",
    ]
    if inp.base_dtype == "float32":
        wrong.append(f"- The unquantized base is float32 here ("
                     f"{_f(q['bytes_per_param_16bit_model'], 3)} bytes/param), so the quoted "
                     "2p undercounts LoRA's weights twofold on this machine.")
    return (_table(["quantity", "quoted model", "measured", "note"], rows)
            + "\n\nWhere the quoted model is wrong here:\n\n" + "\n".join(wrong))


def _section_quality(inp: ReportInputs, p: Params) -> str:
    spread = float(inp.metrics["eval_loss_seed_spread"])
    th = p.compare.cos_threshold
    rows = [[int(r["rank"]), _pct(r["token_match_rate"]), _pct(r["exact_output_agreement"]),
             _sim(r["hidden_cos_sim"]), _loss(r["eval_loss_lora"]), _loss(r["eval_loss_qlora"]),
             _gap(r["eval_loss_gap"]), _yes(abs(r["eval_loss_gap"]) <= spread),
             _f(r["kl_mean"], 4), _sim(r["cos_sim_mean"]), _yes(r["cos_sim_mean"] > th)]
            for _, r in inp.ranks.iterrows()]
    return (_table(["rank", "token match", "exact output agreement", "embedding cos",
                    "eval loss LoRA", "eval loss QLoRA", "gap", "gap ≤ seed spread?", "KL",
                    "cos(ΔW)", f"cos(ΔW) > θ = {th:.2f}?"], rows)
            + f"\n\nOne LoRA/QLoRA pair per rank, seed {p.seed}; the seed spread "
              f"{_loss(spread)} is measured at r={p.lora.r}. Token match, exact output "
              "agreement, embedding cosine and KL compare the LoRA and QLoRA models of the same "
              "seed on the eval prompts.")


def _section_efficiency(inp: ReportInputs, p: Params) -> str:
    rows = [[int(r["rank"]), _s(r["step_time_lora_s"]), _s(r["step_time_qlora_s"]),
             _ratio(r["step_time_qlora_s"] / r["step_time_lora_s"])]
            for _, r in inp.ranks.iterrows()]
    r = _row_at(inp.ranks, "rank", p.lora.r)
    m = inp.metrics
    ratio = float(m["step_time_ratio"])
    table = _table(["rank", "LoRA (s/step)", "QLoRA (s/step)", "QLoRA / LoRA"], rows)
    if math.isnan(ratio):
        return (table + f"\n\nAt rank {p.lora.r} no step time was measured (the runs had no "
                        "steps after the timing warm-up), so no speed is compared.")
    return (table
            + f"\n\nAt rank {p.lora.r}: LoRA {_s(r['step_time_lora_s'])} s/step, QLoRA "
              f"{_s(r['step_time_qlora_s'])} s/step; a QLoRA step takes {_ratio(ratio)} as long "
              f"({'slower' if ratio > 1 else 'faster'}), {_f(m['tokens_per_s_qlora'], 1)} vs "
              f"{_f(m['tokens_per_s_lora'], 1)} tokens/s. Median over steps after the first "
              f"warm-up steps, batch {p.train.batch_size}.")


def _section_noise(inp: ReportInputs) -> str:
    m = inp.metrics
    g = inp.pairs.groupby("kind", sort=False)
    rows = []
    for kind, label in PAIR_KINDS.items():
        if kind not in g.groups:
            continue
        d = g.get_group(kind)
        rows.append([label, len(d), _sim(d["cos_sim_mean"].mean()),
                     _sim(d["subspace_sim_mean"].mean()), _pct(d["rel_frob_mean"].mean())])
    seed_rows = [[label, inp.runs[n]["seed"], _loss(inp.runs[n]["eval_loss"]),
                  _pct(inp.runs[n]["exact_match"])]
                 for method, label in (("lora", "LoRA"), ("qlora", "QLoRA"))
                 for n in inp.seed_runs[method]]
    same, floor = float(m["cos_sim_mean"]), float(m["noise_floor_cos_sim"])
    verdict = ("less than a seed change does" if same >= floor else "more than a seed change does")
    return (_table(["pair", "pairs", "cos(ΔW)", "subspace φ", "relative difference"], rows)
            + f"\n\nMeans over modules, then over pairs. Same-seed LoRA vs QLoRA "
              f"{_sim(same)} against a same-method noise floor of {_sim(floor)} (LoRA "
              f"{_sim(m['noise_floor_cos_sim_lora'])}, QLoRA "
              f"{_sim(m['noise_floor_cos_sim_qlora'])}) and {_sim(m['cross_seed_cos_sim'])} "
              f"for LoRA vs QLoRA across seeds: quantization changes the update {verdict}. "
              f"At function level the seed spread of the eval loss is "
              f"{_loss(m['eval_loss_seed_spread'])} against a LoRA–QLoRA gap of "
              f"{_gap(m['eval_loss_gap'])}:\n\n"
            + _table(["method", "seed", "eval loss", "exact match"], seed_rows))


def _pick_layers(layers: pd.DataFrame) -> list[int]:
    ids = sorted(int(x) for x in layers["layer"].unique())
    return list(dict.fromkeys([ids[0], ids[len(ids) // 2], ids[-1]]))


def _section_layers(inp: ReportInputs) -> str:
    pick = _pick_layers(inp.layers)
    d = inp.layers[inp.layers["layer"].isin(pick)].sort_values(["layer", "module"])
    rows = [[int(r["layer"]), r["module"], _sim(r["cos_sim"]), _f(r["frob_dist"], 4),
             _pct(r["rel_frob"]), _sim(r["subspace_sim"]), _f(r["norm_lora"], 4),
             _f(r["norm_qlora"], 4)] for _, r in d.iterrows()]
    return (_table(["layer", "module", "cosine", "L2 distance ‖ΔW_QLoRA − ΔW_LoRA‖_F",
                    "relative difference", "subspace φ", "‖ΔW_LoRA‖_F", "‖ΔW_QLoRA‖_F"], rows)
            + f"\n\nFirst, middle and last layer ({', '.join(map(str, pick))}) of "
              f"{inp.layers['layer'].nunique()}; every layer is in `reports/layers.csv`.")


def _section_alignment(inp: ReportInputs) -> str:
    m = inp.metrics
    pick = _pick_layers(inp.layers)
    d = inp.layers[inp.layers["layer"].isin(pick)].sort_values(["layer", "module"])
    rows = [[int(r["layer"]), r["module"], _f(r["norm_residual"], 4), _f(r["norm_lora"], 4),
             _f(r["norm_qlora"], 4), _sim(r["alignment"]), _sim(r["alignment_ceiling"]),
             _pct(r["quant_rel_error"])] for _, r in d.iterrows()]
    a, c = float(m["alignment_mean"]), float(m["alignment_ceiling_mean"])
    ratio = a / c if c else math.nan
    size = (inp.layers["norm_residual"] / inp.layers["norm_qlora"]).median()
    return (
        "QLoRA computes with deq(Q(W)) + ΔW_QLoRA; it equals the LoRA model W + ΔW_LoRA when "
        "ΔW_QLoRA − ΔW_LoRA = W − deq(Q(W)). The alignment is the cosine of those two "
        "matrices; a rank-r correction can reach at most the ceiling (Eckart–Young), since the "
        "quantization error is close to full rank.\n\n"
        + _table(["layer", "module", "‖W − deq(Q(W))‖_F", "‖ΔW_LoRA‖_F", "‖ΔW_QLoRA‖_F",
                  "alignment", "ceiling", "quantization rel. error"], rows)
        + f"\n\nMean alignment {_sim(a)} of a possible {_sim(c)} "
          f"({_pct(ratio)} of the ceiling). The quantization error is "
          f"{_f(size, 2)}× the size of the QLoRA update (median over modules): "
          + ("the adapter leans towards undoing it, within what its rank allows"
             if vd.undoes_quantization_error(a, c) else
             "the adapter does not learn to undo it; it learns the task, and the error stays")
          + f" (the rule: alignment ≥ {vd.ALIGNED_FRACTION:.1f} × ceiling).")


def _best_marks(mod: pd.DataFrame) -> list[str]:
    least = mod["quality_drop_pct"].idxmin()
    lowest = mod["eval_loss_qlora"].idxmin()
    return [", ".join(x for x, hit in (("least drop", i == least),
                                       ("lowest QLoRA loss", i == lowest)) if hit)
            for i in mod.index]


def _section_modules(inp: ReportInputs, p: Params, diag: vd.Diagnosis) -> str:
    mod = inp.modules.reset_index(drop=True)
    marks = _best_marks(mod)
    rows = [[f"`{r['targets']}`", _int(r["trainable_params"]), _loss(r["eval_loss_lora"]),
             _loss(r["eval_loss_qlora"]), _gap(r["eval_loss_gap"]),
             _pct_value(r["quality_drop_pct"]), _f(r["kl_mean"], 4), _pct(r["token_match_rate"]),
             _mb(r["weights_mb_qlora"]), _mb(r["peak_mem_mb_qlora"]), marks[i]]
            for i, r in mod.iterrows()]
    ev = diag.h2.evidence
    return (_table(["preset", "trainable params", "eval loss LoRA", "eval loss QLoRA", "gap",
                    "quality drop", "KL", "token match", "weights QLoRA (MB)",
                    "peak QLoRA (MB)", "best"], rows)
            + f"\n\nAt rank {p.lora.r}, seed {p.seed}. Quality drop = relative eval-loss increase "
              f"of QLoRA over LoRA, 100 · (QLoRA − LoRA) / LoRA (`quality_drop_pct`). Most "
              f"sensitive by gap: "
              f"`{ev['most_sensitive']}`, by KL: `{ev['most_sensitive_by_kl']}`; least: "
              f"`{ev['least_sensitive']}`. The presets adapt different numbers of matrices, so "
              "sensitivity here is confounded with adapter capacity.")


def _section_ranks(inp: ReportInputs, p: Params, diag: vd.Diagnosis) -> str:
    spread = float(inp.metrics["eval_loss_seed_spread"])
    rows = [[int(r["rank"]), _gap(r["eval_loss_gap"]), _loss(abs(r["eval_loss_gap"])),
             _yes(abs(r["eval_loss_gap"]) <= spread)] for _, r in inp.ranks.iterrows()]
    r_star = diag.h3.evidence["r_star"]
    head = (f"**r\\* = {r_star}**" if r_star is not None else
            "**r\\* not found in the tested ranks**")
    return (_table(["rank", "gap QLoRA − LoRA", "abs(gap)",
                    f"abs(gap) ≤ seed spread {_loss(spread)}?"], rows)
            + f"\n\n{head} ({diag.h3.status}). Rule: {diag.h3.rule}\n\n{diag.h3.summary}")


def _section_quant(inp: ReportInputs) -> str:
    cfg = inp.quant["configs"]
    rows = [[QUANT_CONFIG_LABELS[k], _pct(v["rel_frob_error_mean"]), _f(v["cosine_mean"], 5),
             _f(v["bits_per_param_measured"], 3), _f(v["bits_per_param_paper"], 3)]
            for k, v in cfg.items() if k in QUANT_CONFIG_LABELS]
    per_module = (inp.quant_table.assign(config=[
        f"{t}_dq" if bool(dq) else t for t, dq in zip(inp.quant_table["quant_type"],
                                                      inp.quant_table["double_quant"])])
        .pivot_table(index="module", columns="config", values="rel_frob_error", aggfunc="mean",
                     sort=False))
    order = [c for c in QUANT_CONFIG_LABELS if c in per_module.columns]
    mrows = [[f"`{mod}`", *(_pct(per_module.loc[mod, c]) for c in order)]
             for mod in per_module.index]
    nf4, fp4 = cfg["nf4"]["rel_frob_error_mean"], cfg["fp4"]["rel_frob_error_mean"]
    agrees = nf4 < fp4
    over_plain = cfg["nf4"]["bits_per_param_measured"] - 4
    over_dq = cfg["nf4_dq"]["bits_per_param_measured"] - 4
    p_plain, p_dq = PAPER_DQ_OVERHEAD_BITS
    text = (
        f"NF4 {'has a lower' if agrees else 'does not have a lower'} mean relative error than "
        f"FP4 ({_pct(nf4)} vs {_pct(fp4)}), which "
        f"{'agrees with' if agrees else 'goes against'} the direction of the QLoRA paper "
        f"(Table 2: mean perplexity NF4 + double quant {PAPER_PPL_NF4_DQ} vs FP4 "
        f"{PAPER_PPL_FP4}). Weight error is not perplexity; it is the quantity NF4 is designed "
        f"to lower. Double quantization: constants overhead measured {_f(over_plain, 3)} → "
        f"{_f(over_dq, 3)} bits/param (saves {_f(over_plain - over_dq, 3)}), paper "
        f"{p_plain} → {p_dq} (saves {_f(p_plain - p_dq, 3)}); the difference is the per-matrix "
        "code books and partial blocks, which weigh more in small matrices.")
    return (_table(["format", "mean relative error", "mean cosine", "bits/param measured",
                    "bits/param paper"], rows)
            + "\n\nMean relative error ‖W − deq(Q(W))‖_F / ‖W‖_F per module type:\n\n"
            + _table(["module", *(QUANT_CONFIG_LABELS[c] for c in order)], mrows)
            + "\n\n" + text)


def _section_transfer(inp: ReportInputs) -> str:
    m = inp.metrics
    q = inp.runs[inp.headline["qlora"]]
    lo = inp.runs[inp.headline["lora"]]
    rows = [
        ["QLoRA adapter on the quantized base (as trained)", _loss(q["eval_loss"]),
         _gap(0.0), _pct(q["exact_match"])],
        ["QLoRA adapter on the unquantized base", _loss(m["transfer_qlora_on_base_eval_loss"]),
         _gap(m["transfer_qlora_on_base_eval_loss"] - q["eval_loss"]),
         _pct(m["transfer_qlora_on_base_exact_match"])],
        ["QLoRA adapter merged into the unquantized base",
         _loss(m["transfer_qlora_merged_eval_loss"]),
         _gap(m["transfer_qlora_merged_eval_loss"] - q["eval_loss"]),
         _pct(m["transfer_qlora_merged_exact_match"])],
        ["LoRA adapter on the unquantized base (as trained)", _loss(lo["eval_loss"]), _gap(0.0),
         _pct(lo["exact_match"])],
        ["LoRA adapter on the quantized base", _loss(m["transfer_lora_on_quantized_eval_loss"]),
         _gap(m["transfer_lora_on_quantized_eval_loss"] - lo["eval_loss"]),
         _pct(m["transfer_lora_on_quantized_exact_match"])],
    ]
    return (_table(["adapter and base", "eval loss", "vs as trained", "exact match"], rows)
            + f"\n\nHeadline-seed adapters (`{inp.headline['qlora']}`, "
              f"`{inp.headline['lora']}`); a change counts when it exceeds the seed spread "
              f"{_loss(m['eval_loss_seed_spread'])}.")


def _section_base(inp: ReportInputs) -> str:
    m = inp.metrics
    rows = [
        [f"base model ({inp.base_dtype})", _loss(m["base_eval_loss"]),
         _pct(m["base_exact_match"])],
        ["base model, quantized", _loss(m["base_eval_loss_quantized"]),
         _pct(m["base_exact_match_quantized"])],
        [f"LoRA (mean over {inp.n_seeds} seeds)", _loss(inp.seed_mean("lora", "eval_loss")),
         _pct(inp.seed_mean("lora", "exact_match"))],
        [f"QLoRA (mean over {inp.n_seeds} seeds)", _loss(inp.seed_mean("qlora", "eval_loss")),
         _pct(inp.seed_mean("qlora", "exact_match"))],
    ]
    base_gap = float(m["base_eval_loss_quantized"]) - float(m["base_eval_loss"])
    gap = float(m["eval_loss_gap"])
    text = (f"Quantization alone raised the base model's eval loss by {_gap(base_gap)}; after "
            f"fine-tuning the QLoRA − LoRA gap is {_gap(gap)}")
    if base_gap > 0:
        text += f", so fine-tuning closed {_pct(1 - gap / base_gap)} of the quantization gap."
    else:
        text += "; quantization did not hurt the base model on this eval set."
    return _table(["model", "eval loss", "exact match"], rows) + "\n\n" + text


def _section_tasks(inp: ReportInputs) -> str:
    rows = [[r.task, int(r.n), _pct(r.exact_match_lora), _pct(r.exact_match_qlora),
             _pct(r.drop), _pct(max(r.spread_lora, r.spread_qlora))]
            for r in inp.per_task.itertuples()]
    return (_table(["task family", "examples", "LoRA", "QLoRA", "drop LoRA − QLoRA",
                    "seed spread (larger method)"], rows)
            + f"\n\nExact match of greedy outputs, mean over {inp.n_seeds} seeds per method "
              "(from each run's `run.json`).")


def _section_figures(figure_dir: str) -> str:
    return "\n\n".join(f"**{cap}.**\n\n![{cap}]({figure_dir}/{name})"
                       for name, cap in FIGURE_CAPTIONS.items())


def _section_verdicts(diag: vd.Diagnosis) -> str:
    out = []
    for v in (diag.h1, diag.h2, diag.h3):
        out.append(f"### {v.hypothesis}: {v.status}\n\n{v.summary}\n\n**Rule.** {v.rule}\n\n"
                   f"**Numbers behind it:**\n\n{_evidence(v.evidence)}")
    return "\n\n".join(out)


def _section_failures(diag: vd.Diagnosis) -> str:
    out = []
    for f in diag.failure_modes:
        out.append(f"### {f.title}\n\n- **Symptom**: {f.symptom}\n- **Cause**: {f.cause}\n"
                   f"- **Mitigation**: {f.mitigation}\n- **Rule**: fires when {f.rule}.")
    fired = {f.key for f in diag.failure_modes}
    quiet = [f"- `{k}`: {rule}" for k, rule in vd.FM_RULES.items() if k not in fired]
    head = ("Only modes whose rule fired on this run are listed."
            if diag.failure_modes else "No failure-mode rule fired on this run.")
    tail = ("\n\nRules checked that did not fire:\n\n" + "\n".join(quiet)) if quiet else ""
    return head + ("\n\n" + "\n\n".join(out) if out else "") + tail


def _section_caveats(inp: ReportInputs, p: Params) -> str:
    ev = inp.data["splits"]["eval"]
    per_task = p.compare.n_generate / max(1, len(ev["tasks"]))
    lines = [
        f"- One machine ({inp.setup['device']}, {inp.setup['cpu_model']}, {inp.setup['threads']} "
        "threads); timings and memory are this machine's and vary between runs by a few "
        "percent.",
        f"- {inp.n_seeds} seeds per method at rank {p.lora.r}; every other rank and preset is "
        "one run per method. The seed spread measured at rank "
        f"{p.lora.r} on `{p.lora.targets}` is applied to all ranks and presets, and a spread "
        f"from {inp.n_seeds} seeds underestimates the true one.",
        f"- Short training: {p.train.max_steps} steps of {p.train.batch_size} examples. Weight "
        "similarities between independently trained adapters grow with longer training; the "
        "noise floor here belongs to this training length.",
        f"- Small eval set: {ev['n']} examples for the loss, {p.compare.n_generate} generated "
        f"(about {_f(per_task, 0)} per task family, so one example moves a task's exact match "
        f"by about {_pct(1 / per_task if per_task else math.nan)}).",
    ]
    if inp.setup["device"] != "cuda":
        lines.append(
            "- CPU-specific: memory is the process's resident memory, not CUDA tensor memory; "
            "bitsandbytes dequantizes on the CPU for every matmul, so QLoRA's speed and memory "
            "here say little about a GPU. Paged optimizers (CUDA only) were not used.")
    if inp.base_dtype == "float32":
        lines.append("- The LoRA base computed in float32, not bf16: LoRA here is a "
                     "higher-precision reference than \"16-bit LoRA\" on a GPU.")
    if inp.model == SMOLLM2:
        lines.append("- The unquantized base is itself dequantized Q4_1 (GGUF), so the NF4 "
                     "error is measured on weights that were already rounded to 4 bits once.")
    return "\n".join(lines)


def _summary(inp: ReportInputs, p: Params, diag: vd.Diagnosis) -> str:
    m = inp.metrics
    lines = [
        f"At rank {p.lora.r} on `{p.lora.targets}`, QLoRA's eval loss is "
        f"{_loss(inp.seed_mean('qlora', 'eval_loss'))} against LoRA's "
        f"{_loss(inp.seed_mean('lora', 'eval_loss'))} (means over {inp.n_seeds} seeds; gap "
        f"{_gap(m['eval_loss_gap'])}, seed spread {_loss(m['eval_loss_seed_spread'])}); the "
        f"weights take {_mb(m['weights_mb_qlora'])} MB instead of {_mb(m['weights_mb_lora'])} "
        f"MB, the training peak {_mb(m['peak_mem_mb_qlora'])} MB instead of "
        f"{_mb(m['peak_mem_mb_lora'])} MB, and a QLoRA step takes "
        f"{_ratio(m['step_time_ratio'])} as long.",
        "",
    ]
    lines += [f"- **{v.hypothesis}: {v.status}.** {v.summary}" for v in (diag.h1, diag.h2, diag.h3)]
    if diag.failure_modes:
        lines.append("- **Failure modes observed**: "
                     + "; ".join(f.title for f in diag.failure_modes) + ".")
    return "\n".join(lines)


def render_report(inputs: ReportInputs, diagnosis: vd.Diagnosis, params: Params,
                  figure_dir: str = "figures") -> str:
    """The whole ``reports/report.md``; figure links are relative to ``figure_dir``."""
    inp, p, diag = inputs, params, diagnosis
    bodies = {
        "Summary": _summary(inp, p, diag),
        "Setup": _section_setup(inp, p),
        "Headline numbers": _section_headline(inp, p),
        "Memory per rank": _section_memory(inp),
        "Memory accounting": _section_accounting(inp, p),
        "Quality per rank": _section_quality(inp, p),
        "Training efficiency": _section_efficiency(inp, p),
        "Noise floor": _section_noise(inp),
        "Weight similarity per layer": _section_layers(inp),
        "Does the QLoRA adapter undo the quantization error?": _section_alignment(inp),
        "Module sensitivity": _section_modules(inp, p, diag),
        "Rank threshold": _section_ranks(inp, p, diag),
        "Quantization error": _section_quant(inp),
        "Transfer check": _section_transfer(inp),
        "Base model reference": _section_base(inp),
        "Exact match per task family": _section_tasks(inp),
        "Figures": _section_figures(figure_dir),
        "Verdicts": _section_verdicts(diag),
        "Failure modes": _section_failures(diag),
        "Caveats": _section_caveats(inp, p),
    }
    title = (f"# When does QLoRA match LoRA? Diagnosis of `{inp.model}` on "
             f"`{inp.data['source']}`")
    parts = [title, "Written by the `plot` stage from this run's `reports/` files; every number "
                    "below comes from them."]
    parts += [f"## {name}\n\n{bodies[name]}" for name in SECTIONS]
    return "\n\n".join(parts) + "\n"


def readme_summary(inputs: ReportInputs, diagnosis: vd.Diagnosis, params: Params,
                   figure_dir: str = "reports/figures") -> str:
    """A short markdown block for README.md: headline table, verdict lines, two figures."""
    m, p = inputs.metrics, params
    rows = [
        [f"eval loss (nats/token, mean over {inputs.n_seeds} seeds)",
         _loss(inputs.seed_mean("lora", "eval_loss")),
         _loss(inputs.seed_mean("qlora", "eval_loss"))],
        [f"exact match (mean over {inputs.n_seeds} seeds)",
         _pct(inputs.seed_mean("lora", "exact_match")),
         _pct(inputs.seed_mean("qlora", "exact_match"))],
        ["weights (MB)", _mb(m["weights_mb_lora"]), _mb(m["weights_mb_qlora"])],
        ["training peak (MB)", _mb(m["peak_mem_mb_lora"]), _mb(m["peak_mem_mb_qlora"])],
        ["tokens per second", _f(m["tokens_per_s_lora"], 1), _f(m["tokens_per_s_qlora"], 1)],
    ]
    verdict_lines = [f"- **{v.hypothesis}: {v.status}.** {v.summary}"
                     for v in (diagnosis.h1, diagnosis.h2, diagnosis.h3)]
    return "\n".join([
        f"**`{inputs.model}`, rank {p.lora.r} on `{p.lora.targets}`, {inputs.n_seeds} "
        f"seeds** (seed spread of the eval loss {_loss(m['eval_loss_seed_spread'])}; "
        f"same-seed cos(ΔW) {_sim(m['cos_sim_mean'])} vs noise floor "
        f"{_sim(m['noise_floor_cos_sim'])}; token match {_pct(m['token_match_rate'])}):",
        "",
        _table(["", "LoRA", "QLoRA"], rows),
        "",
        *verdict_lines,
        "",
        f"![{FIGURE_CAPTIONS['rank_threshold.png']}]({figure_dir}/rank_threshold.png)",
        f"![{FIGURE_CAPTIONS['memory.png']}]({figure_dir}/memory.png)",
        "",
        f"Training peak: {inputs.memory_measure}. Full diagnosis with every table, the rules "
        "and the failure modes: "
        "[reports/report.md](reports/report.md).",
    ]) + "\n"
