"""H1's weight-level test: LoRA-vs-QLoRA similarity *across seeds* against the same-method noise
floor (LoRA-vs-LoRA and QLoRA-vs-QLoRA over every seed pair), from reports/compare/floors.csv.

Same-seed LoRA/QLoRA pairs share the adapter init and the batch order, which inflates their
similarity by construction (issue 11); the unconfounded comparison is cross-seed against the
same-method floor. The test is a two-sided permutation test of the difference in means (exact
when the pairs are few). Pairs that share a run are not independent, so the p-value is
approximate; the report says so.
"""
from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pandas as pd

from qlora_diag.core.schemas import (
    FLOOR_CONTROL,
    FLOOR_CROSS,
    FLOOR_LORA,
    FLOOR_QLORA,
    FLOOR_SAME,
)
from qlora_diag.report.statistics import DIFFERENCE_LEVEL, N_PERMUTATIONS

# Up to this many relabellings are enumerated (exact p); beyond, N_PERM random ones.
EXACT_MAX = 20_000
N_PERM = N_PERMUTATIONS

BELOW = "below the floor"
ABOVE = "above the floor"
NOT_DETECTED = "no difference from the floor detected"
UNAVAILABLE = "unavailable"


@dataclasses.dataclass(frozen=True)
class FloorTest:
    """Cross-seed LoRA-vs-QLoRA values of ``column`` against the same-method floor values."""

    column: str
    outcome: str
    cross_mean: float
    floor_mean: float
    floor_min: float
    floor_max: float
    difference: float
    p_value: float
    method: str
    n_cross: int
    n_floor: int
    same_seed_mean: float
    control_mean: float
    reason: str = ""

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def mean_difference_test(a: np.ndarray, b: np.ndarray, *, rng_seed: int) -> tuple[float, str]:
    """Two-sided permutation p-value of ``mean(a) − mean(b)``: exact over every relabelling
    when there are at most :data:`EXACT_MAX`, else (1 + k)/(1 + N_PERM) from random ones."""
    pooled = np.concatenate([a, b])
    n, k = len(pooled), len(a)
    observed = abs(a.mean() - b.mean())
    total, tol = pooled.sum(), 1e-12 * max(1.0, observed)
    if math.comb(n, k) <= EXACT_MAX:
        sums = np.array([pooled[list(c)].sum() for c in itertools.combinations(range(n), k)])
        diffs = np.abs(sums / k - (total - sums) / (n - k))
        return float(np.mean(diffs >= observed - tol)), "exact"
    rng = np.random.default_rng(rng_seed)
    idx = np.argsort(rng.random((N_PERM, n)), axis=1)[:, :k]
    sums = pooled[idx].sum(axis=1)
    diffs = np.abs(sums / k - (total - sums) / (n - k))
    return float((1 + np.sum(diffs >= observed - tol)) / (1 + N_PERM)), "permutation"


def floor_test(floors: pd.DataFrame | None, column: str = "cos_sim_mean", *,
               rng_seed: int = 0) -> FloorTest:
    """The H1 weight-level test on ``floors`` (None or no usable rows: outcome
    :data:`UNAVAILABLE` with the reason; never a made-up number)."""
    nan = math.nan

    def unavailable(reason: str) -> FloorTest:
        return FloorTest(column, UNAVAILABLE, nan, nan, nan, nan, nan, nan, "none", 0, 0, nan,
                         nan, reason)

    if floors is None:
        return unavailable("reports/compare/floors.csv is absent (a run from before the noise "
                           "floors were computed)")
    if column not in floors.columns:
        return unavailable(f"floors.csv has no column {column!r}")
    vals = floors.dropna(subset=[column])
    kind = vals["kind"]
    cross = vals.loc[kind == FLOOR_CROSS, column].to_numpy(float)
    floor = vals.loc[kind.isin([FLOOR_LORA, FLOOR_QLORA]), column].to_numpy(float)
    if len(cross) == 0 or len(floor) == 0:
        return unavailable(f"floors.csv has {len(cross)} cross-seed LoRA-vs-QLoRA pair(s) and "
                           f"{len(floor)} same-method pair(s); both are needed (two or more "
                           "seeds per method)")
    same = vals.loc[kind == FLOOR_SAME, column]
    control = vals.loc[kind == FLOOR_CONTROL, column]
    if len(cross) + len(floor) < 3:
        p, method = nan, "too few pairs"
    else:
        p, method = mean_difference_test(cross, floor, rng_seed=rng_seed)
    diff = float(cross.mean() - floor.mean())
    if not p < 1 - DIFFERENCE_LEVEL:
        outcome = NOT_DETECTED
    else:
        outcome = BELOW if diff < 0 else ABOVE
    return FloorTest(column, outcome, float(cross.mean()), float(floor.mean()),
                     float(floor.min()), float(floor.max()), diff, p, method, len(cross),
                     len(floor), float(same.mean()) if len(same) else nan,
                     float(control.mean()) if len(control) else nan)


# floors.csv columns that identify a pair rather than measure it.
ID_COLUMNS = ("kind", "seed_a", "seed_b", "run_a", "run_b", "rank", "targets", "data_seed_a",
              "data_seed_b", "n_modules")


def floor_tests(floors: pd.DataFrame | None, *, rng_seed: int = 0) -> dict[str, FloorTest]:
    """:func:`floor_test` of every measured column of floors.csv (cos_sim_mean first; then e.g.
    left/right subspace phi, KL, token match, hidden cosine where the compare stage computed
    them); empty when the file is absent."""
    if floors is None:
        return {}
    cols = [c for c in floors.columns if c not in ID_COLUMNS
            and pd.api.types.is_numeric_dtype(floors[c]) and floors[c].notna().any()]
    cols = sorted(cols, key=lambda c: (c != "cos_sim_mean", c))
    return {c: floor_test(floors, c, rng_seed=rng_seed) for c in cols}


def floor_sentence(t: FloorTest, what: str = "cos(ΔW)") -> str:
    """The test in words; "no difference detected" is never worded as "the same"."""
    if t.outcome == UNAVAILABLE:
        return f"the weight-level noise floor is unavailable: {t.reason}"
    nums = (f"cross-seed LoRA-vs-QLoRA {what} {t.cross_mean:.3f} (n = {t.n_cross}) vs the "
            f"same-method floor {t.floor_mean:.3f} (range {t.floor_min:.3f}–{t.floor_max:.3f}, "
            f"n = {t.n_floor})")
    p = "p n/a" if math.isnan(t.p_value) else f"permutation p = {t.p_value:.3f}"
    note = "; pairs share runs, so p is approximate"
    if t.outcome == BELOW:
        s = f"{nums}: quantization moves ΔW more than a seed change does ({p}{note})"
    elif t.outcome == ABOVE:
        s = f"{nums}: cross-seed pairs are more similar than same-method pairs ({p}{note})"
    else:
        s = (f"{nums}: no difference from the floor detected ({p}{note}; this is not a test "
             "of equivalence)")
    if not math.isnan(t.same_seed_mean):
        s += (f"; same-seed pairs {t.same_seed_mean:.3f} share the adapter init and batch "
              "order, so they are not compared with the floor")
    if not math.isnan(t.control_mean):
        s += f"; same-init control (other data order) {t.control_mean:.3f}"
    return s
