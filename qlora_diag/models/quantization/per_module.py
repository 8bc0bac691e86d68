"""Quantization of a whole model, module by module: the error table of every linear weight under
each configuration, the model's storage by category, and the residuals W - dequant(Q(W))."""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import bitsandbytes.functional as bnbf
import pandas as pd
import torch
from torch import Tensor
from tqdm import tqdm

from qlora_diag.models.quantization.roundtrip import (
    BLOCKSIZE,
    QUANT_CONFIGS,
    double_quantize,
    error_and_cosine,
    flat_f64,
    quant_state_bytes,
    quantize_weight,
)
from qlora_diag.models.targets import linear_module_names, parse_module_name

# RESEARCH.md's commonly quoted memory model: 16-bit weights take 2 bytes per parameter; QLoRA
# 0.52 = 4.127 bits / 8 (0.5 byte of 4-bit codes + double-quantized constants), rounded.
QUOTED_BYTES_PER_PARAM_16BIT = 2.0
QUOTED_BYTES_PER_PARAM_QLORA = 0.52


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
        w64 = flat_f64(w)
        norm_w = torch.linalg.vector_norm(w64).item()
        layer, short = parse_module_name(name)
        plain = {t: quantize_weight(w, t, False, blocksize)
                 for t in dict.fromkeys(t for t, _ in QUANT_CONFIGS)}
        for quant_type, double_quant in QUANT_CONFIGS:
            packed, state = plain[quant_type]
            if double_quant:
                state = double_quantize(state)
            rel, cos = error_and_cosine(w64, norm_w, bnbf.dequantize_4bit(packed, state))
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


def quantization_residual(name: str, base_module: torch.nn.Module,
                          quant_module: torch.nn.Module) -> Tensor:
    """W − deq(Q(W)) (float32, out x in) of one module, on the 4-bit module's device.

    The 4-bit model may sit on ``cuda:0`` while the 16-bit W is on the CPU (issue 15: the
    subtraction mixed devices); W is copied to where the dequantized weight is, one module at a
    time, so no more than one module's residual is materialized by this function."""
    w_hat = dequantized_weight(quant_module)
    w = _weight_out_in(base_module).detach().to(device=w_hat.device, dtype=torch.float32)
    if w.shape != w_hat.shape:
        raise ValueError(f"quantization_residuals: {name} is {tuple(w.shape)} in the base "
                         f"model but {tuple(w_hat.shape)} in the quantized model")
    return w - w_hat


class QuantizationResiduals(Mapping):
    """``{full module name: W − deq(Q(W))}`` for every Linear4bit of ``quant_model``, W from the
    same-named module of the 16-bit ``base_model``, computed when looked up (not stored):
    a consumer that takes one module at a time holds one residual at a time (issue 15: at 8B
    every module's fp32 residual at once is tens of GB)."""

    def __init__(self, base_model: torch.nn.Module, quant_model: torch.nn.Module):
        self._base = dict(base_model.named_modules())
        self._quant = {n: m for n, m in quant_model.named_modules()
                       if type(m).__name__ == "Linear4bit"}
        for name in self._quant:
            if name not in self._base:
                raise ValueError(f"quantization_residuals: {name} is quantized but the base "
                                 "model has no module of that name; were both loaded from the "
                                 "same base?")

    def __getitem__(self, name: str) -> Tensor:
        return quantization_residual(name, self._base[name], self._quant[name])

    def __contains__(self, name: object) -> bool:  # without computing the residual
        return name in self._quant

    def __iter__(self) -> Iterator[str]:
        return iter(self._quant)

    def __len__(self) -> int:
        return len(self._quant)


def quantization_residuals(base_model: torch.nn.Module,
                           quant_model: torch.nn.Module) -> dict[str, Tensor]:
    """Every residual of :class:`QuantizationResiduals` at once (small models and tests)."""
    return dict(QuantizationResiduals(base_model, quant_model))
