"""Fuzz the params validator: random mutations of the real params.yaml either validate or are
rejected with a ParamsError whose every line starts with the key it is about -- never a crash."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlora_diag.core.config import Params, params_from_dict
from qlora_diag.core.errors import ParamsError

REAL = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
TOP = tuple(REAL)

scalars = st.one_of(
    st.integers(-3, 70),
    st.integers(min_value=-2**80, max_value=2**80),
    st.integers(4400, 4500).map(lambda n: 10**n),  # more digits than Python will print
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["qv", "nf4", "auto", "8", "1e-3", "q_proj,v_prj", "embedded:xyz", ""]),
    st.booleans(),
    st.none(),
)
keys = st.one_of(st.text(max_size=10), st.integers(-5, 5), st.booleans(), st.none())
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=3)),
    max_leaves=8,
)


def typo(data, word: str) -> str:
    """A one-edit misspelling: drop, double, swap or replace one character."""
    if not word:
        return "x"
    i = data.draw(st.integers(0, len(word) - 1))
    op = data.draw(st.sampled_from(["drop", "double", "swap", "replace"]))
    if op == "drop" and len(word) > 1:
        return word[:i] + word[i + 1:]
    if op == "swap" and i + 1 < len(word):
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if op == "replace":
        return word[:i] + data.draw(st.sampled_from("aeiourst_")) + word[i + 1:]
    return word[:i] + word[i] + word[i:]


def containers(node, depth=0):
    """Every (container, key) pair below the root, at any depth: mapping keys and list items."""
    if isinstance(node, dict):
        items = list(node.items())
    elif isinstance(node, list):
        items = list(enumerate(node))
    else:
        items = []
    for k, v in items:
        yield node, k
        if depth < 4:
            yield from containers(v, depth + 1)


def mutate(data, raw: dict) -> None:
    places = list(containers(raw))
    if not places:
        raw["seed"] = data.draw(values)
        return
    node, key = data.draw(st.sampled_from(places))
    op = data.draw(st.sampled_from(["delete", "rename", "replace", "replace", "add"]))
    if op == "delete":
        del node[key]
    elif op == "rename" and isinstance(node, dict) and isinstance(key, str):
        node[typo(data, key)] = node.pop(key)
    elif op == "add" and isinstance(node, dict):
        node[data.draw(keys)] = data.draw(values)
    else:
        node[key] = data.draw(values)


def names_a_key(line: str, raw: dict) -> bool:
    """The line starts with a top-level key -- a known one, or one present in ``raw`` --
    followed by `` ``, ``:`` or ``.`` (then the section's key)."""
    heads = set(TOP) | {repr(k) for k in raw} | {k for k in raw if isinstance(k, str)}
    return any(line.startswith(h) and line[len(h):len(h) + 1] in (" ", ":", ".") for h in heads)


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_validator_accepts_or_names_a_key(data):
    raw = copy.deepcopy(REAL)
    for _ in range(data.draw(st.integers(1, 4))):
        mutate(data, raw)
    try:
        params = params_from_dict(raw)
    except ParamsError as exc:
        assert exc.problems
        for line in exc.problems:
            assert "\n" not in line and len(line) < 600, line
            assert names_a_key(line, raw), line
    else:
        assert isinstance(params, Params)
        assert isinstance(params.lora.alpha, float) and math.isfinite(params.lora.alpha)
        assert params.lora.r in params.sweep.ranks
