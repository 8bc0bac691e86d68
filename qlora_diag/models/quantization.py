"""The 4-bit base of QLoRA: quantize and save it, and measure what quantization does to it.

QLoRA (Dettmers et al. 2023) stores each frozen linear weight W as 4-bit codes plus one absmax
constant per block of 64 weights, and optionally quantizes those constants again ("double
quantization"); the adapter is then trained against dequant(Q(W)), not W. This module

- writes that 4-bit model with transformers + bitsandbytes (:func:`quantize_and_save`),
- measures the error of Q per weight matrix and per configuration (nf4/fp4 x double quant) as
  small pure functions over tensors (:func:`quant_roundtrip`, :func:`relative_frobenius_error`,
  :func:`cosine`, :func:`weight_error_table`),
- measures storage from the tensors really stored, to check the paper's accounting of
  4.5 / 4.127 bits per parameter and the commonly quoted "QLoRA ~ 0.52 bytes per parameter"
  (:func:`measured_bits_per_param`, :func:`model_storage`),
- gives the residuals W - dequant(Q(W)) that the comparison tests the QLoRA adapter against
  (:func:`quantization_residuals`).

Weights are taken as out x in (nn.Linear's layout; a GPT-2 Conv1D weight is transposed), the
layout bitsandbytes quantizes, so the blocks of 64 run along input features as in the model.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import bitsandbytes.functional as bnbf
import pandas as pd
import torch
from torch import Tensor
from tqdm import tqdm

from qlora_diag.core.atomic import atomic_dir
from qlora_diag.core.machine import resolve_dtype, torch_dtype
from qlora_diag.models.loading import check_model_dir
from qlora_diag.models.targets import linear_module_names, parse_module_name

# bitsandbytes' default block size, which transformers' BitsAndBytesConfig does not expose (no
# bnb_4bit_blocksize knob), so the saved model always uses it. QLoRA paper Sec. 3 ("Double
# Quantization"): blocksize 64 for W, 256 for the second-level quantization of the constants.
BLOCKSIZE = 64
# Fixed inside bitsandbytes.functional.quantize_4bit (quantize_blockwise(..., blocksize=256)).
NESTED_BLOCKSIZE = 256
# The four configurations of the error table: QLoRA paper Table 2 compares NF4 with FP4, and
# Sec. 3 double quantization with plain 32-bit constants.
QUANT_CONFIGS = (("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True))
# RESEARCH.md's commonly quoted memory model: 16-bit weights take 2 bytes per parameter; QLoRA
# 0.52 = 4.127 bits / 8 (0.5 byte of 4-bit codes + double-quantized constants), rounded.
QUOTED_BYTES_PER_PARAM_16BIT = 2.0
QUOTED_BYTES_PER_PARAM_QLORA = 0.52

# ---------------------------------------------------------------------------------------------
# Saving the 4-bit model
# ---------------------------------------------------------------------------------------------

def quantize_and_save(base_dir: str | Path, out_dir: str | Path, quant_type: str,
                      double_quant: bool, compute_dtype: str) -> dict:
    """Load the 16-bit base at ``base_dir`` quantized to 4 bits on CPU and save it at ``out_dir``.

    Every nn.Linear except the LM head becomes a ``bnb.nn.Linear4bit`` (block size
    :data:`BLOCKSIZE`); embeddings, LM head and norms stay in ``compute_dtype`` (transformers
    keeps the output embedding and tied weights out of quantization). The directory loads back
    with :func:`qlora_diag.models.loading.load_quantized` (plain ``from_pretrained``: the
    quantization config travels in ``config.json``). Returns facts for the report, also written
    to ``out_dir/quant_info.json``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    check_model_dir(Path(base_dir), key="base model directory")
    dtype = torch_dtype(compute_dtype)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                bnb_4bit_use_double_quant=double_quant,
                                bnb_4bit_compute_dtype=dtype)
    # Quantized on CPU so the packed codes do not depend on a GPU kernel; the CPU codes equal
    # bitsandbytes.functional.quantize_4bit of the 16-bit weights (tests/test_quantization.py).
    model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=config,
                                                 dtype=dtype, device_map="cpu")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    info = {"quant_type": quant_type, "double_quant": double_quant,
            "compute_dtype": resolve_dtype(compute_dtype), "blocksize": BLOCKSIZE,
            "nested_blocksize": NESTED_BLOCKSIZE if double_quant else None,
            "n_quantized_modules": sum(1 for m in model.modules()
                                       if type(m).__name__ == "Linear4bit"),
            "kept_16bit": kept_16bit_modules(model),
            "storage": model_storage(model)}
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "quant_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def kept_16bit_modules(model: torch.nn.Module) -> list[str]:
    """Modules of a quantized model that hold unquantized parameters, layer indices folded to
    ``*``: e.g. ``model.embed_tokens (Embedding, bfloat16)``,
    ``model.layers.*.input_layernorm (LlamaRMSNorm, bfloat16)``; a tied LM head says so."""
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out: list[str] = []
    for name, mod in model.named_modules():
        pattern = re.sub(r"\.\d+(\.|$)", r".*\1", name)
        kind = type(mod).__name__
        if kind == "Linear4bit":
            if mod.bias is not None:
                entry = f"{pattern}.bias (bias of a Linear4bit, {_dtype_name(mod.bias)})"
                if entry not in out:
                    out.append(entry)
            continue
        params = list(mod.parameters(recurse=False))
        if not params:
            continue
        what = f"{kind}, {_dtype_name(params[0])}"
        if inp is not None and mod is not inp and any(p is inp.weight for p in params):
            what += ", tied to the input embeddings"
        entry = f"{pattern} ({what})"
        if entry not in out:
            out.append(entry)
    return out


def _dtype_name(t: Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------
# Quantization error of one matrix
# ---------------------------------------------------------------------------------------------

def _quantize(weight: Tensor, quant_type: str, double_quant: bool,
              blocksize: int) -> tuple[Tensor, bnbf.QuantState]:
    """bitsandbytes' 4-bit quantization of ``weight`` (float32 copy, CPU), as Linear4bit does."""
    return bnbf.quantize_4bit(weight.detach().to("cpu", torch.float32).contiguous(),
                              blocksize=blocksize, compress_statistics=double_quant,
                              quant_type=quant_type)


def double_quantize(state: bnbf.QuantState) -> bnbf.QuantState:
    """The double-quantized version of a plain (float32-absmax) 4-bit QuantState.

    Double quantization changes only how the absmax constants are stored, never the 4-bit
    codes, so one quantization serves both configurations. Same steps as
    ``bitsandbytes.functional.quantize_4bit(compress_statistics=True)``: subtract the mean
    absmax, quantize the rest in 8 bits in blocks of 256 (QLoRA paper Sec. 3);
    tests/test_quantization.py checks the result equals bitsandbytes' own.
    """
    if state.nested:
        raise ValueError("double_quantize: the state is already double-quantized")
    offset = state.absmax.mean()
    qabsmax, state2 = bnbf.quantize_blockwise(state.absmax - offset, blocksize=NESTED_BLOCKSIZE)
    return bnbf.QuantState(absmax=qabsmax, shape=state.shape, dtype=state.dtype,
                           blocksize=state.blocksize, code=state.code,
                           quant_type=state.quant_type, offset=offset, state2=state2)


def quant_roundtrip(weight: Tensor, quant_type: str, double_quant: bool,
                    blocksize: int = BLOCKSIZE) -> Tensor:
    """dequant(Q(weight)) in float32: what a 4-bit layer computes with instead of ``weight``.

    Each block of ``blocksize`` consecutive values (row-major) is scaled by its absmax and
    rounded to the nearest of the 16 NF4 or FP4 values; with ``double_quant`` the absmax
    constants are themselves stored in 8 bits (blocks of 256), QLoRA paper Sec. 3.
    """
    packed, state = _quantize(weight, quant_type, double_quant, blocksize)
    return bnbf.dequantize_4bit(packed, state).reshape(weight.shape)


def _f64(t: Tensor) -> Tensor:
    return t.detach().to("cpu", torch.float64).flatten()


def _check_shapes(what: str, w: Tensor, w_hat: Tensor) -> None:
    if w.shape != w_hat.shape:
        raise ValueError(f"{what}: shapes differ, {tuple(w.shape)} vs {tuple(w_hat.shape)}")


def _error_and_cosine(w64: Tensor, norm_w: float, w_hat: Tensor) -> tuple[float, float]:
    """(‖w − w_hat‖ / ‖w‖, cos(w, w_hat)) from w as flat float64 and its norm; w_hat is
    converted once (the error table calls this four times per matrix)."""
    h = _f64(w_hat)
    norm_h = torch.linalg.vector_norm(h).item()
    rel = torch.linalg.vector_norm(w64 - h).item() / norm_w if norm_w else math.nan
    cos = torch.dot(w64, h).item() / (norm_w * norm_h) if norm_w and norm_h else math.nan
    return rel, cos


def relative_frobenius_error(w: Tensor, w_hat: Tensor) -> float:
    """‖w − w_hat‖_F / ‖w‖_F (float64 sums); 0 for identical tensors, nan when ``w`` is zero."""
    _check_shapes("relative_frobenius_error", w, w_hat)
    w64 = _f64(w)
    return _error_and_cosine(w64, torch.linalg.vector_norm(w64).item(), w_hat)[0]


def cosine(w: Tensor, w_hat: Tensor) -> float:
    """Cosine of two tensors as flat vectors (float64 sums); nan when either is zero."""
    _check_shapes("cosine", w, w_hat)
    w64 = _f64(w)
    return _error_and_cosine(w64, torch.linalg.vector_norm(w64).item(), w_hat)[1]


def quant_state_bytes(packed: Tensor, state: bnbf.QuantState) -> dict[str, int]:
    """Bytes of each tensor a 4-bit weight is stored as: the packed codes, the absmax per block
    and the 16-entry code book; with double quantization the 8-bit absmax, its float32 absmax
    per 256 blocks, the 256-entry code book of that 8-bit quantization and the offset."""
    def nbytes(t: Tensor) -> int:
        return t.numel() * t.element_size()

    out = {"packed": nbytes(packed), "absmax": nbytes(state.absmax),
           "quant_map": nbytes(state.code)}
    if state.nested:
        out |= {"nested_absmax": nbytes(state.state2.absmax),
                "nested_quant_map": nbytes(state.state2.code),
                "nested_offset": nbytes(torch.as_tensor(state.offset))}
    return out


def measured_bits_per_param(weight: Tensor, quant_type: str, double_quant: bool,
                            blocksize: int = BLOCKSIZE) -> float:
    """Bits per parameter of ``weight`` once quantized, from the tensors of its QuantState.

    Differs from :func:`paper_bits_per_param` by the code books (64 bytes, +1 KiB with double
    quantization, per matrix: negligible at width 4096, not at width 576) and by a partial last
    block when the size is not a multiple of ``blocksize`` (x256 with double quantization).
    """
    packed, state = _quantize(weight, quant_type, double_quant, blocksize)
    return 8 * sum(quant_state_bytes(packed, state).values()) / weight.numel()


def paper_bits_per_param(double_quant: bool, blocksize: int = BLOCKSIZE,
                         nested_blocksize: int = NESTED_BLOCKSIZE) -> float:
    """The QLoRA paper's accounting (Sec. 3, "Double Quantization"): 4-bit codes plus a 32-bit
    absmax per block, 4 + 32/64 = 4.5 bits; with double quantization an 8-bit absmax per block
    and a 32-bit constant per 256 blocks, 4 + 8/64 + 32/(64·256) = 4.127 bits."""
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * nested_blocksize)
    return 4 + 32 / blocksize


# ---------------------------------------------------------------------------------------------
# Whole models
# ---------------------------------------------------------------------------------------------

def _weight_out_in(module: torch.nn.Module) -> Tensor:
    """The weight as out x in: GPT-2's Conv1D stores in x out (transformers transposes it too
    before quantizing)."""
    if type(module).__name__ == "Conv1D":
        return module.weight.t()
    return module.weight


def weight_error_table(model: torch.nn.Module, blocksize: int = BLOCKSIZE) -> pd.DataFrame:
    """Quantization error of every linear weight of a 16-bit ``model`` under each of
    :data:`QUANT_CONFIGS`, computed in float32 from the model's own weights.

    One row per (module, config): ``name, layer, module, quant_type, double_quant, n_params,
    rel_frob_error`` (‖W − deq(Q(W))‖_F / ‖W‖_F), ``cosine`` (of W and deq(Q(W))) and
    ``bits_per_param`` (:func:`measured_bits_per_param`'s storage of that matrix).
    """
    rows = []
    names = linear_module_names(model)
    for name in tqdm(names, desc="quantization error", unit="matrix"):
        module = model.get_submodule(name)
        if type(module).__name__ == "Linear4bit":
            raise ValueError(f"weight_error_table: {name} is already 4-bit; pass the 16-bit "
                             "base model (qlora_diag.models.loading.load_base)")
        w = _weight_out_in(module).detach().to("cpu", torch.float32).contiguous()
        w64 = _f64(w)
        norm_w = torch.linalg.vector_norm(w64).item()
        layer, short = parse_module_name(name)
        plain = {t: _quantize(w, t, False, blocksize)
                 for t in dict.fromkeys(t for t, _ in QUANT_CONFIGS)}
        for quant_type, double_quant in QUANT_CONFIGS:
            packed, state = plain[quant_type]
            if double_quant:
                state = double_quantize(state)
            rel, cos = _error_and_cosine(w64, norm_w, bnbf.dequantize_4bit(packed, state))
            rows.append({
                "name": name, "layer": layer, "module": short, "quant_type": quant_type,
                "double_quant": double_quant, "n_params": w.numel(),
                "rel_frob_error": rel, "cosine": cos,
                "bits_per_param": 8 * sum(quant_state_bytes(packed, state).values()) / w.numel(),
            })
    return pd.DataFrame(rows, columns=["name", "layer", "module", "quant_type", "double_quant",
                                       "n_params", "rel_frob_error", "cosine",
                                       "bits_per_param"])


def _storage_key(t: Tensor) -> tuple[int, int, int]:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())


def model_storage(model: torch.nn.Module) -> dict:
    """Bytes of the stored model (its state dict) by category, for a 16-bit or 4-bit model.

    Categories: ``packed_4bit`` (Linear4bit codes), ``quant_constants`` (absmax, code books,
    nested constants and bitsandbytes' serialized metadata), ``embeddings`` (input embeddings
    and LM head), ``norms``, ``linear_16bit`` (unquantized linear weights and biases, i.e. all
    of a 16-bit model's), ``other``. A tensor shared by two names (SmolLM2 ties the LM head to
    the embeddings) is counted once, as safetensors stores it once; ``shared`` lists them.
    Parameters are counted logically (a 4-bit weight counts out x in, not its packed bytes).
    """
    modules = dict(model.named_modules())
    quantized = {n for n, m in modules.items() if type(m).__name__ == "Linear4bit"}
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    sizes = dict.fromkeys(("packed_4bit", "quant_constants", "embeddings", "norms",
                           "linear_16bit", "other"), 0)
    seen: dict[tuple[int, int, int], str] = {}
    shared, n_params, n_quantized = [], 0, 0
    for key, t in model.state_dict().items():
        if t.numel() == 0:
            continue
        sk = _storage_key(t)
        if sk in seen:
            shared.append(f"{key} = {seen[sk]}")
            continue
        seen[sk] = key
        owner, _, leaf = key.rpartition(".")
        nbytes = t.numel() * t.element_size()
        # x.weight.absmax, x.weight.nested_quant_map, x.weight.quant_state.bitsandbytes__nf4, ...
        if ".weight." in key and key.partition(".weight.")[0] in quantized:
            sizes["quant_constants"] += nbytes
            continue
        module = modules.get(owner)
        if owner in quantized and leaf == "weight":
            sizes["packed_4bit"] += nbytes
            count = math.prod(module.weight.quant_state.shape)
            n_quantized += count
            n_params += count
            continue
        n_params += t.numel()
        kind = type(module).__name__
        if isinstance(module, torch.nn.Embedding) or (out_emb is not None and module is out_emb):
            sizes["embeddings"] += nbytes
        elif "Norm" in kind:
            sizes["norms"] += nbytes
        elif kind in ("Linear", "Linear4bit", "Conv1D"):
            sizes["linear_16bit"] += nbytes
        else:
            sizes["other"] += nbytes
    total = sum(sizes.values())
    q_bytes = sizes["packed_4bit"] + sizes["quant_constants"]
    return {"bytes": sizes, "total_bytes": total, "n_params": n_params,
            "bytes_per_param": total / n_params,
            "n_params_quantized": n_quantized,
            "quantized_bytes_per_param": q_bytes / n_quantized if n_quantized else math.nan,
            "quoted_bytes_per_param_qlora": QUOTED_BYTES_PER_PARAM_QLORA,
            "quoted_bytes_per_param_16bit": QUOTED_BYTES_PER_PARAM_16BIT,
            "shared": shared}


def dequantized_weight(module: torch.nn.Module) -> Tensor:
    """The weight a ``bnb.nn.Linear4bit`` computes with, as float32 (out x in).

    Dequantized to the QuantState's dtype first (the model's load dtype, as in the forward
    pass), so this is exactly the matrix the QLoRA adapter was trained against.
    """
    state = module.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        # bitsandbytes repacks the weight (and rounds absmax to bfloat16) in place on the first
        # no-grad eval forward on AVX512-BF16 CPUs; its inverse is only "best effort".
        raise ValueError("dequantized_weight: the 4-bit weight was repacked for CPU inference "
                         "by a no-grad eval forward pass; take residuals from a freshly loaded "
                         "model")
    return bnbf.dequantize_4bit(module.weight.data, state).to(torch.float32)


def quantization_residuals(base_model: torch.nn.Module,
                           quant_model: torch.nn.Module) -> dict[str, Tensor]:
    """``{full module name: W − deq(Q(W))}`` (float32, out x in) for every Linear4bit of
    ``quant_model``, W taken from the same-named module of the 16-bit ``base_model``."""
    out = {}
    base_modules = dict(base_model.named_modules())
    for name, module in quant_model.named_modules():
        if type(module).__name__ != "Linear4bit":
            continue
        if name not in base_modules:
            raise ValueError(f"quantization_residuals: {name} is quantized but the base model "
                             "has no module of that name; were both loaded from the same base?")
        w = _weight_out_in(base_modules[name]).detach().to("cpu", torch.float32)
        w_hat = dequantized_weight(module)
        if w.shape != w_hat.shape:
            raise ValueError(f"quantization_residuals: {name} is {tuple(w.shape)} in the base "
                             f"model but {tuple(w_hat.shape)} in the quantized model")
        out[name] = w - w_hat
    return out


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def config_label(quant_type: str, double_quant: bool) -> str:
    """``nf4``, ``nf4_dq``, ``fp4``, ``fp4_dq``: the metric-key name of one configuration."""
    return f"{quant_type}_dq" if double_quant else quant_type


def _with_config(table: pd.DataFrame) -> pd.DataFrame:
    return table.assign(config=[config_label(t, bool(d)) for t, d in
                                zip(table["quant_type"], table["double_quant"])])


def summary_table(table: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration of a :func:`weight_error_table`: mean relative error and cosine
    over matrices, and bits per parameter over all matrices together (measured and paper)."""
    rows = []
    for label, g in _with_config(table).groupby("config", sort=False):
        stored_bits = (g["bits_per_param"] * g["n_params"]).sum()
        rows.append({"config": label,
                     "rel_frob_error_mean": g["rel_frob_error"].mean(),
                     "cosine_mean": g["cosine"].mean(),
                     "bits_per_param_measured": stored_bits / g["n_params"].sum(),
                     "bits_per_param_paper": paper_bits_per_param(bool(g["double_quant"].iloc[0]))})
    return pd.DataFrame(rows).set_index("config")


def summarize(table: pd.DataFrame, storage_16bit: dict, storage_4bit: dict, quant_type: str,
              double_quant: bool) -> dict:
    """The ``reports/quantization.json`` metrics: the chosen configuration's headline numbers,
    storage of the 16-bit and the saved 4-bit model (MB = 2**20 bytes), and per configuration
    the mean error and cosine overall and per module type."""
    per_config = summary_table(table)
    chosen = per_config.loc[config_label(quant_type, double_quant)]
    configs = {}
    for label, g in _with_config(table).groupby("config", sort=False):
        by_module = g.groupby("module", sort=False)[["rel_frob_error", "cosine"]].mean()
        configs[label] = {**{k: float(v) for k, v in per_config.loc[label].items()},
                          "modules": {m: {"rel_frob_error_mean": float(r["rel_frob_error"]),
                                          "cosine_mean": float(r["cosine"])}
                                      for m, r in by_module.iterrows()}}
    return {
        "quant_type": quant_type, "double_quant": double_quant, "blocksize": BLOCKSIZE,
        "rel_frob_error_mean": float(chosen["rel_frob_error_mean"]),
        "cosine_mean": float(chosen["cosine_mean"]),
        "bits_per_param_measured": float(chosen["bits_per_param_measured"]),
        "bits_per_param_paper": float(chosen["bits_per_param_paper"]),
        "bytes_per_param_model": storage_4bit["bytes_per_param"],
        "bytes_per_param_quantized_linear": storage_4bit["quantized_bytes_per_param"],
        "bytes_per_param_quoted_qlora": QUOTED_BYTES_PER_PARAM_QLORA,
        "bytes_per_param_16bit_model": storage_16bit["bytes_per_param"],
        "weights_mb_16bit": storage_16bit["total_bytes"] / 2**20,
        "weights_mb_4bit": storage_4bit["total_bytes"] / 2**20,
        "mb_4bit_by_category": {k: v / 2**20 for k, v in storage_4bit["bytes"].items()},
        "n_params": storage_16bit["n_params"],
        "n_params_quantized": storage_4bit["n_params_quantized"],
        "shared_tensors": "; ".join(storage_4bit["shared"]),
        "configs": configs,
    }


def dir_size_mb(path: str | Path) -> float:
    """Size on disk of the files under ``path`` in MB (2**20 bytes)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20
