"""Reading ``params.yaml`` into :class:`~.params.Params`: parse, type-check, check, build.

:func:`load_params` collects *all* problems of the file at once (one line each, naming key,
value and what is valid) and raises :class:`~qlora_diag.core.errors.ParamsError`, so a typo
fails in a second, not after an hour. Each field's own checks run on a value of the right type,
so a wrong type in one key does not hide a bad range in its neighbour; the checks between keys
(:mod:`.relations`) then run on every group whose keys are individually valid.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path
from typing import Any

# ruamel.yaml comes with dvc (pinned in requirements.txt): the parser whose reading we must match.
from ruamel.yaml import YAML
from ruamel.yaml.constructor import DuplicateKeyError, SafeConstructor
from ruamel.yaml.error import YAMLError
from ruamel.yaml.nodes import ScalarNode
from ruamel.yaml.reader import ReaderError

from qlora_diag.core.config.checks import did_you_mean, show
from qlora_diag.core.config.params import Params
from qlora_diag.core.config.relations import relation_problems
from qlora_diag.core.errors import ParamsError, UserError

# ---------------------------------------------------------------------------------------------
# The file
# ---------------------------------------------------------------------------------------------


class _Constructor(SafeConstructor):
    """ruamel.yaml's safe constructor, as DVC uses it (``YAML(typ="safe")``), with a duplicate
    key message that names the line of the key's first occurrence (ruamel's names the line where
    the mapping starts). What counts as a duplicate is ruamel's decision, unchanged."""

    def check_mapping_key(self, node, key_node, mapping, key, value) -> bool:
        if key in mapping and not self.allow_duplicate_keys:
            first = None
            for k, _ in node.value:  # the keys before this one are constructed (and cached)
                if k is key_node:
                    break
                if isinstance(k, ScalarNode) and self.construct_object(k) == key:
                    first = k
                    break
            name = key_node.value if isinstance(key_node, ScalarNode) else show(key)
            where = f" (first on line {first.start_mark.line + 1})" if first is not None else ""
            raise DuplicateKeyError(None, None, f"duplicate key {name!r}{where}; each key may "
                                    "appear once", key_node.start_mark)
        return super().check_mapping_key(node, key_node, mapping, key, value)


def read_yaml(path: Path, text: str) -> Any:
    """``text`` (the contents of ``path``) parsed as DVC parses ``params.yaml``: ruamel.yaml,
    safe loader, YAML 1.2 -- so ``1e-3`` is a float and ``yes`` a string, and a duplicate key is
    an error. Errors become one :class:`UserError` line naming the line of the problem."""
    # pure=True: the same parser whether or not ruamel.yaml.clib is installed, so messages do
    # not depend on the machine (DVC may use the C parser; it accepts the same documents).
    yaml = YAML(typ="safe", pure=True)
    yaml.Constructor = _Constructor
    try:
        return yaml.load(text)
    except ReaderError as exc:  # a character YAML does not allow; it has a position, no mark
        line = text.count("\n", 0, exc.position) + 1
        why = str(exc).splitlines()[0]
        raise UserError(f"{path} line {line}: not valid YAML ({why})") from None
    except YAMLError as exc:
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
    except RecursionError:  # the parser recurses once per level of [ or {
        raise UserError(f"{path}: cannot be read (lists or mappings nested too deeply); "
                        "params.yaml holds sections of keys, two levels deep") from None


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
    return params_from_dict(read_yaml(path, text), str(path))


# ---------------------------------------------------------------------------------------------
# Typed loading
# ---------------------------------------------------------------------------------------------

def params_from_dict(raw: Any, source: str = "params.yaml") -> Params:
    """Validate a parsed params mapping; raise :class:`ParamsError` listing every problem."""
    if not isinstance(raw, dict):
        names = ", ".join(f.name for f in dataclasses.fields(Params))
        got = "it is empty" if raw is None else f"got {show(raw)}"
        raise ParamsError([f"the file must be a mapping with keys {names}; {got}"], source)
    problems: list[str] = []
    good: dict[str, Any] = {}
    _load_fields(Params, raw, "", problems, good)
    problems += relation_problems(good)
    if problems:
        raise ParamsError(problems, source)
    return _build(Params, good, "")


def _load_fields(cls: type, raw: dict, prefix: str, problems: list[str],
                 good: dict[str, Any]) -> None:
    """Type-check and value-check every field of ``cls`` in ``raw`` (a section, or the whole
    file when ``prefix`` is empty); valid values go to ``good`` under their dotted key."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            where = f"{prefix}.{_key(key)}" if prefix else _key(key)
            hint = (did_you_mean(key, names, f"{prefix}." if prefix else "")
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
                problems.append(f"{key} = {show(value)}: must be a mapping with keys "
                                f"{', '.join(x.name for x in dataclasses.fields(tp))}{empty}")
            continue
        why = _type_problem(value, tp, f.metadata["comma_list"])
        if why:
            problems.append(f"{key} = {show(value)}: {why}")
            continue
        if tp is float:
            value = float(value)
        why = next((w for w in (c(value) for c in f.metadata["checks"]) if w), None)
        if why:
            problems.append(f"{key} = {show(value)}: {why}")
        else:
            good[key] = value


def _build(cls: type, good: dict[str, Any], prefix: str):
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        values[f.name] = _build(tp, good, key) if dataclasses.is_dataclass(tp) else good[key]
    return cls(**values)


def _key(key: Any) -> str:
    """An unknown key as written, unless printing it raw would break the one-line message."""
    return key if isinstance(key, str) and key.isprintable() and len(key) <= 60 else show(key)


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # e.g. int | Literal["auto"]
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return isinstance(value, str) and value in typing.get_args(tp)
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
    if origin is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {({int: 'integers', str: 'strings'})[typing.get_args(tp)[0]]}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[tp]


def _type_problem(value: Any, tp: Any, comma_list: bool = False) -> str | None:
    if _type_ok(value, tp):
        return None
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return "must be a finite number"
    hint = ""
    alternatives = typing.get_args(tp) if typing.get_origin(tp) is typing.Union else (tp,)
    words = [w for a in alternatives if typing.get_origin(a) is typing.Literal
             for w in typing.get_args(a)]
    if isinstance(value, str) and any(a in (int, float) and _parses_as(value, a)
                                      for a in alternatives):
        hint = " (remove the quotes)"
    elif isinstance(value, str) and words:
        hint = did_you_mean(value, words)
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
