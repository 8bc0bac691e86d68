"""The ``compare`` stage's computation: does QLoRA learn what 16-bit LoRA learns, and does it
behave the same?

Four views of the trained runs (:mod:`qlora_diag.compare.runs` lists them for a params set):

1. **Weights** (:mod:`qlora_diag.compare.adapters`): ΔW of QLoRA vs LoRA at every rank and
   preset, the seed-to-seed noise floor, and per layer whether the QLoRA update points along the
   quantization error W − deq(Q(W)) it trained against (:mod:`qlora_diag.compare.layers`).
2. **Function** (:mod:`qlora_diag.compare.function`): from the generations training saved
   (token match, exact-output agreement, exact match) and from forward passes over the whole
   eval split (KL divergence of the next-token distributions and cosine of the final hidden
   states on response positions).
3. **Base reference**: the base model without adapter, 16-bit and 4-bit.
4. **Transfer**: the QLoRA adapter on the 16-bit base (unmerged and merged), the LoRA adapter on
   the 4-bit base: what a user deploying across base precisions gets. The native pairings are
   evaluated here too, so both sides of every transfer change come from this process.
5. **Noise floors** (:mod:`qlora_diag.compare.floors`): every seed pair of one method, the
   cross-seed and same-seed LoRA/QLoRA pairs and the same-init control, at the weight level;
   KL, hidden cosine and token match between consecutive seeds (and the control) at the
   function level.

Every model evaluated here (the bases, the native and transfer pairings) also leaves its
per-example records (:mod:`qlora_diag.core.examples`) in ``reports/compare/examples/``.

Each model is loaded once (``models/base`` and ``models/quantized``); adapters are attached with
``PeftModel.from_pretrained`` and removed with ``.unload()``, so memory stays at two bases plus
one adapter each. Eval losses and exact matches of the trained runs are the ones training
recorded in ``run.json``; the forward passes recompute the native losses as a consistency check
(``eval_loss_recompute_max_abs_diff`` in ``setup.json``). The tables and headline numbers are
assembled by :mod:`qlora_diag.compare.headline` and written by :mod:`qlora_diag.compare.outputs`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from qlora_diag.compare.adapters import (
    compare_adapters,
    load_adapter_factors,
    summarize_adapter_comparison,
)
from qlora_diag.compare.floors import (
    function_floor_pairs,
    function_floors,
    weight_floor_pairs,
    weight_floors,
)
from qlora_diag.compare.function import (
    attached,
    exact_output_agreement,
    pair_forward_stats,
    token_match_rate,
)
from qlora_diag.compare.headline import (
    exact_match_by_task,
    headline_numbers,
    module_table,
    pair_row,
    rank_table,
    seed_table,
)
from qlora_diag.compare.layers import headline_layers, load_quant_errors
from qlora_diag.compare.reference import base_reference, transfer_check
from qlora_diag.compare.runs import (
    AdapterPair,
    Pair,
    RunFiles,
    adapter_pairs,
    control_pair,
    headline_pair,
    noise_seeds,
    preset_pairs,
    rank_pairs,
    run_files,
)
from qlora_diag.core.config import Params
from qlora_diag.core.errors import UserError
from qlora_diag.core.machine import (
    choose_device,
    cpu_model,
    library_versions,
    resolve_dtype,
)
from qlora_diag.core.schemas import (
    FUNCTION_COLUMNS,
    PAIRS_COLUMNS,
)
from qlora_diag.data.resolved import read_max_new_tokens
from qlora_diag.data.splits import load_split
from qlora_diag.models.loading import load_tokenizer
from qlora_diag.train.generation import generation_examples
from qlora_diag.train.trainer import GenerationCfg, load_method_base


@dataclasses.dataclass(frozen=True)
class ComparePaths:
    """Inputs (outputs of earlier stages) and outputs of the comparison."""

    base_dir: Path        # stage base: the 16-bit base (LoRA's), with tokenizer
    quant_dir: Path       # stage quantize: the 4-bit base (QLoRA's)
    data_dir: Path        # stage prepare: eval.jsonl
    resolved_json: Path   # stage prepare: compare.max_new_tokens resolved (data/resolved.json)
    adapters_dir: Path    # training stages: <run>/ PEFT adapters
    train_dir: Path       # training stages: <run>/run.json, generations.jsonl
    quant_csv: Path       # stage quantize: quantization error per module and configuration
    reports_dir: Path     # metrics.json, ranks.csv, modules.csv, layers.csv
    compare_dir: Path     # pairs.csv, per_task.csv, function.csv, seeds.csv, *.json, generations/


@dataclasses.dataclass
class CompareResult:
    """Everything the comparison computed; :func:`~qlora_diag.compare.outputs.write_outputs`
    writes it."""

    metrics: dict       # every headline number: metrics.json and compare/headline.json
    ranks: pd.DataFrame
    modules: pd.DataFrame
    layers: pd.DataFrame
    pairs: pd.DataFrame
    function: pd.DataFrame
    per_task: pd.DataFrame
    seeds: pd.DataFrame
    floors: pd.DataFrame            # weight-level noise floors (compare/floors.csv)
    function_floors: pd.DataFrame   # function-level noise floors (compare/function_floors.csv)
    base: dict
    transfer: dict
    setup: dict
    generations: dict[str, list[dict]]  # base and transfer cases, as generations.jsonl rows
    examples: dict[str, list[dict]]     # per-example records of every EXAMPLE_CASES model


def _require(path: Path, what: str, stage: str) -> Path:
    if not path.exists():
        raise UserError(f"{path}: {what} not found; it is written by the stage `{stage}`: run "
                        f"`dvc repro {stage}`")
    return path


def weight_level(pairs: list[AdapterPair], files: dict[str, RunFiles], k: int,
                 keep_table: tuple[str, str]) -> tuple[pd.DataFrame, dict, pd.DataFrame]:
    """Compare every adapter pair (:func:`compare_adapters`, ``a`` against reference ``b``).

    Returns the ``pairs.csv`` table, ``{(run_a, run_b): summarize_adapter_comparison(...)}``
    and the per-module table of the pair ``keep_table``. An adapter's factors are read once and
    dropped after its last pair, so memory holds at most the adapters of the current and
    pending pairs.
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
        s = summarize_adapter_comparison(table)
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
    return pd.DataFrame(rows, columns=list(PAIRS_COLUMNS)), summaries, kept


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


def run_compare(params: Params, paths: ComparePaths) -> CompareResult:
    """Compute every table and headline number of the comparison (nothing is written: see
    :func:`~qlora_diag.compare.outputs.write_outputs`). Every input is checked before a model
    is loaded; a missing one is a :class:`UserError` naming the path and the stage that
    writes it."""
    p, timings, t_start = params, {}, time.perf_counter()
    gen = GenerationCfg(n_generate=p.compare.n_generate,
                        max_new_tokens=read_max_new_tokens(paths.resolved_json,
                                                           p.compare.max_new_tokens),
                        batch_size=p.compare.gen_batch_size)
    # The forward passes are no-grad evaluation like generation, so they share its batch size.
    batch_size = p.compare.gen_batch_size

    # --- inputs
    _require(paths.base_dir, "the 16-bit base model", "base")
    _require(paths.quant_dir, "the 4-bit base model", "quantize")
    _require(paths.data_dir / "eval.jsonl", "the prepared eval split", "prepare")
    eval_records = load_split(paths.data_dir / "eval.jsonl")
    gen_records = generation_examples(eval_records, gen.n_generate, key="compare.n_generate",
                                      path=paths.data_dir / "eval.jsonl")
    quant_errors = load_quant_errors(paths.quant_csv, p.quant.type, p.quant.double_quant)
    ranks, presets, head = rank_pairs(p), preset_pairs(p), headline_pair(p)
    seed_pairs = [Pair(*(dataclasses.replace(x, seed=s, data_seed=s)
                         for x in (head.lora, head.qlora)))
                  for s in noise_seeds(p)]
    files = {s.name: run_files(s, p, paths.adapters_dir, paths.train_dir)
             for pr in (*ranks.values(), *presets.values(), *seed_pairs, control_pair(p))
             for s in (pr.lora, pr.qlora)}
    for f in files.values():
        f.check_adapter()
    runs = {name: f.metrics() for name, f in files.items()}
    # Each same-seed pair of the two sweeps once (the headline pair is in both).
    fn_pairs = list({(pr.lora.name, pr.qlora.name): pr
                     for pr in (*ranks.values(), *presets.values())}.values())
    gen_ids = [r["id"] for r in gen_records]
    w_floor_pairs, f_floor_pairs = weight_floor_pairs(p), function_floor_pairs(p)
    generations = {s.name: files[s.name].generations(gen_ids)
                   for s in (*(s for pr in fn_pairs for s in (pr.lora, pr.qlora)),
                             *(s for fp in f_floor_pairs for s in (fp.a, fp.b)))}
    adapter_dirs = {name: f.adapter_dir for name, f in files.items()}

    # --- 1. weights (adapters only)
    t0 = time.perf_counter()
    head_key = (head.qlora.name, head.lora.name)
    pairs_df, summaries, head_compare = weight_level(adapter_pairs(p), files, p.compare.subspace_k,
                                                     keep_table=head_key)
    floors = weight_floors(w_floor_pairs, adapter_dirs, p.compare.subspace_k)
    timings["weights_s"] = time.perf_counter() - t0

    # --- models, each loaded once
    t0 = time.perf_counter()
    device = choose_device()
    tokenizer = load_tokenizer(paths.base_dir)

    def load(method: str):
        return load_method_base(method, base_dir=paths.base_dir, quant_dir=paths.quant_dir,
                                base_dtype=p.base.dtype, compute_dtype=p.quant.compute_dtype,
                                device=device)

    base, quant = load("lora"), load("qlora")
    timings["load_models_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    lora_dir, qlora_dir = files[head.lora.name].adapter_dir, files[head.qlora.name].adapter_dir
    layers, align = headline_layers(base, quant, lora_dir, qlora_dir, head_compare, quant_errors,
                                    paths.quant_csv)
    timings["alignment_s"] = time.perf_counter() - t0

    # --- 3. base reference, before any adapter is attached
    t0 = time.perf_counter()
    base_out, case_rows, examples = base_reference(base, quant, eval_records, gen_records,
                                                   tokenizer, gen, batch_size)
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

    # --- noise floors at the function level (a second copy of a base for same-method pairs)
    t0 = time.perf_counter()
    function_floors_df = function_floors(f_floor_pairs, {"lora": base, "qlora": quant}, load,
                                         adapter_dirs, generations, eval_records, batch_size,
                                         tokenizer.pad_token_id)
    timings["function_floors_s"] = time.perf_counter() - t0

    # --- 4. transfer (merges into base: last use of the models)
    t0 = time.perf_counter()
    transfer, transfer_rows, transfer_examples = transfer_check(
        base, quant, lora_dir, qlora_dir, {"lora": head.lora.name, "qlora": head.qlora.name},
        eval_records, gen_records, tokenizer, gen, batch_size)
    del base, quant
    case_rows |= transfer_rows
    examples |= transfer_examples
    timings["transfer_s"] = time.perf_counter() - t0

    # --- tables and metrics
    def row(pr: Pair) -> dict:
        return pair_row(runs[pr.lora.name], runs[pr.qlora.name],
                        summaries[(pr.qlora.name, pr.lora.name)],
                        function[(pr.lora.name, pr.qlora.name)])

    ranks_df = rank_table({r: row(pr) for r, pr in ranks.items()})
    modules_df = module_table({t: (pr.lora.rank, row(pr)) for t, pr in presets.items()})
    seeds_df = seed_table([(s, runs[s.name]) for pr in seed_pairs for s in (pr.lora, pr.qlora)])
    per_task = exact_match_by_task([("lora", head.lora.name, generations[head.lora.name]),
                                    ("qlora", head.qlora.name, generations[head.qlora.name]),
                                    ("base", "", case_rows["base"]),
                                    ("base_quantized", "", case_rows["base_quantized"])])
    numbers = headline_numbers(p.lora.r, runs[head.lora.name], runs[head.qlora.name],
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
    return CompareResult(metrics=numbers, ranks=ranks_df, modules=modules_df, layers=layers,
                         pairs=pairs_df,
                         function=pd.DataFrame(list(function.values()),
                                               columns=list(FUNCTION_COLUMNS)),
                         per_task=per_task, seeds=seeds_df, floors=floors,
                         function_floors=function_floors_df, base=base_out, transfer=transfer,
                         setup=setup, generations=case_rows, examples=examples)


def _read_json_if(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
