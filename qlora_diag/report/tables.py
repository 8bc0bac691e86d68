"""Markdown tables for the report, and picking a table's row for a params value."""
from __future__ import annotations

import pandas as pd

from qlora_diag.core.errors import UserError


def md_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub-flavoured markdown table; cells are written with ``str``."""
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def row_at(df: pd.DataFrame, col: str, value) -> pd.Series:
    """The first row with ``df[col] == value``; a UserError when the sweep tables and
    params.yaml disagree (e.g. lora.r is not among the ranks swept)."""
    hit = df[df[col] == value]
    if hit.empty:
        raise UserError(f"no row with {col} = {value} in the {col} table; the sweep and "
                        "params.yaml disagree (re-run `dvc repro`)")
    return hit.iloc[0]
