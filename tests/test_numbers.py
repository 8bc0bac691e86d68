"""qlora_diag.core.numbers: the number formats of the report and JSON-safe values, on known
answers."""
from __future__ import annotations

import json
import math

import numpy as np

from qlora_diag.core import numbers as fmt


def test_formats_by_kind():
    assert fmt.loss(1.5135052) == "1.5135"
    assert fmt.gap(0.1553403) == "+0.1553" and fmt.gap(-0.25) == "-0.2500"
    assert fmt.sim(0.5138314) == "0.514"
    assert fmt.mb(258.3250732) == "258.3"
    assert fmt.pct(0.3916084) == "39.2 %" and fmt.pct_value(58.75) == "58.8 %"
    assert fmt.seconds(0.4426295) == "0.443"
    assert fmt.ratio(1.3213146) == "1.32×"
    assert fmt.count(134515008) == "134,515,008"
    assert fmt.fixed(2, 3) == "2.000"
    assert fmt.yes_no(True) == "yes" and fmt.yes_no(False) == "no"
    # weights 200 MB -> 50 MB is 75 % less; nothing to reduce from 0
    assert fmt.reduction(200.0, 50.0) == "75.0 %" and fmt.reduction(0.0, 5.0) == "n/a"


def test_undefined_numbers_print_as_na():
    for f in (fmt.loss, fmt.gap, fmt.sim, fmt.mb, fmt.pct, fmt.pct_value, fmt.seconds,
              fmt.ratio):
        assert f(None) == "n/a" and f(math.nan) == "n/a", f.__name__
    assert fmt.fixed(math.nan, 2) == "n/a"
    assert fmt.is_missing(None) and fmt.is_missing(math.nan)
    assert not fmt.is_missing(0.0) and not fmt.is_missing(0)


def test_json_safe():
    obj = {"nan": math.nan, "inf": [1.0, -math.inf], 3: (np.float64(0.5), np.int64(7)),
           "flag": np.bool_(True), "nested": {"x": np.float32(math.nan)}}
    out = fmt.json_safe(obj)
    assert out == {"nan": None, "inf": [1.0, None], "3": [0.5, 7], "flag": True,
                   "nested": {"x": None}}
    assert type(out["3"][1]) is int and type(out["flag"]) is bool
    json.dumps(out, allow_nan=False)  # valid JSON: no NaN or Infinity left
