"""Typed parameters: ``params.yaml`` -> dataclasses that reject unknown, missing or bad keys.

Every knob lives in ``params.yaml``; nothing is defaulted here. :func:`load_params` collects
*all* problems of the file at once (one line each, naming key, value and what is valid) and
raises :class:`~qlora_diag.errors.ParamsError`, so a typo fails in a second, not after an hour.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from pathlib import Path
from typing import Any

import yaml

from qlora_diag.errors import ParamsError, UserError

PRESETS = ("qv", "kv", "attn", "attn_mlp", "all_linear")
QUANT_TYPES = ("nf4", "fp4")
DTYPES = ("auto", "bfloat16", "float16", "float32")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
OPTIMIZERS = ("auto", "adamw_torch", "paged_adamw_32bit")
EMBEDDED_DATA = ("embedded:probe",)


@dataclasses.dataclass(frozen=True)
class BaseCfg:
    model: str
    dtype: str

    def check(self) -> list[str]:
        p = []
        if not self.model.strip():
            p.append("base.model is empty: give embedded:smollm2-135m-instruct, a Hugging Face "
                     "model id or a local model directory")
        if self.dtype not in DTYPES:
            p.append(f"base.dtype = {self.dtype!r}: must be one of {', '.join(DTYPES)}")
        return p


@dataclasses.dataclass(frozen=True)
class DataCfg:
    source: str
    n_train: int
    n_eval: int
    max_length: int

    def check(self) -> list[str]:
        p = []
        if not self.source.strip():
            p.append("data.source is empty: give embedded:probe, a Hugging Face data set id or "
                     "a local .json/.jsonl file")
        elif self.source.startswith("embedded:") and self.source not in EMBEDDED_DATA:
            p.append(f"data.source = {self.source!r}: unknown embedded data set; valid: "
                     f"{', '.join(EMBEDDED_DATA)}")
        for key in ("n_train", "n_eval"):
            if getattr(self, key) < 1:
                p.append(f"data.{key} = {getattr(self, key)}: must be a positive integer")
        if self.max_length < 16:
            p.append(f"data.max_length = {self.max_length}: must be at least 16 tokens")
        return p


@dataclasses.dataclass(frozen=True)
class QuantCfg:
    type: str
    double_quant: bool
    compute_dtype: str

    def check(self) -> list[str]:
        p = []
        if self.type not in QUANT_TYPES:
            p.append(f"quant.type = {self.type!r}: must be one of {', '.join(QUANT_TYPES)}")
        if self.compute_dtype not in DTYPES:
            p.append(f"quant.compute_dtype = {self.compute_dtype!r}: must be one of "
                     f"{', '.join(DTYPES)}")
        return p


@dataclasses.dataclass(frozen=True)
class LoraCfg:
    r: int
    alpha: float
    dropout: float
    targets: str

    def check(self) -> list[str]:
        p = []
        if self.r < 1:
            p.append(f"lora.r = {self.r}: the rank must be a positive integer")
        if self.alpha <= 0:
            p.append(f"lora.alpha = {self.alpha}: must be > 0 (the update is scaled by alpha/r)")
        if not 0 <= self.dropout < 1:
            p.append(f"lora.dropout = {self.dropout}: must be in [0, 1)")
        p += check_targets("lora.targets", self.targets)
        return p


@dataclasses.dataclass(frozen=True)
class TrainCfg:
    max_steps: int
    batch_size: int
    lr: float
    lr_scheduler: str
    warmup_steps: int
    weight_decay: float
    max_grad_norm: float
    optimizer: str
    group_by_length: bool
    kbit_prep: bool
    eval_every: int
    save_every: int
    threads: int

    def check(self) -> list[str]:
        p = []
        for key in ("max_steps", "batch_size", "eval_every", "save_every"):
            if getattr(self, key) < 1:
                p.append(f"train.{key} = {getattr(self, key)}: must be a positive integer")
        if not 0 < self.lr < 1:
            p.append(f"train.lr = {self.lr}: must be in (0, 1); LoRA typically uses 1e-4..1e-3")
        if self.lr_scheduler not in SCHEDULERS:
            p.append(f"train.lr_scheduler = {self.lr_scheduler!r}: must be one of "
                     f"{', '.join(SCHEDULERS)}")
        if self.warmup_steps < 0 or self.warmup_steps >= max(self.max_steps, 1):
            p.append(f"train.warmup_steps = {self.warmup_steps}: must be >= 0 and smaller than "
                     f"train.max_steps ({self.max_steps})")
        if self.weight_decay < 0:
            p.append(f"train.weight_decay = {self.weight_decay}: must be >= 0")
        if self.max_grad_norm <= 0:
            p.append(f"train.max_grad_norm = {self.max_grad_norm}: must be > 0")
        if self.optimizer not in OPTIMIZERS:
            p.append(f"train.optimizer = {self.optimizer!r}: must be one of {', '.join(OPTIMIZERS)}")
        if self.threads < 0:
            p.append(f"train.threads = {self.threads}: must be >= 0 (0 = all cores)")
        return p


@dataclasses.dataclass(frozen=True)
class SweepCfg:
    ranks: list[int]
    seeds: list[int]
    targets: list[str]

    def check(self) -> list[str]:
        p = []
        if not self.ranks:
            p.append("sweep.ranks is empty: list at least one rank, e.g. [2, 4, 8, 16]")
        if len(set(self.ranks)) != len(self.ranks):
            p.append(f"sweep.ranks = {self.ranks}: has duplicates; list each rank once")
        for r in self.ranks:
            if r < 1:
                p.append(f"sweep.ranks contains {r}: ranks must be positive integers")
        if not self.seeds:
            p.append("sweep.seeds is empty: the noise floor needs at least one extra seed, e.g. [1]")
        if len(set(self.seeds)) != len(self.seeds):
            p.append(f"sweep.seeds = {self.seeds}: has duplicates; list each seed once")
        if len(set(self.targets)) != len(self.targets):
            p.append(f"sweep.targets = {self.targets}: has duplicates; list each preset once")
        for t in self.targets:
            if t not in PRESETS:
                p.append(f"sweep.targets contains {t!r}: {_unknown_preset_hint(t)}")
        return p


@dataclasses.dataclass(frozen=True)
class CompareCfg:
    cos_threshold: float
    n_generate: int
    max_new_tokens: int
    gen_batch_size: int
    subspace_k: int

    def check(self) -> list[str]:
        p = []
        if not 0 < self.cos_threshold <= 1:
            p.append(f"compare.cos_threshold = {self.cos_threshold}: must be in (0, 1]")
        for key in ("n_generate", "max_new_tokens", "gen_batch_size", "subspace_k"):
            if getattr(self, key) < 1:
                p.append(f"compare.{key} = {getattr(self, key)}: must be a positive integer")
        return p


@dataclasses.dataclass(frozen=True)
class BenchCfg:
    steps: int
    warmup_steps: int
    batch_size: int
    rank: int
    gen_examples: int

    def check(self) -> list[str]:
        p = []
        for key in ("steps", "batch_size", "rank", "gen_examples"):
            if getattr(self, key) < 1:
                p.append(f"bench.{key} = {getattr(self, key)}: must be a positive integer")
        if self.warmup_steps < 0:
            p.append(f"bench.warmup_steps = {self.warmup_steps}: must be >= 0")
        return p


@dataclasses.dataclass(frozen=True)
class Params:
    seed: int
    base: BaseCfg
    data: DataCfg
    quant: QuantCfg
    lora: LoraCfg
    train: TrainCfg
    sweep: SweepCfg
    compare: CompareCfg
    bench: BenchCfg


def check_targets(key: str, targets: str) -> list[str]:
    """Check the *form* of a targets value: a preset, or comma-separated module names (names
    are checked against the model by :func:`qlora_diag.targets.resolve_targets`)."""
    if targets in PRESETS:
        return []
    if not re.fullmatch(r"[A-Za-z0-9_.]+(,[A-Za-z0-9_.]+)*", targets):
        return [f"{key} = {targets!r}: must be a preset ({', '.join(PRESETS)}) or comma-separated "
                "module names without spaces, e.g. q_proj,v_proj"]
    names = targets.split(",")
    if len(names) == 1 and not (targets.endswith(("_proj", "_attn", "_fc")) or "." in targets):
        return [f"{key} = {targets!r}: {_unknown_preset_hint(targets)}"]
    if len(set(names)) != len(names):
        return [f"{key} = {targets!r}: has duplicate module names"]
    return []


def _unknown_preset_hint(value: str) -> str:
    close = difflib.get_close_matches(value, PRESETS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown target preset{hint}; valid presets: {', '.join(PRESETS)}, or a list of module names"


# ---------------------------------------------------------------------------------------------
# Generic typed loading
# ---------------------------------------------------------------------------------------------

def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    raise TypeError(f"unsupported config type {tp}")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is not None:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}[tp]


def _load_section(cls: type, raw: Any, prefix: str, problems: list[str]):
    """Build ``cls`` from mapping ``raw``; append problems instead of raising."""
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.compare]
    names = [f.name for f in fields]
    if not isinstance(raw, dict):
        problems.append(f"{prefix} must be a mapping with keys {', '.join(names)}; got {raw!r}")
        return None
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix}.{close[0]}?)" if close else ""
            problems.append(f"{prefix}.{key}: unknown key{hint}; valid keys: {', '.join(names)}")
    values = {}
    ok = True
    for f in fields:
        if f.name not in raw:
            problems.append(f"{prefix}.{f.name}: missing; add it to params.yaml "
                            f"({_type_name(hints[f.name])})")
            ok = False
            continue
        v = raw[f.name]
        if not _type_ok(v, hints[f.name]):
            problems.append(f"{prefix}.{f.name} = {v!r}: must be {_type_name(hints[f.name])}")
            ok = False
            continue
        if hints[f.name] is float and isinstance(v, int):
            v = float(v)
        values[f.name] = v
    if not ok:
        return None
    obj = cls(**values)
    problems.extend(obj.check())
    return obj


def params_from_dict(raw: Any, source: str = "params.yaml") -> Params:
    """Validate a parsed params mapping; raise :class:`ParamsError` listing every problem."""
    problems: list[str] = []
    hints = typing.get_type_hints(Params)
    names = [f.name for f in dataclasses.fields(Params)]
    if not isinstance(raw, dict):
        raise ParamsError([f"the file must be a mapping with keys {', '.join(names)}"], source)
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(f"{key}: unknown top-level key{hint}; valid keys: {', '.join(names)}")
    values: dict[str, Any] = {}
    for name in names:
        tp = hints[name]
        if name not in raw:
            problems.append(f"{name}: missing section; add it to params.yaml")
            continue
        if dataclasses.is_dataclass(tp):
            values[name] = _load_section(tp, raw[name], name, problems)
        elif _type_ok(raw[name], tp):
            values[name] = raw[name]
        else:
            problems.append(f"{name} = {raw[name]!r}: must be {_type_name(tp)}")
    if not problems:
        params = Params(**values)
        problems += _check_relations(params)
        if not problems:
            return params
    raise ParamsError(problems, source)


def _check_relations(p: Params) -> list[str]:
    """Checks that span sections."""
    out = []
    if p.lora.r not in p.sweep.ranks:
        out.append(f"lora.r = {p.lora.r} is not in sweep.ranks {p.sweep.ranks}: the headline "
                   "comparison uses the rank-sweep runs at lora.r, so add it to sweep.ranks")
    if p.seed in p.sweep.seeds:
        out.append(f"sweep.seeds {p.sweep.seeds} contains the main seed {p.seed}: list only the "
                   "extra seeds of the noise-floor runs")
    if p.lora.targets in p.sweep.targets:
        out.append(f"sweep.targets {p.sweep.targets} contains lora.targets "
                   f"({p.lora.targets!r}): that run is already trained by the rank sweep at "
                   "lora.r; list only the other presets")
    if p.compare.n_generate > p.data.n_eval:
        out.append(f"compare.n_generate = {p.compare.n_generate} is larger than data.n_eval = "
                   f"{p.data.n_eval}: generation uses the first n_generate eval examples")
    if p.compare.subspace_k > min(p.sweep.ranks):
        out.append(f"compare.subspace_k = {p.compare.subspace_k} is larger than the smallest "
                   f"rank in sweep.ranks ({min(p.sweep.ranks)}): the subspace similarity "
                   "compares the top-k singular directions, k <= r")
    if p.bench.warmup_steps >= p.bench.steps:
        out.append(f"bench.warmup_steps = {p.bench.warmup_steps} must be smaller than "
                   f"bench.steps = {p.bench.steps}")
    return out


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml``."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found; run from the repository root where "
                        "params.yaml lives") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    return params_from_dict(raw, str(path))


def run_name(method: str, rank: int, targets: str, seed: int) -> str:
    """Stable name of one training run, e.g. ``qlora-r8-qv-s42`` (must match dvc.yaml's outs)."""
    return f"{method}-r{rank}-{targets}-s{seed}"
