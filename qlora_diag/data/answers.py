"""Answers: the probe's independent checker, and exact match of generated answers.

:func:`check_answer` re-derives the answer of a probe example (:mod:`qlora_diag.data.probe`)
from its instruction and input by parsing the text -- it never calls the generators, and has
its own unit table; it shares only ``CAPITALS`` and ``SYMBOLS``, which *define* the facts.
:func:`exact_match` scores a generated answer against the reference, for any data source.
"""
from __future__ import annotations

import re
from collections.abc import Callable

from qlora_diag.data.probe import CAPITALS, SYMBOLS, TASKS

# Size of each unit in its dimension's base unit (meter, gram, second, milliliter).
_UNIT_SIZE = {
    "kilometers": 1000, "meters": 1, "centimeters": 0.01, "kilograms": 1000, "grams": 1,
    "weeks": 7 * 86400, "days": 86400, "hours": 3600, "minutes": 60, "seconds": 1,
    "liters": 1000, "milliliters": 1,
}
_INT = re.compile(r"\d+")


def _ints(text: str) -> list[int]:
    return [int(x) for x in _INT.findall(text)]


def _payload(example: dict) -> str:
    """The data of an example: its input, else what follows the instruction's last colon."""
    if example["input"]:
        return example["input"]
    return example["instruction"].rsplit(":", 1)[1]


def _has(pattern: str, text: str) -> bool:
    return re.search(pattern, text, flags=re.IGNORECASE) is not None


def _solve_arithmetic(ex: dict) -> str:
    text = f"{ex['instruction']} {ex['input']}"
    nums = _ints(text)
    if len(nums) != 2:
        raise ValueError(f"expected two numbers in {text!r}")
    a, b = nums
    if _has(r"\+|\badd\b|\bsum\b|\bplus\b", text):
        return str(a + b)
    if _has(r"\bsubtract\b|\btake\b", text):
        # "subtract B from A" / "take B away from A": the minuend comes second.
        return str(b - a)
    if _has(r" - |\bminus\b|\bdifference\b", text):
        return str(a - b)
    raise ValueError(f"no operation found in {text!r}")


def _solve_multiply(ex: dict) -> str:
    a, b = _ints(f"{ex['instruction']} {ex['input']}")
    return str(a * b)


def _solve_reverse(ex: dict) -> str:
    return " ".join(_payload(ex).split()[::-1])


def _solve_sort(ex: dict) -> str:
    nums = _ints(_payload(ex))
    descending = _has(r"largest to smallest|descending|decreasing", ex["instruction"])
    return ", ".join(str(x) for x in sorted(nums, reverse=descending))


def _solve_case(ex: dict) -> str:
    quoted = re.search(r'"([^"]+)"', ex["instruction"])
    text = quoted.group(1) if quoted else _payload(ex).strip()
    if _has(r"upper|capital", ex["instruction"]):
        return text.upper()
    if _has(r"lower|small letters", ex["instruction"]):
        return text.lower()
    raise ValueError(f"no case direction in {ex['instruction']!r}")


def _solve_count(ex: dict) -> str:
    # "the letter": the bare word "letter" can also be an item of a list to count.
    if _has(r"\bthe letter\b", ex["instruction"]):
        letter = re.search(r'the letter "?([a-z])\b', ex["instruction"]).group(1)
        word_match = re.search(r'word "([a-z]+)"', ex["instruction"])
        word = word_match.group(1) if word_match else ex["input"].strip()
        return str(sum(1 for ch in word if ch == letter))
    items = [x for x in _payload(ex).split(",") if x.strip()]
    return str(len(items))


def _solve_convert(ex: dict) -> str:
    text = f"{ex['instruction']} {ex['input']}"
    units = "|".join(_UNIT_SIZE)
    found = re.search(rf"(\d+) ({units})\b", text)
    value, src = int(found.group(1)), found.group(2)
    others = [u for u in re.findall(rf"\b({units})\b", text) if u != src]
    if len(others) != 1:
        raise ValueError(f"expected one target unit in {text!r}")
    result = value * _UNIT_SIZE[src] / _UNIT_SIZE[others[0]]
    return str(round(result))


def _solve_extract(ex: dict) -> str:
    text = f"{ex['instruction']} {ex['input']}"
    if _has(r"e-?mail", ex["instruction"]):
        found = re.findall(r"[a-z0-9.]+@[a-z0-9]+(?:\.[a-z0-9]+)+", text)
    elif _has(r"\byear\b", ex["instruction"]):
        found = re.findall(r"\b\d{4}\b", text)
    else:
        found = _INT.findall(text)
    if len(found) != 1:
        raise ValueError(f"expected exactly one match in {text!r}, got {found}")
    return found[0]


def _find_name(names, text: str) -> str | None:
    hits = [n for n in names if re.search(rf"\b{re.escape(n)}\b", text)]
    return hits[0] if len(hits) == 1 else None


def _solve_capital(ex: dict) -> str:
    text = f"{ex['instruction']} {ex['input']}"
    country = _find_name(CAPITALS, text)
    if country is not None:
        return CAPITALS[country]
    by_city = {city: c for c, city in CAPITALS.items()}
    return by_city[_find_name(by_city, text)]


def _solve_symbol(ex: dict) -> str:
    text = f"{ex['instruction']} {ex['input']}"
    element = _find_name(SYMBOLS, text)
    if element is not None:
        return SYMBOLS[element]
    by_symbol = {s: e for e, s in SYMBOLS.items()}
    return by_symbol[_find_name(by_symbol, text)]


_SOLVERS: dict[str, Callable[[dict], str]] = {
    "arithmetic": _solve_arithmetic, "multiply": _solve_multiply, "reverse": _solve_reverse,
    "sort": _solve_sort, "case": _solve_case, "count": _solve_count, "convert": _solve_convert,
    "extract": _solve_extract, "capital": _solve_capital, "symbol": _solve_symbol,
}


def check_answer(example: dict) -> bool:
    """True when ``example["output"]`` is the answer re-derived from its instruction and input.

    A text the checker cannot parse unambiguously counts as a failure, not an exception: the
    generator must only produce examples with one well-defined answer.
    """
    solver = _SOLVERS.get(example["task"])
    if solver is None:
        raise ValueError(f"unknown probe task {example['task']!r}; tasks: {', '.join(TASKS)}")
    try:
        expected = solver(example)
    except (ValueError, KeyError, AttributeError, IndexError, TypeError):
        return False
    return expected == example["output"]


def normalize_answer(text: str) -> str:
    """First line, whitespace stripped, one trailing period removed; case is kept.

    Leading whitespace is stripped *before* taking the first line, because a model may emit a
    newline right after "### Response:\\n"; anything after the answer's line is ignored so a
    model that keeps talking is scored on its answer.
    """
    line = text.strip().split("\n", 1)[0].strip()
    if line.endswith("."):
        line = line[:-1].rstrip()
    return line


def exact_match(prediction: str, reference: str) -> bool:
    """Case-sensitive equality after :func:`normalize_answer` on both sides."""
    return normalize_answer(prediction) == normalize_answer(reference)
