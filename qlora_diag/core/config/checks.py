"""Checks of single values of ``params.yaml``, and the "did you mean" hints of their messages.

A check gets a value of the field's type (the loader has checked the type) and returns what is
wrong and what would be valid, or None; the loader prefixes ``key = value: ``. Checks between
keys are in :mod:`.relations`.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from collections.abc import Callable
from typing import Any

from qlora_diag.core.config.choices import (
    EMBEDDED_DATA,
    EMBEDDED_MODELS,
    MAX_SEED,
    MODULE_SUFFIXES,
    PRESETS,
    SMOLLM2,
)

Check = Callable[[Any], "str | None"]


def checked(*checks: Check, comma_list: bool = False) -> Any:
    """A required field (no default: every key must be in params.yaml) with value checks.

    The loader runs ``checks`` in order and reports the first problem only. ``comma_list``
    marks a string field that holds comma-separated names, so a YAML list given instead gets a
    hint.
    """
    return dataclasses.field(metadata={"checks": checks, "comma_list": comma_list})


# ---------------------------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------------------------

def show(value: Any, limit: int = 60) -> str:
    """``repr`` for messages: short, and safe for any value YAML can produce."""
    try:
        text = repr(value)
    except ValueError:  # ints beyond sys.get_int_max_str_digits() cannot be printed
        text = (f"<integer of {value.bit_length()} bits>" if isinstance(value, int) else
                f"<{type(value).__name__} holding an integer too long to print>")
    except RecursionError:
        text = f"<deeply nested {type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


def did_you_mean(value: str, choices: typing.Sequence[str], key_prefix: str | None = None) -> str:
    """`` (did you mean 'qv'?)`` for a value; `` (did you mean lora.r?)`` for a key of the section
    ``key_prefix``; empty when nothing is close."""
    s = _suggest(value, choices)
    if s is None:
        return ""
    return f" (did you mean {s!r}?)" if key_prefix is None else f" (did you mean {key_prefix}{s}?)"


# ---------------------------------------------------------------------------------------------
# Generic checks
# ---------------------------------------------------------------------------------------------

def positive(v: int) -> str | None:
    return None if v >= 1 else "must be a positive integer"


def positive_or_auto(v: int | str) -> str | None:
    """For keys of type ``int | Literal["auto"]``: the type check has let only those through."""
    return None if v == "auto" or v >= 1 else "must be a positive integer or auto"


def non_negative(v: float) -> str | None:
    return None if v >= 0 else "must be >= 0"


def one_of(*choices: str) -> Check:
    def check(v: str) -> str | None:
        if v in choices:
            return None
        return f"must be one of {', '.join(choices)}{did_you_mean(v, choices)}"
    return check


def seed_range(v: int) -> str | None:
    return None if 0 <= v <= MAX_SEED else f"a seed must be in 0 .. {MAX_SEED} (numpy's range)"


def not_empty(what: str) -> Check:
    return lambda v: None if v else f"is empty; {what}"


def exactly(n: int, why: str) -> Check:
    return lambda v: None if len(v) == n else f"lists {len(v)} value(s), must list exactly {n}: {why}"


def no_duplicates(v: list) -> str | None:
    dup = sorted({x for x in v if v.count(x) > 1}, key=v.index)
    return f"has duplicates ({', '.join(map(show, dup))}); list each once" if dup else None


def each(check: Check) -> Check:
    """``check`` on every item of a list; the first failing item is named."""
    def run(values: list) -> str | None:
        for x in values:
            why = check(x)
            if why:
                return f"contains {show(x)}: {why}"
        return None
    return run


# ---------------------------------------------------------------------------------------------
# Model, data source and targets
# ---------------------------------------------------------------------------------------------

def base_model_problem(v: str) -> str | None:
    if not v.strip():
        return f"is empty; give {SMOLLM2}, a Hugging Face model id or a local model directory"
    if v.startswith("embedded:") and v not in EMBEDDED_MODELS:
        return (f"unknown embedded model{did_you_mean(v, EMBEDDED_MODELS)}; embedded models: "
                f"{', '.join(EMBEDDED_MODELS)}")
    return None


def data_source_problem(v: str) -> str | None:
    if not v.strip():
        return ("is empty; give embedded:probe, a Hugging Face data set id or a local "
                ".json/.jsonl file")
    if v.startswith("embedded:") and v not in EMBEDDED_DATA:
        return (f"unknown embedded data set{did_you_mean(v, EMBEDDED_DATA)}; valid: "
                f"{', '.join(EMBEDDED_DATA)}")
    return None


def preset_problem(v: str) -> str | None:
    return None if v in PRESETS else _unknown_preset_hint(v)


def targets_problem(targets: str) -> str | None:
    """The *form* of a targets value: a preset, or comma-separated module names (the names are
    checked against the model by :func:`qlora_diag.models.targets.resolve_targets`)."""
    if targets in PRESETS:
        return None
    if not re.fullmatch(r"[A-Za-z0-9_.]+(,[A-Za-z0-9_.]+)*", targets):
        hint = did_you_mean(targets, PRESETS)
        return (f"must be a preset ({', '.join(PRESETS)}){hint} or comma-separated module names "
                "without spaces, e.g. q_proj,v_proj")
    names = targets.split(",")
    if len(names) == 1:
        # A lone word is a module name if it is shaped like one (q_proj, c_attn, attn.c_proj) or
        # resembles no preset (query_key_value); one close to a preset (qkv, atn) is a typo.
        module_like = targets.endswith(MODULE_SUFFIXES) or "." in targets
        if not module_like and difflib.get_close_matches(targets, PRESETS, n=1):
            return _unknown_preset_hint(targets)
    if len(set(names)) != len(names):
        return "has duplicate module names"
    return None


def _unknown_preset_hint(value: str) -> str:
    hint = did_you_mean(value, PRESETS)
    return (f"unknown target preset{hint}; valid presets: {', '.join(PRESETS)}, or a list of "
            "module names")
