"""Numbers as the outputs show them: text formats of the report and the stages' console lines,
and JSON-safe values.

Formats are the same everywhere: losses and their gaps 4 decimals, similarities 3, MB 1,
percentages 1, seconds 3, ratios 2. An undefined number (None or nan: e.g. a seed spread with
one seed, a step time of a run that timed no step) prints as ``n/a``, never as 0.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

NA = "n/a"


def is_missing(x) -> bool:
    """None or a float nan: an undefined number."""
    return x is None or (isinstance(x, float) and math.isnan(x))


def fixed(x, decimals: int) -> str:
    """``decimals`` fixed decimals; n/a for a missing number."""
    return NA if is_missing(x) else f"{float(x):.{decimals}f}"


def loss(x) -> str:
    """A loss (nats/token), a spread or a KL: 4 decimals."""
    return fixed(x, 4)


def gap(x) -> str:
    """A signed difference of losses: 4 decimals with its sign."""
    return NA if is_missing(x) else f"{float(x):+.4f}"


def sim(x) -> str:
    """A similarity (cosine, subspace, alignment): 3 decimals."""
    return fixed(x, 3)


def mb(x) -> str:
    """Megabytes (2**20 bytes): 1 decimal."""
    return fixed(x, 1)


def pct(frac) -> str:
    """A fraction in [0, 1] as a percentage."""
    return NA if is_missing(frac) else f"{100 * float(frac):.1f} %"


def pct_value(x) -> str:
    """A number already in percent."""
    return NA if is_missing(x) else f"{float(x):.1f} %"


def seconds(x) -> str:
    return fixed(x, 3)


def ratio(x) -> str:
    """A ratio of two measurements, e.g. ``1.32×``."""
    return NA if is_missing(x) else f"{float(x):.2f}×"


def count(x) -> str:
    """An integer with thousands separators."""
    return f"{int(x):,}"


def yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def reduction(before: float, after: float) -> str:
    """How much smaller ``after`` is than ``before``, in percent (n/a when before is 0)."""
    return NA if not before else pct_value(100 * (before - after) / before)


def json_safe(obj: Any) -> Any:
    """``obj`` with every value JSON can hold: nan and ±inf -> None (JSON null; DVC shows it as
    "-"), numpy scalars -> Python numbers, tuples -> lists, dict keys -> str; recursively.
    nan means undefined here (e.g. a seed spread with one seed), never zero."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):  # numpy's bool_ and int64 are not JSON-serialisable
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
