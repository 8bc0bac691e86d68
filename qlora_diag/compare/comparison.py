"""The ``compare`` stage: does QLoRA learn what 16-bit LoRA learns, and does it behave the same?

Four views of the trained runs (:mod:`qlora_diag.compare.runs` lists them for a params set):

1. **Weights** (:mod:`qlora_diag.compare.adapters`): ΔW of QLoRA vs LoRA at every rank and
   preset, the seed-to-seed noise floor, and per layer whether the QLoRA update points along the
   quantization error W − deq(Q(W)) it trained against.
2. **Function**: from the generations training saved (token match, exact-output agreement,
   exact match) and from forward passes over the whole eval split (KL divergence of the
   next-token distributions and cosine of the final hidden states on response positions).
3. **Base reference**: the base model without adapter, 16-bit and 4-bit.
4. **Transfer**: the QLoRA adapter on the 16-bit base (unmerged and merged), the LoRA adapter on
   the 4-bit base: what a user deploying across base precisions gets.

Each model is loaded once (``models/base`` and ``models/quantized``); adapters are attached with
``PeftModel.from_pretrained`` and removed with ``.unload()``, so memory stays at two bases plus
one adapter each. Eval losses and exact matches of the trained runs are the ones training
recorded in ``run.json``; the forward passes recompute the native losses as a consistency check
(``eval_loss_recompute_max_abs_diff`` in ``setup.json``).

Every "response position" below is a position whose *next* token is a response token (the
positions the training loss is taken on: the prompt's last token up to the response's last).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import statistics
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from qlora_diag.compare.adapters import (
    compare_adapters,
    load_adapter_factors,
    quantization_alignment,
    summarize,
)
from qlora_diag.compare.runs import (
    CROSS_SEED,
    NOISE_LORA,
    NOISE_QLORA,
    SAME_SEED,
    AdapterPair,
    Pair,
    RunFiles,
    adapter_pairs,
    headline_pair,
    noise_seeds,
    preset_pairs,
    rank_pairs,
    run_files,
)
from qlora_diag.core.atomic import atomic_dir, atomic_file, write_json
from qlora_diag.core.config import Params
from qlora_diag.core.errors import UserError
from qlora_diag.core.machine import (
    choose_device,
    cpu_model,
    library_versions,
    resolve_dtype,
)
from qlora_diag.data.batching import collate
from qlora_diag.data.prepare import load_split
from qlora_diag.models.loading import load_tokenizer
from qlora_diag.models.quantization.per_module import quantization_residuals
from qlora_diag.train.generation import (
    exact_match_summary,
    generate_greedy,
    generation_records,
)
from qlora_diag.train.losses import evaluate_loss, response_hidden
from qlora_diag.train.trainer import GenerationCfg, load_method_base

# Columns of the output tables (the plot and report stages read them by name).
PAIR_COLUMNS = ["eval_loss_lora", "eval_loss_qlora", "eval_loss_gap", "exact_match_lora",
                "exact_match_qlora", "token_match_rate", "exact_output_agreement", "kl_mean",
                "hidden_cos_sim", "cos_sim_mean", "subspace_sim_mean", "rel_frob_mean",
                "weights_mb_lora", "weights_mb_qlora", "peak_mem_mb_lora", "peak_mem_mb_qlora",
                "step_time_lora_s", "step_time_qlora_s", "trainable_params"]
RANK_COLUMNS = ["rank", *PAIR_COLUMNS]
MODULE_COLUMNS = ["targets", "rank", *PAIR_COLUMNS, "quality_drop_pct"]
LAYER_COLUMNS = ["layer", "module", "cos_sim", "rel_frob", "frob_dist", "subspace_sim",
                 "norm_lora", "norm_qlora", "norm_residual", "alignment", "alignment_ceiling",
                 "quant_rel_error", "alignment_qlora"]
PAIRS_COLUMNS = ["kind", "run_a", "run_b", "rank", "targets", "seed_a", "seed_b",
                 "cos_sim_mean", "subspace_sim_mean", "rel_frob_mean"]
FUNCTION_COLUMNS = ["run_lora", "run_qlora", "rank", "targets", "eval_loss_lora_recomputed",
                    "eval_loss_qlora_recomputed", "eval_tokens", "kl_mean", "hidden_cos_sim",
                    "token_match_rate", "exact_output_agreement", "n_generations"]
PER_TASK_COLUMNS = ["task", "method", "run", "exact_match", "n"]
SEED_COLUMNS = ["run", "method", "seed", "eval_loss", "exact_match"]
# The cases of the base reference and of the transfer check (keys of base.json/transfer.json).
BASE_CASES = ("base", "base_quantized")
TRANSFER_CASES = ("qlora_on_base", "qlora_merged", "lora_on_quantized")


@dataclasses.dataclass(frozen=True)
class ComparePaths:
    """Inputs (outputs of earlier stages) and outputs of the comparison."""

    base_dir: Path        # stage base: the 16-bit base (LoRA's), with tokenizer
    quant_dir: Path       # stage quantize: the 4-bit base (QLoRA's)
    data_dir: Path        # stage prepare: eval.jsonl
    adapters_dir: Path    # training stages: <run>/ PEFT adapters
    train_dir: Path       # training stages: <run>/run.json, generations.jsonl
    quant_csv: Path       # stage quantize: quantization error per module and configuration
    reports_dir: Path     # metrics.json, ranks.csv, modules.csv, layers.csv
    compare_dir: Path     # pairs.csv, per_task.csv, function.csv, seeds.csv, *.json, generations/


@dataclasses.dataclass
class CompareResult:
    metrics: dict
    ranks: pd.DataFrame
    modules: pd.DataFrame
    layers: pd.DataFrame
    pairs: pd.DataFrame
    function: pd.DataFrame
    per_task: pd.DataFrame
    seeds: pd.DataFrame
    base: dict
    transfer: dict
    setup: dict
    generations: dict[str, list[dict]]  # base and transfer cases, as generations.jsonl rows


# ---------------------------------------------------------------------------------------------
# Pure measures
# ---------------------------------------------------------------------------------------------

def token_match_counts(a: list[int], b: list[int]) -> tuple[int, int]:
    """(positions where ``a`` and ``b`` hold the same token, max(len a, len b)).

    Position-wise: index i counts as a match when both outputs have a token at i and it is the
    same; positions past the shorter output count as mismatches. Two empty outputs give (0, 0).
    """
    return sum(x == y for x, y in zip(a, b)), max(len(a), len(b))


def token_match_rate(outputs_a: list[list[int]], outputs_b: list[list[int]]) -> float:
    """Greedy token match rate of two models' outputs on the same prompts: matching positions
    over all positions, pooled over examples, each example counting up to the longer of its two
    outputs (:func:`token_match_counts`). A token-weighted rate: a long answer counts more than
    a short one. 1.0 for identical outputs (also when all are empty), 0.0 when no position
    agrees. Outputs are eos-free, as :func:`~qlora_diag.train.generation.generate_greedy` returns them,
    so an output that stops earlier loses the positions the other one goes on for."""
    if len(outputs_a) != len(outputs_b):
        raise ValueError(f"token_match_rate: {len(outputs_a)} vs {len(outputs_b)} outputs")
    match = total = 0
    for a, b in zip(outputs_a, outputs_b):
        m, n = token_match_counts(a, b)
        match, total = match + m, total + n
    return match / total if total else 1.0


def exact_output_agreement(outputs_a: list[list[int]], outputs_b: list[list[int]]) -> float:
    """Fraction of prompts on which the two greedy outputs are the same token sequence."""
    if len(outputs_a) != len(outputs_b) or not outputs_a:
        raise ValueError(f"exact_output_agreement: need equally many outputs, got "
                         f"{len(outputs_a)} and {len(outputs_b)}")
    return sum(list(a) == list(b) for a, b in zip(outputs_a, outputs_b)) / len(outputs_a)


def kl_divergence_sum(logits_p: torch.Tensor, logits_q: torch.Tensor) -> float:
    """Σ over rows of KL(P ‖ Q) = Σ_v P(v)·(log P(v) − log Q(v)), in nats, with P = softmax of
    ``logits_p`` and Q = softmax of ``logits_q`` (rows = positions, columns = vocabulary),
    computed in float32 from log-softmax (no log of a rounded probability). 0 for equal logits;
    asymmetric: P is the reference distribution (16-bit LoRA in the comparison)."""
    if logits_p.shape != logits_q.shape:
        raise ValueError(f"kl_divergence_sum: shapes differ, {tuple(logits_p.shape)} vs "
                         f"{tuple(logits_q.shape)}")
    logp = F.log_softmax(logits_p.float(), dim=-1)
    logq = F.log_softmax(logits_q.float(), dim=-1)
    return float(F.kl_div(logq, logp, log_target=True, reduction="sum"))


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


# ---------------------------------------------------------------------------------------------
# Forward passes
# ---------------------------------------------------------------------------------------------

def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def pair_forward_stats(model_a, model_b, records: list[dict], batch_size: int, pad_id: int,
                       desc: str) -> dict[str, float]:
    """One pass of both models over ``records`` (prepared eval rows), on response positions.

    Returns ``loss_a``, ``loss_b`` (token-weighted mean cross-entropy, as
    :func:`~qlora_diag.train.losses.evaluate_loss`), ``kl_mean`` (mean over positions of
    KL(P_a ‖ P_b) of the next-token distributions, nats), ``hidden_cos_sim`` (mean over
    positions of the cosine between the two models' final hidden states, after the last norm)
    and ``n_tokens``. Only response positions are projected onto the vocabulary, so memory is
    one batch of hidden states plus (response tokens × vocabulary) logits per model.
    """
    for m in (model_a, model_b):
        m.eval()
    head_a, head_b = model_a.get_output_embeddings(), model_b.get_output_embeddings()
    order = sorted(range(len(records)), key=lambda i: len(records[i]["input_ids"]))
    loss_a = loss_b = kl = cos = 0.0
    n = 0
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        batch = collate([records[i] for i in order[start:start + batch_size]], pad_id)
        outs = []
        for model, head in ((model_a, head_a), (model_b, head_b)):
            dev = _device(model)
            h, y = response_hidden(model, *(batch[k].to(dev) for k in ("input_ids", "attention_mask", "labels")),
                                   share_prefix=True)
            outs.append((h.float().cpu(), head(h).float().cpu()))
        (ha, la), (hb, lb) = outs
        y = y.cpu()
        loss_a += float(F.cross_entropy(la, y, reduction="sum"))
        loss_b += float(F.cross_entropy(lb, y, reduction="sum"))
        kl += kl_divergence_sum(la, lb)
        cos += float(F.cosine_similarity(ha, hb, dim=-1).sum())
        n += int(y.numel())
    if n == 0:
        raise UserError("the eval split has no response tokens; re-create it with `dvc repro "
                        "prepare` and check data.max_length")
    return {"loss_a": loss_a / n, "loss_b": loss_b / n, "kl_mean": kl / n,
            "hidden_cos_sim": cos / n, "n_tokens": n}


@contextlib.contextmanager
def attached(model, adapter_dir: Path):
    """``model`` with the PEFT adapter at ``adapter_dir`` (inference mode) for the block; the
    LoRA layers are removed again afterwards (``unload``, the base weights untouched)."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    peft_model.eval()
    try:
        yield peft_model
    finally:
        peft_model.unload()


def generate_case(model, records: list[dict], tokenizer, gen: GenerationCfg) -> list[dict]:
    """Greedy generations on ``records`` exactly as training decodes them (same function, same
    n_generate / max_new_tokens / batch size), as generations.jsonl rows."""
    outputs = generate_greedy(model, [r["input_ids"][: r["n_prompt"]] for r in records],
                              max_new_tokens=gen.max_new_tokens, batch_size=gen.batch_size,
                              pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id)
    return generation_records(records, outputs, tokenizer)


# ---------------------------------------------------------------------------------------------
# Weight level
# ---------------------------------------------------------------------------------------------

def _module_subset(model: torch.nn.Module, names: list[str]) -> torch.nn.Module:
    """A container whose ``named_modules()`` yields ``names`` under their full names, sharing
    (not copying) the modules: :func:`quantization_residuals` of all of SmolLM2's linear layers
    would hold ~420 MB of float32 residuals; the adapted ones are what alignment needs."""
    root = torch.nn.Module()
    for name in names:
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            child = dict(parent.named_children()).get(part)
            if child is None:
                child = torch.nn.Module()
                parent.add_module(part, child)
            parent = child
        parent.add_module(leaf, model.get_submodule(name))
    return root


def load_quant_errors(path: Path, quant_type: str, double_quant: bool) -> pd.Series:
    """``{module full name: rel_frob_error}`` of the configured quantization, from the
    quantize stage's table."""
    if not path.is_file():
        raise UserError(f"{path}: quantization error table not found; it is written by the "
                        "stage `quantize`: run `dvc repro quantize`")
    table = pd.read_csv(path)
    need = {"name", "quant_type", "double_quant", "rel_frob_error"}
    if not need <= set(table.columns):
        raise UserError(f"{path}: missing column(s) {', '.join(sorted(need - set(table.columns)))}"
                        "; re-create it with `dvc repro -f quantize`")
    rows = table[(table["quant_type"] == quant_type)
                 & (table["double_quant"].astype(str).str.lower() == str(double_quant).lower())]
    if rows.empty:
        raise UserError(f"{path}: no rows for quant.type = {quant_type}, quant.double_quant = "
                        f"{double_quant}; re-create it with `dvc repro -f quantize`")
    return rows.set_index("name")["rel_frob_error"]


def layer_table(compare: pd.DataFrame, align: pd.DataFrame, quant_errors: pd.Series,
                source: Path) -> pd.DataFrame:
    """``reports/layers.csv`` of the headline pair: :func:`compare_adapters` (QLoRA as ``a``,
    LoRA as reference ``b``) joined with :func:`quantization_alignment` and the module's
    quantization error ‖W − deq(Q(W))‖_F / ‖W‖_F of the configured quant type."""
    lacking = [n for n in compare["name"] if n not in quant_errors.index]
    if lacking:
        raise UserError(f"{source}: no quantization error for adapted module(s) "
                        f"{', '.join(lacking[:3])}; re-create it with `dvc repro -f quantize`")
    t = compare.merge(align.drop(columns=["layer", "module"]), on="name", validate="one_to_one")
    t = t.rename(columns={"norm_a": "norm_qlora", "norm_b": "norm_lora"})
    t["quant_rel_error"] = [float(quant_errors[n]) for n in t["name"]]
    return t[LAYER_COLUMNS]


# ---------------------------------------------------------------------------------------------
# The four views
# ---------------------------------------------------------------------------------------------

def _require(path: Path, what: str, stage: str) -> Path:
    if not path.exists():
        raise UserError(f"{path}: {what} not found; it is written by the stage `{stage}`: run "
                        f"`dvc repro {stage}`")
    return path


def weight_level(pairs: list[AdapterPair], files: dict[str, RunFiles], k: int,
                 keep_table: tuple[str, str]) -> tuple[pd.DataFrame, dict, pd.DataFrame]:
    """Compare every adapter pair (:func:`compare_adapters`, ``a`` against reference ``b``).

    Returns the ``pairs.csv`` table, ``{(run_a, run_b): summarize(...)}`` and the per-module
    table of the pair ``keep_table``. An adapter's factors are read once and dropped after its
    last pair, so memory holds at most the adapters of the current and pending pairs.
    """
    last_use = {}
    for i, wp in enumerate(pairs):
        last_use[wp.a.name] = last_use[wp.b.name] = i
    factors: dict[str, dict] = {}
    rows, summaries, kept = [], {}, None
    for i, wp in enumerate(tqdm(pairs, desc="adapter pairs", unit="pair", leave=False)):
        for spec in (wp.a, wp.b):
            if spec.name not in factors:
                factors[spec.name] = load_adapter_factors(files[spec.name].check_adapter())
        table = compare_adapters(factors[wp.a.name], factors[wp.b.name], k=k)
        s = summarize(table)
        summaries[(wp.a.name, wp.b.name)] = s
        if (wp.a.name, wp.b.name) == keep_table:
            kept = table
        rows.append({"kind": wp.kind, "run_a": wp.a.name, "run_b": wp.b.name, "rank": wp.a.rank,
                     "targets": wp.a.targets, "seed_a": wp.a.seed, "seed_b": wp.b.seed,
                     "cos_sim_mean": s["cos_sim_mean"], "subspace_sim_mean": s["subspace_sim_mean"],
                     "rel_frob_mean": s["rel_frob_mean"]})
        for name in {wp.a.name, wp.b.name}:
            if last_use[name] == i:
                del factors[name]
    if kept is None:
        raise ValueError(f"weight_level: pair {keep_table} is not among the compared pairs")
    return pd.DataFrame(rows, columns=PAIRS_COLUMNS), summaries, kept


def headline_layers(base, quant, lora_dir: Path, qlora_dir: Path, compare: pd.DataFrame,
                    quant_errors: pd.Series, quant_csv: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(``layers.csv``, the :func:`quantization_alignment` table) of the headline pair, with the
    residuals W − deq(Q(W)) of the adapted modules of the two loaded bases.

    Must run before any forward pass of ``quant``: on AVX512-BF16 CPUs bitsandbytes repacks
    4-bit weights in place on the first no-grad forward, after which they no longer dequantize
    exactly (:func:`~qlora_diag.models.quantization.dequantized_weight` refuses them).
    """
    f_lora, f_qlora = load_adapter_factors(lora_dir), load_adapter_factors(qlora_dir)
    names = list(f_lora)
    residuals = quantization_residuals(_module_subset(base, names), _module_subset(quant, names))
    align = quantization_alignment(f_lora, f_qlora, residuals)
    return layer_table(compare, align, quant_errors, quant_csv), align


def base_reference(base, quant, eval_records: list[dict], gen_records: list[dict], tokenizer,
                   gen: GenerationCfg, batch_size: int) -> tuple[dict, dict[str, list[dict]]]:
    """The bases without adapter: 16-bit and 4-bit eval loss and exact match, and how far apart
    quantization alone puts them (KL(P_16bit ‖ P_4bit), hidden cosine, token match).

    Returns ``base.json``'s content and the generations of both (``base``, ``base_quantized``).
    """
    fwd = pair_forward_stats(base, quant, eval_records, batch_size, tokenizer.pad_token_id,
                             desc="base vs quantized base")
    rows = {"base": generate_case(base, gen_records, tokenizer, gen),
            "base_quantized": generate_case(quant, gen_records, tokenizer, gen)}
    em = {c: exact_match_summary(rows[c]) for c in BASE_CASES}
    ids = [[r["output_ids"] for r in rows[c]] for c in BASE_CASES]
    out = {"eval_loss": fwd["loss_a"], "eval_loss_quantized": fwd["loss_b"],
           "exact_match": em["base"]["exact_match"],
           "exact_match_quantized": em["base_quantized"]["exact_match"],
           "exact_match_per_task": em["base"]["exact_match_per_task"],
           "exact_match_per_task_quantized": em["base_quantized"]["exact_match_per_task"],
           "kl_mean": fwd["kl_mean"], "hidden_cos_sim": fwd["hidden_cos_sim"],
           "token_match_rate": token_match_rate(*ids),
           "exact_output_agreement": exact_output_agreement(*ids),
           "eval_tokens": fwd["n_tokens"], "n_generations": len(gen_records)}
    return out, rows


def function_level(base, quant, pair: Pair, lora_dir: Path, qlora_dir: Path,
                   generations: dict[str, list[dict]], eval_records: list[dict], batch_size: int,
                   pad_id: int) -> dict:
    """One ``function.csv`` row: the pair's forward-pass numbers (each adapter on its own base,
    attached for the pass and removed after) and its saved generations compared."""
    with attached(base, lora_dir) as m_lora, attached(quant, qlora_dir) as m_qlora:
        fwd = pair_forward_stats(m_lora, m_qlora, eval_records, batch_size, pad_id,
                                 desc=f"{pair.lora.name} vs {pair.qlora.name}")
    out_l = [r["output_ids"] for r in generations[pair.lora.name]]
    out_q = [r["output_ids"] for r in generations[pair.qlora.name]]
    return {"run_lora": pair.lora.name, "run_qlora": pair.qlora.name, "rank": pair.lora.rank,
            "targets": pair.lora.targets, "eval_loss_lora_recomputed": fwd["loss_a"],
            "eval_loss_qlora_recomputed": fwd["loss_b"], "eval_tokens": fwd["n_tokens"],
            "kl_mean": fwd["kl_mean"], "hidden_cos_sim": fwd["hidden_cos_sim"],
            "token_match_rate": token_match_rate(out_l, out_q),
            "exact_output_agreement": exact_output_agreement(out_l, out_q),
            "n_generations": len(out_l)}


def transfer_check(base, quant, lora_dir: Path, qlora_dir: Path, native: dict,
                   eval_records: list[dict], gen_records: list[dict], tokenizer,
                   gen: GenerationCfg, batch_size: int) -> tuple[dict, dict[str, list[dict]]]:
    """The headline adapters on the other base: QLoRA's on the 16-bit base unmerged and merged
    (``merge_and_unload``), LoRA's on the 4-bit base. Eval loss and exact match of each, and
    the change against the adapter's native pairing in ``native`` (``{"lora"|"qlora": {"run",
    "eval_loss", "eval_loss_recomputed", "exact_match"}}``).

    **Consumes** ``base``: merging writes W + ΔW_QLoRA into its weights, so it runs last and
    the caller must not use ``base`` afterwards.
    """
    loss, rows = {}, {}
    with attached(base, qlora_dir) as m:
        loss["qlora_on_base"] = evaluate_loss(m, eval_records, batch_size, tokenizer.pad_token_id)[0]
        rows["qlora_on_base"] = generate_case(m, gen_records, tokenizer, gen)
    with attached(quant, lora_dir) as m:
        loss["lora_on_quantized"] = evaluate_loss(m, eval_records, batch_size,
                                                  tokenizer.pad_token_id)[0]
        rows["lora_on_quantized"] = generate_case(m, gen_records, tokenizer, gen)
    from peft import PeftModel

    merged = PeftModel.from_pretrained(base, str(qlora_dir)).merge_and_unload()
    merged.eval()
    loss["qlora_merged"] = evaluate_loss(merged, eval_records, batch_size,
                                                 tokenizer.pad_token_id)[0]
    rows["qlora_merged"] = generate_case(merged, gen_records, tokenizer, gen)

    # Changes are against the native loss recomputed in this process, so they are free of the
    # rounding differences between training's evaluation and this one.
    native_of = {"qlora_on_base": "qlora", "qlora_merged": "qlora",
                 "lora_on_quantized": "lora"}
    cases = {}
    for case in TRANSFER_CASES:
        em = exact_match_summary(rows[case])
        nat = native[native_of[case]]
        cases[case] = {"adapter": nat["run"],
                       "base": "4-bit" if case == "lora_on_quantized" else "16-bit",
                       "merged": case == "qlora_merged", "eval_loss": loss[case],
                       "exact_match": em["exact_match"],
                       "exact_match_per_task": em["exact_match_per_task"],
                       "eval_loss_change": loss[case] - nat["eval_loss_recomputed"],
                       "exact_match_change": em["exact_match"] - nat["exact_match"]}
    return {"native": native, "cases": cases}, rows


# ---------------------------------------------------------------------------------------------
# Tables and headline metrics
# ---------------------------------------------------------------------------------------------

def pair_row(lora: dict, qlora: dict, weights: dict, function: dict) -> dict:
    """The :data:`PAIR_COLUMNS` of one same-seed pair: training's numbers from the two
    run.json files, the weight :func:`summarize` and the :func:`function_level` row."""
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


def per_task_table(sources: list[tuple[str, str, list[dict]]]) -> pd.DataFrame:
    """``per_task.csv``: exact match per task for each ``(method, run, generation rows)``."""
    rows = []
    for method, run, gens in sources:
        for task, em in exact_match_summary(gens)["exact_match_per_task"].items():
            rows.append({"task": task, "method": method, "run": run, "exact_match": em,
                         "n": sum(r["task"] == task for r in gens)})
    return pd.DataFrame(rows, columns=PER_TASK_COLUMNS)


def _mean(values) -> float:
    values = [float(v) for v in values]
    return statistics.fmean(values) if values else math.nan


def _ratio(a, b) -> float:
    return a / b if a is not None and b else math.nan


def headline_metrics(rank: int, lora: dict, qlora: dict, seed_runs: list[tuple[dict, dict]],
                     weights: dict, pairs: pd.DataFrame, function: dict, align: pd.DataFrame,
                     base: dict, transfer: dict) -> dict:
    """``reports/metrics.json``, flat and numeric.

    Keys without suffix describe the same-seed headline pair (rank ``lora.r``, ``lora.targets``,
    ``seed``; the ranks.csv row of that rank), except the noise-aware ``eval_loss_gap`` = mean
    QLoRA − mean LoRA over the seed runs ``seed_runs`` (``(lora, qlora)`` run.json per seed),
    next to ``eval_loss_{lora,qlora}_mean``/``_std`` and the seed spread
    (:func:`noise_aware_gap`). ``noise_floor_cos_sim*`` and ``cross_seed_cos_sim`` are means over
    pairs of ``pairs.csv`` of each pair's mean cosine over modules.
    """
    gap = noise_aware_gap([l["eval_loss"] for l, _ in seed_runs],
                          [q["eval_loss"] for _, q in seed_runs])
    em_l = seed_stats([l["exact_match"] for l, _ in seed_runs])
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
    return m


# ---------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------

def run_compare(params: Params, paths: ComparePaths) -> CompareResult:
    """Compute every table and metric of the comparison (nothing is written: see
    :func:`write_outputs`). Every input is checked before a model is loaded; a missing one is
    a :class:`UserError` naming the path and the stage that writes it."""
    p, timings, t_start = params, {}, time.perf_counter()
    gen = GenerationCfg(n_generate=p.compare.n_generate, max_new_tokens=p.compare.max_new_tokens,
                        batch_size=p.compare.gen_batch_size)
    # The forward passes are no-grad evaluation like generation, so they share its batch size.
    batch_size = p.compare.gen_batch_size

    # --- inputs
    _require(paths.base_dir, "the 16-bit base model", "base")
    _require(paths.quant_dir, "the 4-bit base model", "quantize")
    _require(paths.data_dir / "eval.jsonl", "the prepared eval split", "prepare")
    eval_records = load_split(paths.data_dir / "eval.jsonl")
    if gen.n_generate > len(eval_records):
        raise UserError(f"compare.n_generate = {gen.n_generate} is larger than the eval split "
                        f"({len(eval_records)} examples in {paths.data_dir / 'eval.jsonl'})")
    gen_records = eval_records[: gen.n_generate]
    quant_errors = load_quant_errors(paths.quant_csv, p.quant.type, p.quant.double_quant)
    ranks, presets, head = rank_pairs(p), preset_pairs(p), headline_pair(p)
    seed_pairs = [Pair(*(dataclasses.replace(x, seed=s) for x in (head.lora, head.qlora)))
                  for s in noise_seeds(p)]
    files = {s.name: run_files(s, p, paths.adapters_dir, paths.train_dir)
             for pr in (*ranks.values(), *presets.values(), *seed_pairs) for s in (pr.lora, pr.qlora)}
    for f in files.values():
        f.check_adapter()
    runs = {name: f.metrics() for name, f in files.items()}
    # Each same-seed pair of the two sweeps once (the headline pair is in both).
    fn_pairs = list({(pr.lora.name, pr.qlora.name): pr
                     for pr in (*ranks.values(), *presets.values())}.values())
    gen_ids = [r["id"] for r in gen_records]
    generations = {s.name: files[s.name].generations(gen_ids)
                   for pr in fn_pairs for s in (pr.lora, pr.qlora)}

    # --- 1. weights (adapters only)
    t0 = time.perf_counter()
    head_key = (head.qlora.name, head.lora.name)
    pairs_df, summaries, head_compare = weight_level(adapter_pairs(p), files, p.compare.subspace_k,
                                                     keep_table=head_key)
    timings["weights_s"] = time.perf_counter() - t0

    # --- models, each loaded once
    t0 = time.perf_counter()
    device = choose_device()
    tokenizer = load_tokenizer(paths.base_dir)
    base, quant = (load_method_base(method, base_dir=paths.base_dir, quant_dir=paths.quant_dir,
                                    base_dtype=p.base.dtype, compute_dtype=p.quant.compute_dtype,
                                    device=device) for method in ("lora", "qlora"))
    timings["load_models_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    lora_dir, qlora_dir = files[head.lora.name].adapter_dir, files[head.qlora.name].adapter_dir
    layers, align = headline_layers(base, quant, lora_dir, qlora_dir, head_compare, quant_errors,
                                    paths.quant_csv)
    timings["alignment_s"] = time.perf_counter() - t0

    # --- 3. base reference, before any adapter is attached
    t0 = time.perf_counter()
    base_out, case_rows = base_reference(base, quant, eval_records, gen_records, tokenizer, gen,
                                         batch_size)
    timings["base_reference_s"] = time.perf_counter() - t0

    # --- 2. function level
    function = {}
    for pr in fn_pairs:
        t0 = time.perf_counter()
        function[(pr.lora.name, pr.qlora.name)] = function_level(
            base, quant, pr, files[pr.lora.name].adapter_dir, files[pr.qlora.name].adapter_dir,
            generations, eval_records, batch_size, tokenizer.pad_token_id)
        timings[f"function_{pr.lora.name}_vs_{pr.qlora.name}_s"] = time.perf_counter() - t0
    head_fn = function[(head.lora.name, head.qlora.name)]

    # --- 4. transfer (merges into base: last use of the models)
    t0 = time.perf_counter()
    native = {m: {"run": s.name, "eval_loss": runs[s.name]["eval_loss"],
                  "eval_loss_recomputed": head_fn[f"eval_loss_{m}_recomputed"],
                  "exact_match": runs[s.name]["exact_match"]}
              for m, s in (("lora", head.lora), ("qlora", head.qlora))}
    transfer, transfer_rows = transfer_check(base, quant, lora_dir, qlora_dir, native,
                                             eval_records, gen_records, tokenizer, gen, batch_size)
    del base, quant
    case_rows |= transfer_rows
    timings["transfer_s"] = time.perf_counter() - t0

    # --- tables and metrics
    def row(pr: Pair) -> dict:
        return pair_row(runs[pr.lora.name], runs[pr.qlora.name],
                        summaries[(pr.qlora.name, pr.lora.name)],
                        function[(pr.lora.name, pr.qlora.name)])

    ranks_df = pd.DataFrame([{"rank": r, **row(pr)} for r, pr in ranks.items()],
                            columns=RANK_COLUMNS)
    module_rows = []
    for t, pr in presets.items():
        r = row(pr)
        module_rows.append({"targets": t, "rank": pr.lora.rank, **r,
                            "quality_drop_pct": quality_drop_pct(r["eval_loss_lora"],
                                                                 r["eval_loss_qlora"])})
    seeds_df = pd.DataFrame([{"run": s.name, "method": s.method, "seed": s.seed,
                              "eval_loss": runs[s.name]["eval_loss"],
                              "exact_match": runs[s.name]["exact_match"]}
                             for pr in seed_pairs for s in (pr.lora, pr.qlora)],
                            columns=SEED_COLUMNS)
    per_task = per_task_table([("lora", head.lora.name, generations[head.lora.name]),
                               ("qlora", head.qlora.name, generations[head.qlora.name]),
                               ("base", "", case_rows["base"]),
                               ("base_quantized", "", case_rows["base_quantized"])])
    metrics = headline_metrics(p.lora.r, runs[head.lora.name], runs[head.qlora.name],
                               [(runs[pr.lora.name], runs[pr.qlora.name]) for pr in seed_pairs],
                               summaries[head_key], pairs_df, head_fn, align, base_out, transfer)
    recompute = [abs(f[f"eval_loss_{m}_recomputed"] - runs[f[f"run_{m}"]]["eval_loss"])
                 for f in function.values() for m in ("lora", "qlora")]
    timings["total_s"] = time.perf_counter() - t_start
    setup = {
        "model": {"source": p.base.model, **_read_json_if(paths.base_dir / "base_info.json")},
        "data": {"source": p.data.source, "n_eval": len(eval_records),
                 "eval_tokens": base_out["eval_tokens"], "n_generate": len(gen_records)},
        "dtypes": {"base": resolve_dtype(p.base.dtype),
                   "quant_compute": resolve_dtype(p.quant.compute_dtype)},
        "device": device.type, "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(), "versions": library_versions(),
        "params": {k: v for k, v in dataclasses.asdict(p).items() if k != "bench"},
        "runs": sorted(runs), "forward_batch_size": batch_size,
        # Training's eval loss and this process's recomputation of it, largest difference.
        "eval_loss_recompute_max_abs_diff": max(recompute), "timings_s": timings,
    }
    return CompareResult(metrics=metrics, ranks=ranks_df,
                         modules=pd.DataFrame(module_rows, columns=MODULE_COLUMNS),
                         layers=layers, pairs=pairs_df,
                         function=pd.DataFrame(list(function.values()), columns=FUNCTION_COLUMNS),
                         per_task=per_task, seeds=seeds_df, base=base_out, transfer=transfer,
                         setup=setup, generations=case_rows)


def _read_json_if(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------

def json_safe(obj):
    """NaN and ±inf -> None (JSON null), recursively: JSON has no NaN, and DVC shows null as
    "-". nan means undefined here (e.g. a seed spread with one seed), never zero."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _write_csv(path: Path, df: pd.DataFrame) -> None:
    with atomic_file(path) as fh:
        df.to_csv(fh, index=False, float_format="%.6g")


def write_outputs(result: CompareResult, paths: ComparePaths) -> None:
    """Write everything atomically: ``reports/compare/`` as one directory, then the CSVs and
    ``metrics.json`` (last, so a metrics file always has its tables next to it)."""
    with atomic_dir(paths.compare_dir) as tmp:
        result.pairs.to_csv(tmp / "pairs.csv", index=False, float_format="%.6g")
        result.per_task.to_csv(tmp / "per_task.csv", index=False, float_format="%.6g")
        result.function.to_csv(tmp / "function.csv", index=False, float_format="%.6g")
        result.seeds.to_csv(tmp / "seeds.csv", index=False, float_format="%.6g")
        for name, obj in (("base", result.base), ("transfer", result.transfer),
                          ("setup", result.setup)):
            (tmp / f"{name}.json").write_text(json.dumps(json_safe(obj), indent=2) + "\n")
        (tmp / "generations").mkdir()
        for case, rows in result.generations.items():
            with open(tmp / "generations" / f"{case}.jsonl", "w") as fh:
                for row in rows:
                    fh.write(json.dumps(row) + "\n")
    _write_csv(paths.reports_dir / "ranks.csv", result.ranks)
    _write_csv(paths.reports_dir / "modules.csv", result.modules)
    _write_csv(paths.reports_dir / "layers.csv", result.layers)
    write_json(paths.reports_dir / "metrics.json", json_safe(result.metrics))


def summary_lines(result: CompareResult) -> list[str]:
    """One line per rank, then the headline with its noise floor and the transfer check."""
    lines = []
    for row in result.ranks.itertuples():
        lines.append(f"r={row.rank:<3} eval_loss lora {row.eval_loss_lora:.4f} qlora "
                     f"{row.eval_loss_qlora:.4f} (gap {row.eval_loss_gap:+.4f})  "
                     f"token match {row.token_match_rate:.3f}  KL {row.kl_mean:.4f}  "
                     f"hidden cos {row.hidden_cos_sim:.4f}  cos(ΔW) {row.cos_sim_mean:.3f}")
    m = result.metrics
    lines.append(f"headline r={m['rank']}: eval_loss_gap {m['eval_loss_gap']:+.4f} over "
                 f"{m['n_seeds']} seed(s) (seed spread {_fmt(m['eval_loss_seed_spread'])}); "
                 f"cos(ΔW) {m['cos_sim_mean']:.3f} vs noise floor "
                 f"{_fmt(m['noise_floor_cos_sim'])}; base loss {m['base_eval_loss']:.4f} -> "
                 f"{m['base_eval_loss_quantized']:.4f} quantized")
    lines.append("transfer: " + "  ".join(
        f"{c} loss {m[f'transfer_{c}_eval_loss']:.4f} em {m[f'transfer_{c}_exact_match']:.3f}"
        for c in TRANSFER_CASES))
    return lines


def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"
