"""Weight-level comparison of two LoRA adapters on disk: per-module tables of how alike their
updates ΔW are, and how the QLoRA update relates to the quantization error it trained against.

Two adapters at a time; which pairs to compare (LoRA vs QLoRA, seed vs seed for the noise floor)
is the caller's choice. The math lives in :mod:`qlora_diag.compare.similarity`.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from qlora_diag.compare import similarity as sim
from qlora_diag.core.errors import UserError
from qlora_diag.models.targets import parse_module_name

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# PEFT saves adapter weights under the wrapped model's names without the adapter name:
# base_model.model.<module>.lora_A.weight (r×in) and .lora_B.weight (out×r).
_KEY = re.compile(r"^base_model\.model\.(?P<name>.+)\.lora_(?P<which>[AB])\.weight$")

# Config options under which ΔW is not scale·B·A with one (r, alpha) for every module; the
# comparison would be silently wrong, so they are refused.
_UNSUPPORTED = {
    "use_dora": "DoRA rescales the merged weight's columns (ΔW is not scale·B·A)",
    "use_qalora": "QA-LoRA pools the input groups (A does not act on the full input)",
    "lora_bias": "a LoRA bias is an extra update outside B·A",
    "rank_pattern": "per-module ranks",
    "alpha_pattern": "per-module alphas",
}

COMPARE_COLUMNS = ["name", "layer", "module", "cos_sim", "rel_frob", "frob_dist", "subspace_sim",
                   "subspace_sim_left", "subspace_sim_right", "norm_a", "norm_b"]
ALIGNMENT_COLUMNS = ["name", "layer", "module", "norm_delta_lora", "norm_delta_qlora",
                     "norm_residual", "alignment", "alignment_qlora", "alignment_ceiling",
                     "alignment_chance"]
SUMMARY_METRICS = ["cos_sim", "rel_frob", "subspace_sim"]


@dataclass(frozen=True, eq=False)  # eq=False: == on tensors is elementwise, not a bool
class Factor:
    """One adapted module: ΔW = scale·B·A, A r×in, B out×r (float64)."""

    A: Tensor
    B: Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of ΔW. For GPT-2's Conv1D (PEFT ``fan_in_fan_out``) the base weight is
        stored in×out, i.e. the transpose of ΔW."""
        return self.B.shape[0], self.A.shape[1]

    def delta(self) -> Tensor:
        return sim.delta_w(self.A, self.B, self.scale)


def _read_config(path: Path) -> tuple[int, float, bool]:
    if not path.is_file():
        raise UserError(f"{path}: adapter config not found (expected a PEFT adapter directory "
                        f"with {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    if cfg.get("peft_type") != "LORA":
        raise UserError(f"{path}: peft_type is {cfg.get('peft_type')!r}; only LORA adapters "
                        "can be compared")
    missing = [k for k in ("r", "lora_alpha", "use_rslora") if k not in cfg]
    if missing:
        raise UserError(f"{path}: missing key(s) {', '.join(missing)} (needed for the LoRA "
                        "scale alpha/r, or alpha/sqrt(r) with rsLoRA)")
    r, alpha, rslora = cfg["r"], cfg["lora_alpha"], cfg["use_rslora"]
    if not (isinstance(r, int) and not isinstance(r, bool) and r >= 1):
        raise UserError(f"{path}: r = {r!r} must be a positive integer")
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool)
            and math.isfinite(alpha)):
        raise UserError(f"{path}: lora_alpha = {alpha!r} must be a finite number")
    if not isinstance(rslora, bool):
        raise UserError(f"{path}: use_rslora = {rslora!r} must be true or false")
    # Options absent from an older PEFT's config did not exist there, so absence means "off".
    used = [f"{k} ({why})" for k, why in _UNSUPPORTED.items() if cfg.get(k)]
    if used:
        raise UserError(f"{path}: unsupported adapter option(s): {'; '.join(used)}")
    return r, alpha, rslora


def load_adapter_factors(adapter_dir: str | Path) -> dict[str, Factor]:
    """Read a PEFT LoRA adapter directory into ``{base module full name: Factor}``.

    Names are the base model's, e.g. ``model.layers.0.self_attn.q_proj``, ordered by layer.
    The scale is PEFT's: lora_alpha / r, or lora_alpha / sqrt(r) with ``use_rslora``.
    Missing files, malformed config, unexpected tensors or shapes -> :class:`UserError`.
    """
    adapter_dir = Path(adapter_dir)
    r, alpha, rslora = _read_config(adapter_dir / CONFIG_FILE)
    scale = alpha / math.sqrt(r) if rslora else alpha / r
    wpath = adapter_dir / WEIGHTS_FILE
    if not wpath.is_file():
        raise UserError(f"{wpath}: adapter weights not found")
    try:
        tensors = load_file(str(wpath))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{wpath}: cannot read safetensors file ({e})") from None

    parts: dict[str, dict[str, Tensor]] = {}
    unexpected = []
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            unexpected.append(key)
            continue
        parts.setdefault(m["name"], {})[m["which"]] = t
    if unexpected:
        raise UserError(f"{wpath}: {len(unexpected)} tensor(s) are not LoRA A/B weights "
                        f"(e.g. {', '.join(unexpected[:3])}); only plain LoRA adapters are "
                        "supported")
    if not parts:
        raise UserError(f"{wpath}: no LoRA weights in the file")

    out = {}
    for name in sorted(parts, key=lambda n: (parse_module_name(n)[0], n)):
        p = parts[name]
        if set(p) != {"A", "B"}:
            lacking = "lora_B" if "A" in p else "lora_A"
            raise UserError(f"{wpath}: module {name} has no {lacking} weight")
        A, B = p["A"], p["B"]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != r or B.shape[1] != r:
            raise UserError(f"{wpath}: module {name} has lora_A {tuple(A.shape)}, lora_B "
                            f"{tuple(B.shape)}; expected r×in and out×r with r = {r}")
        out[name] = Factor(A.to(torch.float64), B.to(torch.float64), scale)
    return out


def _check_same_modules(a: dict, b: dict, what_a: str, what_b: str) -> None:
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        lines = []
        if only_a:
            lines.append(f"only in {what_a}: {', '.join(only_a[:5])}"
                         + (f" (+{len(only_a) - 5} more)" if len(only_a) > 5 else ""))
        if only_b:
            lines.append(f"only in {what_b}: {', '.join(only_b[:5])}"
                         + (f" (+{len(only_b) - 5} more)" if len(only_b) > 5 else ""))
        raise UserError("the adapters adapt different modules, so they cannot be compared "
                        "module by module (were they trained with the same lora.targets?); "
                        + "; ".join(lines))


def _check_shapes(name: str, fa: Factor, fb: Factor) -> None:
    if fa.shape != fb.shape:
        raise UserError(f"module {name}: ΔW shapes differ, {fa.shape} vs {fb.shape} (adapters "
                        "of different base models?)")


def compare_adapters(factors_a: dict[str, Factor], factors_b: dict[str, Factor],
                     k: int) -> pd.DataFrame:
    """One row per adapted module comparing ΔW_a with ΔW_b (b is the reference of rel_frob).

    Columns: ``name, layer, module`` (from :func:`parse_module_name`); ``cos_sim`` =
    cos(ΔW_a, ΔW_b); ``rel_frob`` = ‖ΔW_a − ΔW_b‖_F / ‖ΔW_b‖_F; ``frob_dist`` = ‖ΔW_a − ΔW_b‖_F;
    ``subspace_sim`` = mean of ``subspace_sim_left`` (column spaces, U) and
    ``subspace_sim_right`` (row spaces, V), each φ(k, k) of Hu et al. 2021 Sec. 7.2 over the
    top-k singular vectors (nan when either update has numerical rank < k, where the top-k
    subspace is not defined); ``norm_a``, ``norm_b`` = ‖ΔW‖_F. Never forms ΔW.
    """
    _check_same_modules(factors_a, factors_b, "adapter a", "adapter b")
    if not (isinstance(k, int) and k >= 1):
        raise UserError(f"subspace rank k = {k!r} must be a positive integer")
    max_k = min(min(f.rank, *f.shape) for f in (*factors_a.values(), *factors_b.values()))
    if k > max_k:
        raise UserError(f"subspace rank k = {k} exceeds the smallest adapter rank {max_k}: the "
                        "top-k singular directions of ΔW are undefined beyond its rank")
    rows = []
    for name in factors_a:
        fa, fb = factors_a[name], factors_b[name]
        _check_shapes(name, fa, fb)
        layer, module = parse_module_name(name)
        ua, sa, va = sim.top_singular_vectors(fa.A, fa.B, k)
        ub, sb, vb = sim.top_singular_vectors(fb.A, fb.B, k)
        if min(sim.numerical_rank(sa, fa.shape), sim.numerical_rank(sb, fb.shape)) < k:
            left = right = math.nan
        else:
            left = sim.subspace_similarity(ua, ub, k, k)
            right = sim.subspace_similarity(va, vb, k, k)
        rows.append({
            "name": name, "layer": layer, "module": module,
            "cos_sim": sim.factored_cosine(fa.A, fa.B, fa.scale, fb.A, fb.B, fb.scale),
            "rel_frob": sim.factored_relative_frobenius(fa.A, fa.B, fa.scale,
                                                        fb.A, fb.B, fb.scale),
            "frob_dist": sim.factored_distance(fa.A, fa.B, fa.scale, fb.A, fb.B, fb.scale),
            "subspace_sim": (left + right) / 2,
            "subspace_sim_left": left, "subspace_sim_right": right,
            "norm_a": sim.factored_norm(fa.A, fa.B, fa.scale),
            "norm_b": sim.factored_norm(fb.A, fb.B, fb.scale),
        })
    return pd.DataFrame(rows, columns=COMPARE_COLUMNS)


def quantization_alignment(factors_lora: dict[str, Factor], factors_qlora: dict[str, Factor],
                           residuals: Mapping[str, Tensor]) -> pd.DataFrame:
    """Per module: does the QLoRA update learn to undo the quantization error?

    ``residuals[name]`` = W − deq(Q(W)) of the base module (out×in, from the quantize stage;
    extra modules are ignored), looked up once per module, so a lazy mapping
    (:class:`~qlora_diag.models.quantization.per_module.QuantizationResiduals`) holds one at a
    time. Columns: ``name, layer, module, norm_delta_lora,
    norm_delta_qlora, norm_residual`` (Frobenius norms); ``alignment`` =
    cos(ΔW_QLoRA − ΔW_LoRA, residual) (:func:`similarity.alignment`); ``alignment_qlora`` =
    cos(ΔW_QLoRA, residual); ``alignment_ceiling`` = the largest cosine any matrix of rank
    r_LoRA + r_QLoRA (the rank bound of the correction ΔW_QLoRA − ΔW_LoRA) can have with the
    residual (:func:`similarity.low_rank_ceiling`), the scale to read ``alignment`` on;
    ``alignment_chance`` = 1/sqrt(out·in), the root-mean-square cosine of a direction drawn
    uniformly at random with the residual (E cos² = 1/(out·in)): what "unrelated" looks like.
    ΔW is formed densely, one module at a time (fine up to a few thousand wide; the ceiling's
    top-r singular values only).
    """
    _check_same_modules(factors_lora, factors_qlora, "the LoRA adapter", "the QLoRA adapter")
    lacking = [n for n in factors_lora if n not in residuals]
    if lacking:
        raise UserError(f"no quantization residual for {len(lacking)} adapted module(s) (e.g. "
                        f"{', '.join(lacking[:3])}); the quantize stage must cover every "
                        "module in lora.targets")
    rows = []
    for name, fl in factors_lora.items():
        fq = factors_qlora[name]
        _check_shapes(name, fl, fq)
        res = residuals[name]
        if tuple(res.shape) != fl.shape:
            raise UserError(f"module {name}: quantization residual has shape "
                            f"{tuple(res.shape)}, ΔW has {fl.shape} (out×in); a Conv1D weight "
                            "must be transposed first")
        dl, dq = fl.delta(), fq.delta()
        layer, module = parse_module_name(name)
        rows.append({
            "name": name, "layer": layer, "module": module,
            "norm_delta_lora": torch.linalg.matrix_norm(dl).item(),
            "norm_delta_qlora": torch.linalg.matrix_norm(dq).item(),
            "norm_residual": torch.linalg.matrix_norm(res.to(torch.float64)).item(),  # on its device
            "alignment": sim.alignment(dq - dl, res),
            "alignment_qlora": sim.cosine(dq, res),
            "alignment_ceiling": sim.low_rank_ceiling(res, min(fl.rank + fq.rank, *fl.shape)),
            "alignment_chance": 1.0 / math.sqrt(fl.shape[0] * fl.shape[1]),
        })
    return pd.DataFrame(rows, columns=ALIGNMENT_COLUMNS)


def summarize_adapter_comparison(df: pd.DataFrame) -> dict[str, float]:
    """Headline numbers of a :func:`compare_adapters` table: ``<metric>_{mean,median,min,max}``
    over modules for cos_sim, rel_frob and subspace_sim, plus ``n_modules``.

    NaN propagates (skipna=False): a module with an undefined value (a zero update) makes the
    summary nan instead of silently dropping out of the average.
    """
    missing = [c for c in SUMMARY_METRICS if c not in df.columns]
    if missing or df.empty:
        raise ValueError(f"summarize_adapter_comparison: need a non-empty compare_adapters "
                         f"table; missing columns {missing}, {len(df)} rows")
    out: dict[str, float] = {"n_modules": int(len(df))}
    for c in SUMMARY_METRICS:
        col = df[c].astype("float64")
        out[f"{c}_mean"] = float(col.mean(skipna=False))
        out[f"{c}_median"] = float(col.median(skipna=False))
        out[f"{c}_min"] = float(col.min(skipna=False))
        out[f"{c}_max"] = float(col.max(skipna=False))
    return out
