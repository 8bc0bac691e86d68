"""LoRA target presets -> each architecture's module names, checked against the model.

PEFT accepts a partly wrong ``target_modules`` list (it errors only when *none* match), so every
name is checked here: a misspelt module is an error, not a silently smaller adapter.
"""
from __future__ import annotations

from pathlib import Path

import torch

from qlora_diag.core.config import PRESETS, Params
from qlora_diag.core.errors import ParamsError, UserError

_LLAMA = {
    "qv": ["q_proj", "v_proj"],
    "kv": ["k_proj", "v_proj"],
    "attn": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "attn_mlp": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "all_linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
# GPT-2 fuses Q, K and V in one Conv1D (c_attn): presets that split them cannot be expressed.
_GPT2 = {
    "attn": ["attn.c_attn", "attn.c_proj"],
    "attn_mlp": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
    "all_linear": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
}
# Phi-3 (and Phi-3.5, Phi-4 mini: model_type phi3) fuses Q, K and V in qkv_proj and the gate
# and up projections in gate_up_proj (transformers' modeling_phi3), so it has no q_proj to pair
# with v_proj either.
_PHI3 = {
    "attn": ["qkv_proj", "o_proj"],
    "attn_mlp": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "all_linear": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
}
PRESET_MODULES = {model_type: _LLAMA for model_type in
                  ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo")}
PRESET_MODULES["gpt2"] = _GPT2
PRESET_MODULES["phi3"] = _PHI3
# Why an architecture lacks a preset, for the error message.
FUSED = {"gpt2": "GPT-2 fuses Q, K and V in c_attn",
         "phi3": "Phi-3 fuses Q, K and V in qkv_proj, and gate and up in gate_up_proj"}


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Full names of the adaptable linear layers (nn.Linear, bnb Linear4bit, GPT-2 Conv1D),
    excluding the LM head."""
    out = []
    for name, mod in model.named_modules():
        kind = type(mod).__name__
        if kind in ("Linear", "Linear4bit", "Conv1D") and not name.endswith("lm_head"):
            out.append(name)
    return out


def resolve_targets(model: torch.nn.Module, targets: str, key: str = "lora.targets") -> list[str]:
    """Module-name suffixes for PEFT's ``target_modules``; every one must match a linear layer."""
    model_type = model.config.model_type
    linear = linear_module_names(model)
    suffixes = ", ".join(sorted({m.split(".")[-1] for m in linear}))
    if targets in PRESETS:
        table = PRESET_MODULES.get(model_type)
        if table is None:
            raise UserError(f"{key} = {targets!r}: presets are not defined for architecture "
                            f"{model_type!r} (known: {', '.join(sorted(PRESET_MODULES))}); give "
                            f"comma-separated module names instead; its linear layers end in: "
                            f"{suffixes}")
        if targets not in table:
            raise UserError(f"{key} = {targets!r}: architecture {model_type!r} cannot express "
                            f"this preset ({FUSED[model_type]}); presets it supports: "
                            f"{', '.join(table)}")
        names = table[targets]
    else:
        names = targets.split(",")
    missing = [n for n in names if not any(m == n or m.endswith("." + n) for m in linear)]
    if missing:
        raise UserError(f"{key} = {targets!r}: module name(s) {', '.join(missing)} match no "
                        f"linear layer of this {model_type} model; its linear layers end in: "
                        f"{suffixes}")
    return names


def architecture_problems(model: torch.nn.Module, *, lora_targets: str, lora_r: int,
                          ranks: list[int], sweep_targets: list[str]) -> list[str]:
    """Every targets value and rank the pipeline will train, checked against ``model`` at once
    (one line each), so a preset GPT-2 cannot express or a rank above a layer's width fails
    before the first run rather than hours into the sweep.

    The rank sweep trains ``ranks`` on ``lora_targets``; the module sweep trains ``lora_r`` on
    each of ``sweep_targets``.
    """
    problems = []
    top = max(ranks, default=lora_r)
    runs = [("lora.targets", lora_targets, f"sweep.ranks contains {top}", top)]
    runs += [("sweep.targets", t, f"lora.r = {lora_r}", lora_r) for t in sweep_targets]
    for key, targets, rank_label, rank in runs:
        try:
            names = resolve_targets(model, targets, key=key)
        except UserError as exc:
            problems.append(str(exc))
            continue
        limit = min_adapted_dim(model, names)
        if rank > limit:
            problems.append(f"{rank_label}: larger than the smallest dimension ({limit}) "
                            f"of the layers adapted by {targets!r}; a LoRA rank above it adds "
                            f"nothing, use at most {limit}")
    return problems


def min_adapted_dim(model: torch.nn.Module, names: list[str]) -> int:
    """Smallest in/out dimension over the adapted layers: the largest meaningful LoRA rank."""
    dims = []
    for full, mod in model.named_modules():
        if any(full == n or full.endswith("." + n) for n in names) and hasattr(mod, "weight"):
            if type(mod).__name__ == "Linear4bit":
                dims += [mod.in_features, mod.out_features]
            else:
                dims += list(mod.weight.shape)
    return min(dims)


def parse_module_name(full_name: str) -> tuple[int, str]:
    """``model.layers.3.self_attn.q_proj`` -> ``(3, "q_proj")``; GPT-2's
    ``transformer.h.3.attn.c_proj`` -> ``(3, "attn.c_proj")`` (c_proj alone is ambiguous there).

    The layer is the first integer component; -1 when there is none.
    """
    parts = full_name.split(".")
    layer = next((int(p) for p in parts if p.isdigit()), -1)
    module = parts[-1]
    if module in ("c_proj", "c_attn", "c_fc") and len(parts) >= 2:
        module = f"{parts[-2]}.{module}"
    return layer, module


def check_architecture(model_dir: str | Path, *, lora_targets: str, lora_r: int, ranks: list[int],
                       sweep_targets: list[str]) -> None:
    """Raise :class:`ParamsError` with every problem :func:`architecture_problems` finds for the
    model in ``model_dir``. The model is built from its config on the meta device: no weights are
    read, so this takes well under a second even for large models."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    problems = architecture_problems(model, lora_targets=lora_targets, lora_r=lora_r, ranks=ranks,
                                     sweep_targets=sweep_targets)
    if problems:
        raise ParamsError(problems, f"params.yaml (against the model in {model_dir})")


def check_against_model(params: Params, model_dir: Path) -> None:
    """Targets and ranks of every run of the sweep against the model's architecture (reads the
    config only), so a preset the model cannot express fails before hours of training."""
    check_architecture(model_dir, lora_targets=params.lora.targets, lora_r=params.lora.r,
                       ranks=params.sweep.ranks, sweep_targets=params.sweep.targets)
