"""Quantization of one weight matrix: the round trip dequant(Q(W)), its error, and the bits it
is stored in (QLoRA paper Sec. 3)."""
from __future__ import annotations

import math

import bitsandbytes.functional as bnbf
import torch
from torch import Tensor

# bitsandbytes' default block size, which transformers' BitsAndBytesConfig does not expose (no
# bnb_4bit_blocksize knob), so the saved model always uses it. QLoRA paper Sec. 3 ("Double
# Quantization"): blocksize 64 for W, 256 for the second-level quantization of the constants.
BLOCKSIZE = 64
# Fixed inside bitsandbytes.functional.quantize_4bit (quantize_blockwise(..., blocksize=256)).
NESTED_BLOCKSIZE = 256
# The four configurations of the error table: QLoRA paper Table 2 compares NF4 with FP4, and
# Sec. 3 double quantization with plain 32-bit constants.
QUANT_CONFIGS = (("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True))


def quantize_weight(weight: Tensor, quant_type: str, double_quant: bool,
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
    packed, state = quantize_weight(weight, quant_type, double_quant, blocksize)
    return bnbf.dequantize_4bit(packed, state).reshape(weight.shape)


def flat_f64(t: Tensor) -> Tensor:
    """``t`` as a flat float64 CPU vector: the error sums are taken in float64."""
    return t.detach().to("cpu", torch.float64).flatten()


def _check_shapes(what: str, w: Tensor, w_hat: Tensor) -> None:
    if w.shape != w_hat.shape:
        raise ValueError(f"{what}: shapes differ, {tuple(w.shape)} vs {tuple(w_hat.shape)}")


def error_and_cosine(w64: Tensor, norm_w: float, w_hat: Tensor) -> tuple[float, float]:
    """(‖w − w_hat‖ / ‖w‖, cos(w, w_hat)) from w as flat float64 and its norm; w_hat is
    converted once (the error table calls this four times per matrix)."""
    h = flat_f64(w_hat)
    norm_h = torch.linalg.vector_norm(h).item()
    rel = torch.linalg.vector_norm(w64 - h).item() / norm_w if norm_w else math.nan
    cos = torch.dot(w64, h).item() / (norm_w * norm_h) if norm_w and norm_h else math.nan
    return rel, cos


def relative_frobenius_error(w: Tensor, w_hat: Tensor) -> float:
    """‖w − w_hat‖_F / ‖w‖_F (float64 sums); 0 for identical tensors, nan when ``w`` is zero."""
    _check_shapes("relative_frobenius_error", w, w_hat)
    w64 = flat_f64(w)
    return error_and_cosine(w64, torch.linalg.vector_norm(w64).item(), w_hat)[0]


def cosine(w: Tensor, w_hat: Tensor) -> float:
    """Cosine of two tensors as flat vectors (float64 sums); nan when either is zero."""
    _check_shapes("cosine", w, w_hat)
    w64 = flat_f64(w)
    return error_and_cosine(w64, torch.linalg.vector_norm(w64).item(), w_hat)[1]


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
    packed, state = quantize_weight(weight, quant_type, double_quant, blocksize)
    return 8 * sum(quant_state_bytes(packed, state).values()) / weight.numel()


def paper_bits_per_param(double_quant: bool, blocksize: int = BLOCKSIZE,
                         nested_blocksize: int = NESTED_BLOCKSIZE) -> float:
    """The QLoRA paper's accounting (Sec. 3, "Double Quantization"): 4-bit codes plus a 32-bit
    absmax per block, 4 + 32/64 = 4.5 bits; with double quantization an 8-bit absmax per block
    and a 32-bit constant per 256 blocks, 4 + 8/64 + 32/(64·256) = 4.127 bits."""
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * nested_blocksize)
    return 4 + 32 / blocksize
