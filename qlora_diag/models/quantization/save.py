"""Writing the 4-bit model: the QLoRA base of the ``quantize`` stage (``models/quantized``)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import Tensor

from qlora_diag.core.atomic import atomic_dir
from qlora_diag.core.machine import resolve_dtype, torch_dtype
from qlora_diag.models.loading import check_model_dir
from qlora_diag.models.quantization.per_module import model_storage
from qlora_diag.models.quantization.roundtrip import BLOCKSIZE, NESTED_BLOCKSIZE

# Facts of the saved model, written next to it by quantize_and_save.
QUANT_INFO = "quant_info.json"


def quantize_and_save(base_dir: str | Path, out_dir: str | Path, quant_type: str,
                      double_quant: bool, compute_dtype: str) -> dict:
    """Load the 16-bit base at ``base_dir`` quantized to 4 bits on CPU and save it at ``out_dir``.

    Every nn.Linear except the LM head becomes a ``bnb.nn.Linear4bit`` (block size
    :data:`BLOCKSIZE`); embeddings, LM head and norms stay in ``compute_dtype`` (transformers
    keeps the output embedding and tied weights out of quantization). The directory loads back
    with :func:`qlora_diag.models.loading.load_quantized` (plain ``from_pretrained``: the
    quantization config travels in ``config.json``). Returns facts for the report, also written
    to ``out_dir``/:data:`QUANT_INFO`.
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
        (tmp / QUANT_INFO).write_text(json.dumps(info, indent=2) + "\n")
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
