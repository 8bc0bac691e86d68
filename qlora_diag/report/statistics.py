"""The statistics behind the verdicts: paired gaps, their intervals, and the decision rules.

The design and the rules are those of RESEARCH.md, "How a verdict must be decided":

* The unit of evidence is the paired gap ``d_s = QLoRA_s − LoRA_s`` of seed ``s`` (same adapter
  init, same batches), for the eval loss in nats/token and for exact match in points.
* Its mean gets a t-interval across seeds (n − 1 degrees of freedom) and a hierarchical bootstrap
  (resample seeds, then eval examples within a seed). With one seed only an interval over eval
  examples exists; every interval carries which one it is (``over``: ``"seeds"``,
  ``"examples"``, ``"seeds+examples"``) so the report can say when it omits seed noise.
* Decisions are against a stated margin δ: *equivalent* when the 90 % interval lies inside ±δ
  (two one-sided tests at 5 % each), *QLoRA worse* / *QLoRA better* when the 95 % interval
  excludes 0 *and* the estimate is beyond δ, otherwise *inconclusive* with the number of paired
  seeds the observed seed SD says would be needed.

Decisions use the t-interval (over seeds; over examples when there is one seed): its error rates
are exact for normally distributed ``d_s`` and are checked by Monte Carlo in
``tests/test_statistics.py``. The t-interval is conditional on the eval set (every seed is scored
on the same examples); the hierarchical bootstrap, reported beside it, adds eval-set sampling.
The percentile bootstrap is known to be too narrow with a handful of seeds, which is one more
reason it does not decide.

Everything here is pure numpy + the standard library (scipy is not in the pinned stack): the
Student-t distribution is computed from the regularized incomplete beta function.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import statistics as _stdlib_statistics
from collections.abc import Sequence
from typing import Any

import numpy as np

from qlora_diag.core.errors import UserError

# RESEARCH.md: "different when the 95 % interval excludes 0" -> two-sided alpha 0.05.
DIFFERENCE_LEVEL = 0.95
# RESEARCH.md: TOST at 5 % per side <=> the 90 % interval lies inside ±δ.
EQUIVALENCE_LEVEL = 0.90
# RESEARCH.md: seeds needed for 80 % power (β = 0.2), the usual planning target.
TARGET_POWER = 0.80

EQUIVALENT = "equivalent"
QLORA_WORSE = "QLoRA worse"
QLORA_BETTER = "QLoRA better"
INCONCLUSIVE = "inconclusive"
LABELS = (EQUIVALENT, QLORA_WORSE, QLORA_BETTER, INCONCLUSIVE)

OVER_SEEDS = "seeds"
OVER_EXAMPLES = "examples"
OVER_BOTH = "seeds+examples"

# Above this many points a permutation p-value is estimated from random permutations instead of
# enumerating all n! of them (8! = 40 320 rows of 8 ranks is a few MB and milliseconds).
EXACT_PERMUTATION_MAX_N = 8
# Random permutations of the report's permutation tests (correlations, trends, floors) where
# enumerating every relabelling is too many: p resolves to 1/10 000.
N_PERMUTATIONS = 9999
# A correlation or floor difference counts when its two-sided permutation p is below this
# (the same 5 % as a difference: 1 − DIFFERENCE_LEVEL).
PERMUTATION_ALPHA = 0.05

# Largest number of paired seeds seeds_needed() searches; beyond it the answer is "not feasible".
MAX_SEEDS_SEARCHED = 10_000_000
# Bootstrap work is chunked so that one chunk holds at most this many resampled example indices
# (about 16 MB of int64), whatever the eval-set size.
_BOOTSTRAP_CHUNK_CELLS = 2_000_000


@dataclasses.dataclass(frozen=True)
class Quantity:
    """A compared quantity: its name, unit, words for the report, and which sign is bad."""

    name: str
    unit: str
    label: str
    # Eval loss: a positive gap (QLoRA higher) is worse. Exact match: a positive gap is better.
    higher_is_worse: bool


QUANTITIES = {
    "eval_loss": Quantity("eval_loss", "nats/token", "eval loss", higher_is_worse=True),
    "exact_match": Quantity("exact_match", "points", "exact match", higher_is_worse=False),
}


def _quantity(name: str) -> Quantity:
    if name not in QUANTITIES:
        raise UserError(f"unknown quantity {name!r} for a paired gap; valid: "
                        f"{', '.join(sorted(QUANTITIES))}.")
    return QUANTITIES[name]


def _jsonable(value: Any) -> Any:
    """Plain JSON types: numpy scalars to Python, nan/inf to None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, np.bool_):
        return bool(value)
    return value


class _ToDict:
    def to_dict(self) -> dict:
        """A JSON-serializable dict (nested results included; nan becomes null)."""
        return _jsonable(dataclasses.asdict(self))


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class SeedRecords:
    """One seed's paired per-example eval records (the same examples for LoRA and QLoRA).

    ``nll_*``: summed response negative log-likelihood (nats) of each example; ``n_tokens``:
    its response token count (the same for both methods); ``em_*``: exact match 0/1;
    ``family``: the task family of each example. Arrays are validated and copied on creation.
    """

    seed: int
    nll_lora: np.ndarray
    nll_qlora: np.ndarray
    n_tokens: np.ndarray
    em_lora: np.ndarray
    em_qlora: np.ndarray
    family: np.ndarray

    def __post_init__(self):
        where = f"eval records of seed {self.seed!r}"
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise UserError(f"{where}: the seed must be an integer, got {self.seed!r}.")
        n = None
        for key in ("nll_lora", "nll_qlora", "n_tokens", "em_lora", "em_qlora", "family"):
            raw = getattr(self, key)
            try:
                arr = np.array(raw, dtype=object if key == "family" else np.float64, copy=True)
            except (TypeError, ValueError) as e:
                raise UserError(f"{where}: {key} must be a list of numbers, one per eval "
                                f"example ({e}).") from None
            if arr.ndim != 1:
                raise UserError(f"{where}: {key} must be a flat list with one value per eval "
                                f"example, got shape {arr.shape}.")
            if n is None:
                n = len(arr)
                if n == 0:
                    raise UserError(f"{where}: {key} is empty; a paired comparison needs at "
                                    "least one eval example.")
            elif len(arr) != n:
                raise UserError(f"{where}: {key} has {len(arr)} values but nll_lora has {n}; "
                                "every field needs one value per eval example.")
            if key.startswith("nll"):
                bad = ~np.isfinite(arr) | (arr < 0)
                if bad.any():
                    i = int(np.argmax(bad))
                    raise UserError(f"{where}: {key}[{i}] = {float(arr[i])!r}; a summed negative "
                                    "log-likelihood must be finite and >= 0.")
            elif key == "n_tokens":
                bad = ~np.isfinite(arr) | (arr < 1) | (arr != np.round(arr))
                if bad.any():
                    i = int(np.argmax(bad))
                    raise UserError(f"{where}: n_tokens[{i}] = {float(arr[i])!r}; a response token "
                                    "count must be a positive integer.")
            elif key.startswith("em"):
                bad = (arr != 0) & (arr != 1)
                if bad.any():
                    i = int(np.argmax(bad))
                    raise UserError(f"{where}: {key}[{i}] = {float(arr[i])!r}; exact match must be "
                                    "0 or 1.")
            else:
                for i, f in enumerate(arr):
                    if not isinstance(f, str) or not f:
                        raise UserError(f"{where}: family[{i}] = {f!r}; a task family must be "
                                        "a non-empty string.")
                arr = arr.astype(str)
            arr.setflags(write=False)
            object.__setattr__(self, key, arr)
        object.__setattr__(self, "seed", int(self.seed))

    @property
    def n_examples(self) -> int:
        return len(self.n_tokens)

    def terms(self, quantity: str, family: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per-example numerator and weight of the gap: the seed's gap is ``sum(a) / sum(w)``.

        Eval loss is token-weighted (sum of nll over sum of tokens, RESEARCH.md), so
        ``a = nll_qlora − nll_lora`` and ``w = n_tokens``; exact match in points has
        ``a = 100·(em_qlora − em_lora)`` and ``w = 1``. Resampling examples must resample these
        pairs together, which recomputes the ratio of sums over the resampled examples.
        """
        q = _quantity(quantity)
        mask = np.ones(self.n_examples, bool) if family is None else self.family == family
        if not mask.any():
            raise UserError(f"eval records of seed {self.seed}: no example of task family "
                            f"{family!r}; families present: "
                            f"{', '.join(sorted(set(self.family.tolist())))}.")
        if q.name == "eval_loss":
            return (self.nll_qlora - self.nll_lora)[mask], self.n_tokens[mask]
        return 100.0 * (self.em_qlora - self.em_lora)[mask], np.ones(int(mask.sum()))


def _check_records(records: Sequence[SeedRecords]) -> list[SeedRecords]:
    records = list(records)
    if not records:
        raise UserError("no paired eval records: at least one seed with LoRA and QLoRA eval "
                        "results is needed.")
    for r in records:
        if not isinstance(r, SeedRecords):
            raise UserError(f"paired eval records must be SeedRecords, got {type(r).__name__}.")
    seeds = [r.seed for r in records]
    dup = sorted({s for s in seeds if seeds.count(s) > 1})
    if dup:
        raise UserError(f"seed(s) {dup} appear more than once in the paired eval records; "
                        "each seed is one replicate and must appear once.")
    return records


def _check_shared(records: list[SeedRecords]) -> None:
    """``examples_shared=True`` claims every seed was scored on the same eval examples."""
    first = records[0]
    for r in records[1:]:
        if r.n_examples != first.n_examples:
            raise UserError(f"examples_shared=True, but seed {r.seed} has {r.n_examples} eval "
                            f"examples and seed {first.seed} has {first.n_examples}; pass "
                            "examples_shared=False if the seeds were scored on different "
                            "examples.")
        diff = (r.n_tokens != first.n_tokens) | (r.family != first.family)
        if diff.any():
            i = int(np.argmax(diff))
            raise UserError(f"examples_shared=True, but eval example {i} differs between seed "
                            f"{first.seed} and seed {r.seed} (token count or task family); "
                            "the seeds must list the same examples in the same order, or pass "
                            "examples_shared=False.")


def seed_gaps(records: Sequence[SeedRecords], quantity: str,
              family: str | None = None) -> np.ndarray:
    """The paired gap ``d_s = QLoRA_s − LoRA_s`` of every seed, in the order given.

    Eval loss: ``sum(nll_qlora)/sum(tokens) − sum(nll_lora)/sum(tokens)`` (nats/token); exact
    match: the difference of the two exact-match rates in points. ``family`` restricts both to
    one task family.
    """
    out = []
    for r in _check_records(records):
        a, w = r.terms(quantity, family)
        out.append(a.sum() / w.sum())
    return np.array(out)


# ---------------------------------------------------------------------------------------------
# Distributions (scipy is not available: the Student t from the incomplete beta function)
# ---------------------------------------------------------------------------------------------

def normal_quantile(p: float) -> float:
    """The standard normal quantile z_p (the standard library's inverse CDF)."""
    return _stdlib_statistics.NormalDist().inv_cdf(p)


_normal_cdf = np.vectorize(lambda x: 0.5 * math.erfc(-x / math.sqrt(2.0)), otypes=[float])


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes
    §6.4). It converges in O(sqrt(max(a, b))) steps for x < (a + 1)/(a + b + 2)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = 1.0
    d = 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 100_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            return h
    raise ArithmeticError(f"incomplete beta did not converge (a={a}, b={b}, x={x})")


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                     + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """Upper tail P(T > t) of Student's t with ``df`` degrees of freedom."""
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if t == 0:
        return 0.5
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t > 0 else 1.0 - tail


@functools.lru_cache(maxsize=4096)
def t_quantile(p: float, df: float) -> float:
    """The Student-t quantile t_{p, df}, by bisection on :func:`t_sf` to ~1e-12 relative."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"probability must be in (0, 1), got {p}")
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if p == 0.5:
        return 0.0
    upper = 1.0 - p
    lo, hi = 0.0, max(1.0, normal_quantile(p))
    while t_sf(hi, df) > upper:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_sf(mid, df) > upper:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * hi:
            break
    return 0.5 * (lo + hi)


# ---------------------------------------------------------------------------------------------
# Intervals
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Interval(_ToDict):
    """An estimate of the mean paired gap with its standard error and a two-sided interval.

    ``over`` says which noise the interval covers: ``"seeds"`` (t across seeds, conditional on
    the eval set), ``"examples"`` (one seed: eval-example noise only, *omits seed noise*), or
    ``"seeds+examples"`` (hierarchical bootstrap). ``n_examples`` counts all paired example
    records used (summed over seeds). ``df`` is set for t-intervals, ``n_boot`` for bootstraps.
    """

    quantity: str
    unit: str
    family: str | None
    method: str          # "t" | "bootstrap"
    estimate: float
    se: float
    low: float
    high: float
    level: float
    over: str
    n_seeds: int
    n_examples: int
    df: float | None = None
    n_boot: int | None = None


def _check_level(level: float) -> float:
    if not (isinstance(level, (int, float)) and 0.0 < level < 1.0):
        raise UserError(f"an interval level must be a probability strictly between 0 and 1 "
                        f"(e.g. 0.95), got {level!r}.")
    return float(level)


def _ratio_se(a: np.ndarray, w: np.ndarray) -> float:
    """Standard error of ``sum(a)/sum(w)`` over iid examples (linearization / delta method,
    Cochran 1977 §6.3): residuals ``a − d·w``; with ``w = 1`` it is the ordinary SE of a mean."""
    m = len(a)
    d = a.sum() / w.sum()
    e = a - d * w
    return math.sqrt(float((e @ e) / (m * (m - 1)))) / float(w.mean())


def t_interval(records: Sequence[SeedRecords], quantity: str, *, level: float,
               family: str | None = None) -> Interval:
    """The t-interval of the mean paired gap (RESEARCH.md, "Intervals").

    Two or more seeds: mean of ``d_s`` ± t_{(1+level)/2, n−1} · sd(d_s)/√n, ``over="seeds"``.
    One seed: the eval-example interval of that seed's gap (a ratio of sums for eval loss, so
    its SE is the linearized one of :func:`_ratio_se`) with m − 1 degrees of freedom,
    ``over="examples"`` — it omits seed noise.
    """
    q = _quantity(quantity)
    level = _check_level(level)
    records = _check_records(records)
    n_ex = sum(len(r.terms(quantity, family)[0]) for r in records)
    if len(records) >= 2:
        d = seed_gaps(records, quantity, family)
        n = len(d)
        est, se, df, over = float(d.mean()), float(d.std(ddof=1) / math.sqrt(n)), n - 1, OVER_SEEDS
    else:
        a, w = records[0].terms(quantity, family)
        if len(a) < 2:
            raise UserError(f"one seed with {len(a)} eval example(s)"
                            f"{'' if family is None else f' of family {family!r}'}: an interval "
                            "over examples needs at least 2 examples (or a second seed).")
        est, se, df, over = float(a.sum() / w.sum()), _ratio_se(a, w), len(a) - 1, OVER_EXAMPLES
    half = t_quantile(0.5 + level / 2.0, df) * se
    return Interval(q.name, q.unit, family, "t", est, se, est - half, est + half, level, over,
                    len(records), n_ex, df=float(df))


def _streams(rng_seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent generators for the seed draws and the example draws: with the seed draws on
    their own stream, a bootstrap whose examples carry no within-seed variance gives exactly
    the replicates of :func:`seed_bootstrap` with the same ``rng_seed``."""
    if isinstance(rng_seed, bool) or not isinstance(rng_seed, (int, np.integer)) or rng_seed < 0:
        raise UserError(f"rng_seed must be a non-negative integer, got {rng_seed!r}.")
    seq_seeds, seq_examples = np.random.SeedSequence(int(rng_seed)).spawn(2)
    return np.random.default_rng(seq_seeds), np.random.default_rng(seq_examples)


def _check_n_boot(n_boot: int) -> int:
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 100:
        raise UserError(f"n_boot must be an integer >= 100 (a percentile interval from fewer "
                        f"replicates is mostly Monte Carlo noise), got {n_boot!r}.")
    return int(n_boot)


def _resampled_ratios(a: np.ndarray, w: np.ndarray, k: int,
                      rng: np.random.Generator) -> np.ndarray:
    """``k`` bootstrap replicates of ``sum(a)/sum(w)``, resampling the m examples (pairs
    ``(a_i, w_i)`` together) with replacement; chunked so memory stays bounded."""
    m = len(a)
    out = np.empty(k)
    step = max(1, _BOOTSTRAP_CHUNK_CELLS // m)
    for start in range(0, k, step):
        idx = rng.integers(0, m, size=(min(step, k - start), m))
        out[start:start + len(idx)] = a[idx].sum(axis=1) / w[idx].sum(axis=1)
    return out


def bootstrap_replicates(records: Sequence[SeedRecords], quantity: str, *, n_boot: int,
                         rng_seed: int, examples_shared: bool,
                         family: str | None = None) -> np.ndarray:
    """``n_boot`` hierarchical-bootstrap replicates of the mean paired gap (RESEARCH.md).

    Each replicate draws ``n`` seeds with replacement, then eval examples with replacement
    within each drawn seed, and recomputes every drawn seed's gap as a ratio of sums over its
    resampled examples (paired: the same resampled examples for LoRA and QLoRA).

    ``examples_shared`` states the design. ``True`` (this project: every seed is scored on the
    same eval set, so seeds and examples are *crossed*): one draw of example indices per
    replicate, applied to every drawn seed — an example that favours one method does so in every
    seed, and independent draws per seed would average that shared effect away and understate
    eval-set noise. This is Owen's (2007) "pigeonhole" bootstrap, mildly conservative.
    ``False`` (nested: each seed has its own examples): independent example draws per drawn
    seed. With one seed both reduce to the example-level bootstrap.
    """
    _quantity(quantity)
    n_boot = _check_n_boot(n_boot)
    records = _check_records(records)
    if examples_shared:
        _check_shared(records)
    seed_rng, ex_rng = _streams(rng_seed)
    terms = [r.terms(quantity, family) for r in records]
    n = len(records)
    drawn = seed_rng.integers(0, n, size=(n_boot, n))
    if examples_shared:
        a_all = np.stack([a for a, _ in terms])            # (seeds, examples)
        w = terms[0][1]
        m = len(w)
        gaps = np.empty((n_boot, n))
        step = max(1, _BOOTSTRAP_CHUNK_CELLS // m)
        for start in range(0, n_boot, step):
            k = min(step, n_boot - start)
            idx = ex_rng.integers(0, m, size=(k, m))
            # counts[b, i]: how often example i was drawn in replicate b.
            counts = np.bincount((idx + m * np.arange(k)[:, None]).ravel(),
                                 minlength=k * m).reshape(k, m).astype(np.float64)
            per_seed = (counts @ a_all.T) / (counts @ w)[:, None]     # (k, seeds)
            gaps[start:start + k] = np.take_along_axis(per_seed, drawn[start:start + k], axis=1)
        return gaps.mean(axis=1)
    gaps = np.empty((n_boot, n))
    for s, (a, w) in enumerate(terms):
        where = drawn == s
        gaps[where] = _resampled_ratios(a, w, int(where.sum()), ex_rng)
    return gaps.mean(axis=1)


def seed_bootstrap(gaps: Sequence[float], *, n_boot: int, rng_seed: int) -> np.ndarray:
    """``n_boot`` replicates of the mean of the per-seed gaps, resampling seeds only."""
    d = np.asarray(gaps, dtype=np.float64)
    if d.ndim != 1 or len(d) == 0 or not np.isfinite(d).all():
        raise UserError(f"seed gaps must be a non-empty flat list of finite numbers, got {gaps!r}.")
    seed_rng, _ = _streams(rng_seed)
    drawn = seed_rng.integers(0, len(d), size=(_check_n_boot(n_boot), len(d)))
    return d[drawn].mean(axis=1)


def hierarchical_bootstrap(records: Sequence[SeedRecords], quantity: str, *, level: float,
                           n_boot: int, rng_seed: int, examples_shared: bool,
                           family: str | None = None) -> Interval:
    """Percentile interval and SE (sd of the replicates) of :func:`bootstrap_replicates`
    around the observed mean gap; ``over`` is ``"seeds+examples"``, or ``"examples"`` for one
    seed."""
    q = _quantity(quantity)
    level = _check_level(level)
    records = _check_records(records)
    reps = bootstrap_replicates(records, quantity, n_boot=n_boot, rng_seed=rng_seed,
                                examples_shared=examples_shared, family=family)
    est = float(seed_gaps(records, quantity, family).mean())
    low, high = np.quantile(reps, [0.5 - level / 2.0, 0.5 + level / 2.0])
    n_ex = sum(len(r.terms(quantity, family)[0]) for r in records)
    return Interval(q.name, q.unit, family, "bootstrap", est, float(reps.std(ddof=1)),
                    float(low), float(high), level,
                    OVER_BOTH if len(records) >= 2 else OVER_EXAMPLES, len(records), n_ex,
                    n_boot=len(reps))


# ---------------------------------------------------------------------------------------------
# Power and seeds needed
# ---------------------------------------------------------------------------------------------

def _check_margin(margin: float, unit: str = "") -> float:
    if isinstance(margin, bool) or not isinstance(margin, (int, float, np.floating)) \
            or not math.isfinite(margin) or margin <= 0:
        raise UserError(f"the equivalence margin must be a positive finite number"
                        f"{f' in {unit}' if unit else ''} (compare.margin in params.yaml), "
                        f"got {margin!r}.")
    return float(margin)


def rule_power(n_seeds: int, true_gap: float, sd: float, margin: float, target: str) -> float:
    """Probability that the decision rule reaches ``target`` with ``n_seeds`` paired seeds when
    ``d_s ~ Normal(true_gap, sd²)``, computed exactly (no z approximation).

    ``target="difference"``: the verdict in the direction of ``true_gap`` (QLoRA worse/better),
    i.e. P(mean > max(δ, t_{.975}·se_hat)) for a positive gap. ``target="equivalence"``:
    P(the 90 % t-interval lies inside ±δ). Both are one integral over the sample SD, whose
    chi distribution (n − 1 df) is independent of the sample mean; it is done by Simpson's rule
    on a grid of w = sqrt(chi²) that covers the density to ~1e-15.
    """
    if target not in ("difference", "equivalence"):
        raise ValueError(f"target must be 'difference' or 'equivalence', got {target!r}")
    if n_seeds < 2:
        raise ValueError("the rule needs at least 2 seeds for a seed-level interval")
    if sd < 0 or margin <= 0:
        raise ValueError(f"need sd >= 0 and margin > 0, got sd={sd}, margin={margin}")
    g = abs(true_gap)
    if sd == 0:
        return float(g > margin) if target == "difference" else float(g < margin)
    nu = n_seeds - 1
    se = sd / math.sqrt(n_seeds)
    centre = math.sqrt(nu)
    w = np.linspace(max(0.0, centre - 12.0), centre + 12.0, 2001)
    # Density of w = sqrt(chi²_nu): w^(nu-1)·exp(-w²/2)·2^(1-nu/2)/Γ(nu/2); unlike the chi²
    # density it is finite at 0 for nu = 1, so the quadrature needs no special care there.
    with np.errstate(divide="ignore"):
        log_w = (nu - 1) * np.log(w) if nu > 1 else np.zeros_like(w)
    f = np.exp(log_w - w * w / 2.0 + (1.0 - nu / 2.0) * math.log(2.0) - math.lgamma(nu / 2.0))
    se_hat = se * w / centre
    if target == "difference":
        c = t_quantile(0.5 + DIFFERENCE_LEVEL / 2.0, nu)
        p = _normal_cdf((g - np.maximum(margin, c * se_hat)) / se)
    else:
        c = t_quantile(0.5 + EQUIVALENCE_LEVEL / 2.0, nu)
        upper, lower = margin - c * se_hat, -margin + c * se_hat
        p = np.where(upper > lower,
                     _normal_cdf((upper - g) / se) - _normal_cdf((lower - g) / se), 0.0)
    h = w[1] - w[0]
    simpson = np.ones_like(w)
    simpson[1:-1:2], simpson[2:-1:2] = 4.0, 2.0
    return float(min(1.0, max(0.0, h / 3.0 * np.sum(simpson * f * p))))


def seeds_needed_z(gap: float, sd: float, margin: float, target: str,
                   power: float = TARGET_POWER) -> float:
    """RESEARCH.md's normal approximation: ((z_{1−α} + z_{1−β})·sd/(δ − |d̄|))² for
    equivalence, ((z_{1−α/2} + z_{1−β})·sd/d̄)² for a difference (α = 0.05). Reported for
    reference; it promises more power than t-based decisions deliver at a handful of seeds and
    ignores the "beyond the margin" condition, so :func:`seeds_needed` is what decisions quote."""
    z_b = normal_quantile(power)
    if target == "equivalence":
        room = margin - abs(gap)
        return math.inf if room <= 0 else ((normal_quantile(0.95) + z_b) * sd / room) ** 2
    return math.inf if gap == 0 else ((normal_quantile(0.975) + z_b) * sd / gap) ** 2


def seeds_needed(gap: float, sd: float, margin: float, target: str,
                 power: float = TARGET_POWER) -> int | None:
    """The smallest number of paired seeds n >= 2 at which :func:`rule_power` reaches
    ``power`` (0.8, RESEARCH.md) if the true gap and seed SD were ``gap`` and ``sd``.

    This refines RESEARCH.md's z formula (:func:`seeds_needed_z`) with the exact power of the
    rule actually applied — t-quantiles with n − 1 df, and for a difference also the estimate
    beyond the margin — so the promised power is delivered (tests/test_statistics.py checks it
    by simulation at n = seeds_needed). None when no n can reach it: a difference target with
    |gap| <= δ, an equivalence target with |gap| >= δ, or more than MAX_SEEDS_SEARCHED seeds.
    """
    g = abs(gap)
    if (target == "difference" and g <= margin) or (target == "equivalence" and g >= margin):
        return None

    def enough(n: int) -> bool:
        return rule_power(n, g, sd, margin, target) >= power

    if enough(2):
        return 2
    # Start from the z formula (close for all but a handful of seeds), then gallop and bisect:
    # a few power evaluations instead of a walk over every n.
    guess = int(min(MAX_SEEDS_SEARCHED, max(3, seeds_needed_z(g, sd, margin, target, power))))
    if enough(guess):
        lo, hi = 2, guess              # enough(lo) is False, enough(hi) is True
    else:
        lo, step = guess, max(1, guess // 8)
        hi = min(lo + step, MAX_SEEDS_SEARCHED)
        while not enough(hi):
            if hi >= MAX_SEEDS_SEARCHED:
                return None
            lo, step = hi, 2 * step
            hi = min(lo + step, MAX_SEEDS_SEARCHED)
    while hi - lo > 1:                 # power grows with n, so bisect on the boundary
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if enough(mid) else (mid, hi)
    return hi


# ---------------------------------------------------------------------------------------------
# Decisions
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Decision(_ToDict):
    """A verdict on one paired gap against margin δ (RESEARCH.md, "Equivalence, not 'no
    difference'").

    ``label`` is one of :data:`LABELS`. The flags are the three facts the rule looks at:
    ``nonzero`` (95 % interval excludes 0), ``beyond_margin`` (|estimate| > δ), ``within_margin``
    (90 % interval strictly inside ±δ). A gap that is nonzero but whose estimate is not beyond
    δ is never "worse"/"better": it is *equivalent* when the 90 % interval is inside ±δ, else
    *inconclusive*. ``seeds_needed`` (with ``seeds_needed_for``: "equivalence" when |estimate|
    < δ, "difference" when > δ) is set for inconclusive decisions over two or more seeds;
    ``seeds_needed_z`` is RESEARCH.md's normal-approximation number for comparison.
    """

    quantity: str
    unit: str
    family: str | None
    label: str
    margin: float
    higher_is_worse: bool
    nonzero: bool
    beyond_margin: bool
    within_margin: bool
    interval95: Interval
    interval90: Interval
    sd_seeds: float | None
    seeds_needed: int | None
    seeds_needed_for: str | None
    seeds_needed_z: float | None
    target_power: float

    @property
    def over(self) -> str:
        return self.interval95.over


def _classify(mean: np.ndarray, se: np.ndarray, df: float, margin: float,
              higher_is_worse: bool) -> tuple[np.ndarray, ...]:
    """The rule, vectorized so that the Monte Carlo calibration runs the very same code."""
    c95 = t_quantile(0.5 + DIFFERENCE_LEVEL / 2.0, df)
    c90 = t_quantile(0.5 + EQUIVALENCE_LEVEL / 2.0, df)
    nonzero = (mean - c95 * se > 0) | (mean + c95 * se < 0)
    beyond = np.abs(mean) > margin
    within = (mean - c90 * se > -margin) & (mean + c90 * se < margin)
    higher_label, lower_label = ((QLORA_WORSE, QLORA_BETTER) if higher_is_worse
                                 else (QLORA_BETTER, QLORA_WORSE))
    label = np.full(np.shape(mean), INCONCLUSIVE, dtype=object)
    label[within] = EQUIVALENT
    label[nonzero & beyond & (mean > 0)] = higher_label
    label[nonzero & beyond & (mean < 0)] = lower_label
    return label, nonzero, beyond, within


def decide_many(gaps: np.ndarray, *, quantity: str, margin: float) -> np.ndarray:
    """The labels :func:`decide` gives to many sets of seed gaps at once: ``gaps`` has shape
    (simulations, seeds) with >= 2 seeds. For calibration by simulation."""
    q = _quantity(quantity)
    margin = _check_margin(margin, q.unit)
    g = np.asarray(gaps, dtype=np.float64)
    if g.ndim != 2 or g.shape[1] < 2 or not np.isfinite(g).all():
        raise UserError(f"decide_many needs a finite array of shape (simulations, seeds >= 2), "
                        f"got shape {g.shape}.")
    n = g.shape[1]
    return _classify(g.mean(axis=1), g.std(axis=1, ddof=1) / math.sqrt(n), n - 1, margin,
                     q.higher_is_worse)[0]


def decide(records: Sequence[SeedRecords], quantity: str, *, margin: float,
           family: str | None = None) -> Decision:
    """Decide equivalent / QLoRA worse / QLoRA better / inconclusive for one paired gap, from
    the t-interval (over seeds, or over examples for one seed — then ``over == "examples"``
    and the decision omits seed noise)."""
    q = _quantity(quantity)
    margin = _check_margin(margin, q.unit)
    i95 = t_interval(records, quantity, level=DIFFERENCE_LEVEL, family=family)
    i90 = t_interval(records, quantity, level=EQUIVALENCE_LEVEL, family=family)
    label, nonzero, beyond, within = (
        v.item() if isinstance(v, np.ndarray) else v
        for v in _classify(np.array(i95.estimate), np.array(i95.se), i95.df, margin,
                           q.higher_is_worse))
    sd = None
    needed = needed_for = needed_z = None
    if i95.n_seeds >= 2:
        sd = i95.se * math.sqrt(i95.n_seeds)
        if label == INCONCLUSIVE and abs(i95.estimate) != margin:
            needed_for = "equivalence" if abs(i95.estimate) < margin else "difference"
            needed = seeds_needed(i95.estimate, sd, margin, needed_for)
            needed_z = seeds_needed_z(i95.estimate, sd, margin, needed_for)
    return Decision(q.name, q.unit, family, label, margin, q.higher_is_worse, bool(nonzero),
                    bool(beyond), bool(within), i95, i90, sd, needed, needed_for, needed_z,
                    TARGET_POWER)


@dataclasses.dataclass(frozen=True)
class GapAnalysis(_ToDict):
    """Everything verdicts.json holds for one paired gap: the decision (with its t-intervals)
    and the hierarchical-bootstrap interval that also covers eval-set sampling."""

    decision: Decision
    bootstrap95: Interval
    seed_gaps: tuple[float, ...]
    seeds: tuple[int, ...]
    sentence: str


def analyze(records: Sequence[SeedRecords], quantity: str, *, margin: float, n_boot: int,
            rng_seed: int, examples_shared: bool, family: str | None = None) -> GapAnalysis:
    """Decision, t-intervals, bootstrap interval, per-seed gaps and the report sentence."""
    records = _check_records(records)
    dec = decide(records, quantity, margin=margin, family=family)
    boot = hierarchical_bootstrap(records, quantity, level=DIFFERENCE_LEVEL, n_boot=n_boot,
                                  rng_seed=rng_seed, examples_shared=examples_shared,
                                  family=family)
    gaps = seed_gaps(records, quantity, family)
    return GapAnalysis(dec, boot, tuple(float(x) for x in gaps),
                       tuple(r.seed for r in records), describe(dec))


def analyze_by_family(records: Sequence[SeedRecords], quantity: str, *, margin: float,
                      n_boot: int, rng_seed: int,
                      examples_shared: bool) -> dict[str, GapAnalysis]:
    """:func:`analyze` per task family (families present in every seed, sorted)."""
    records = _check_records(records)
    families = sorted(set.intersection(*(set(r.family.tolist()) for r in records)))
    return {f: analyze(records, quantity, margin=margin, n_boot=n_boot, rng_seed=rng_seed,
                       examples_shared=examples_shared, family=f) for f in families}


# ---------------------------------------------------------------------------------------------
# The sentence
# ---------------------------------------------------------------------------------------------

def _fmt(x: float, decimals: int) -> str:
    s = f"{x:.{decimals}f}"
    return "0" + s[2:] if s.startswith("-0") and float(s) == 0 else s   # no "-0.000"


def describe(d: Decision) -> str:
    """One sign-aware sentence for the report that claims no more than the interval supports.

    Numbers get one decimal more than the margin's leading digit (margin 0.05 -> 3 decimals).
    """
    q = QUANTITIES[d.quantity]
    dec = max(0, 1 - math.floor(math.log10(d.margin)))
    f = functools.partial(_fmt, decimals=dec)
    i95, i90 = d.interval95, d.interval90
    m = i95.estimate
    what = q.label if d.family is None else f"{q.label} on {d.family}"
    if f(abs(m)) == f(0.0):
        head = f"QLoRA's {what} is level with LoRA's"
    else:
        head = (f"QLoRA's {what} is {'higher' if m > 0 else 'lower'} than LoRA's by "
                f"{f(abs(m))} {q.unit}")
    if i95.over == OVER_SEEDS:
        basis = f"over {i95.n_seeds} paired seeds"
    else:
        basis = f"over {i95.n_examples} eval examples of one seed, omitting seed noise"
    head += (f" (gap QLoRA − LoRA {'+' if m >= 0 else ''}{f(m)}, 95 % t-interval "
             f"[{f(i95.low)}, {f(i95.high)}] {basis})")
    band = f"[{f(i90.low)}, {f(i90.high)}]"
    if d.label in (QLORA_WORSE, QLORA_BETTER):
        near = i95.low if m > 0 else i95.high
        body = f"the estimate is beyond the margin ±{f(d.margin)}"
        if abs(near) <= d.margin:
            body += ", but the interval does not rule out a gap within it"
        return f"{head}; {body}: {d.label}."
    if d.label == EQUIVALENT:
        body = f"the 90 % interval {band} lies within ±{f(d.margin)}"
        if d.nonzero:
            body += "; the gap is not zero, but smaller than the margin"
        return f"{head}; {body}: equivalent at this margin."
    if d.nonzero:
        body = (f"the gap is not zero, but the estimate is not beyond the margin "
                f"±{f(d.margin)} and the 90 % interval {band} is not within it")
    elif d.beyond_margin:
        body = (f"the estimate is beyond the margin ±{f(d.margin)}, but the 95 % interval "
                "includes 0")
    else:
        body = (f"the 90 % interval {band} is not within ±{f(d.margin)} and the 95 % interval "
                "includes 0")
    if i95.n_seeds < 2:
        need = "a second paired seed is needed to measure seed noise"
    elif d.seeds_needed_for is None:
        need = ("the estimate sits exactly at the margin, where no number of seeds is "
                "predicted to resolve it")
    elif d.seeds_needed is None:
        need = f"more than {MAX_SEEDS_SEARCHED:,} paired seeds would be needed"
    else:
        goal = ("to show equivalence at this margin" if d.seeds_needed_for == "equivalence"
                else "to show this difference beyond the margin")
        need = (f"about {d.seeds_needed} paired seeds would be needed {goal} "
                f"({d.target_power * 100:.0f} % power if the true gap were {f(m)} and the seed SD "
                f"{f(d.sd_seeds)} {q.unit})")
    return f"{head}; {body}: inconclusive; {need}."


# ---------------------------------------------------------------------------------------------
# Correlation and trend
# ---------------------------------------------------------------------------------------------

def _avg_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tie = x == v
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


def _permuted(y: np.ndarray, *, n_perm: int, rng_seed: int) -> tuple[np.ndarray, str]:
    """Rows of permutations of ``y``: all n! when n <= EXACT_PERMUTATION_MAX_N (exact p), else
    ``n_perm`` random ones."""
    n = len(y)
    if n <= EXACT_PERMUTATION_MAX_N:
        return y[np.array(list(itertools.permutations(range(n))))], "exact"
    if isinstance(n_perm, bool) or not isinstance(n_perm, (int, np.integer)) or n_perm < 999:
        raise UserError(f"n_perm must be an integer >= 999 for a permutation p-value over "
                        f"{n} points, got {n_perm!r}.")
    rng = np.random.default_rng(rng_seed)
    return rng.permuted(np.broadcast_to(y, (int(n_perm), n)), axis=1), "permutation"


def _perm_p(observed: float, permuted: np.ndarray, method: str) -> float:
    """Two-sided p = share of permutations at least as extreme. Random permutations count the
    observed ordering too, (1 + k)/(1 + B) (Phipson & Smyth 2010), so p is never 0."""
    # A relative tolerance so that permutations equal to the observed value up to rounding count.
    k = int(np.sum(np.abs(permuted) >= abs(observed) * (1 - 1e-12) - 1e-15))
    return k / len(permuted) if method == "exact" else (1 + k) / (1 + len(permuted))


def _check_pairs(x, y, what: str, min_n: int) -> tuple[np.ndarray, np.ndarray]:
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xa.ndim != 1 or xa.shape != ya.shape:
        raise UserError(f"{what}: x and y must be flat lists of the same length, got shapes "
                        f"{xa.shape} and {ya.shape}.")
    if len(xa) < min_n:
        raise UserError(f"{what}: needs at least {min_n} points, got {len(xa)}.")
    if not (np.isfinite(xa).all() and np.isfinite(ya).all()):
        raise UserError(f"{what}: all values must be finite numbers (drop missing rows first).")
    return xa, ya


@dataclasses.dataclass(frozen=True)
class RankCorrelation(_ToDict):
    """Spearman's rho with a two-sided permutation p-value (``method`` "exact" when all n!
    orderings were enumerated). ``rho`` and ``p_value`` are nan when a column is constant."""

    rho: float
    p_value: float
    n: int
    method: str
    n_perm: int


def spearman_test(x: Sequence[float], y: Sequence[float], *, n_perm: int,
                  rng_seed: int) -> RankCorrelation:
    """Spearman's rho (Pearson correlation of average ranks, so ties are handled) and its
    two-sided permutation p-value: a correlation claim is judged by p, not by a fixed rho
    threshold (the issue behind this module). Exact for n <= 8, else ``n_perm`` permutations."""
    xa, ya = _check_pairs(x, y, "Spearman test", 3)
    rx, ry = _avg_ranks(xa), _avg_ranks(ya)
    cx, cy = rx - rx.mean(), ry - ry.mean()
    norm = math.sqrt(float(cx @ cx) * float(cy @ cy))
    if norm == 0:
        return RankCorrelation(math.nan, math.nan, len(xa), "constant", 0)
    rho = float(cx @ cy) / norm
    perms, method = _permuted(cy, n_perm=n_perm, rng_seed=rng_seed)
    p = _perm_p(rho, perms @ cx / norm, method)
    return RankCorrelation(rho, p, len(xa), method, len(perms))


@dataclasses.dataclass(frozen=True)
class Trend(_ToDict):
    """Least-squares slope of the gap per doubling of rank (gap vs log2 rank), its t-interval
    (n − 2 df), the t-test p-value, and a two-sided permutation p-value. ``replicated`` says
    whether some rank has several seeds: only then does the residual SD measure seed noise
    rather than mixing it with departures from a straight line."""

    slope: float
    se: float
    low: float
    high: float
    level: float
    df: int
    p_value_t: float
    p_value_perm: float
    perm_method: str
    n_points: int
    n_ranks: int
    replicated: bool


def trend_test(ranks: Sequence[float], gaps: Sequence[float], *, level: float, n_perm: int,
               rng_seed: int) -> Trend:
    """Does the paired gap change with LoRA rank (H3)? One point per (rank, seed).

    Slope of ``gap`` on ``log2(rank)`` (a doubling of the rank is one step) with a t-interval on
    n − 2 df, and a permutation test that shuffles the gaps over the points — exact when there
    are at most 8 points — which needs no normality or straight-line assumption.
    """
    level = _check_level(level)
    r, d = _check_pairs(ranks, gaps, "trend test", 3)
    if (r <= 0).any():
        raise UserError(f"trend test: ranks must be positive, got {sorted(set(r.tolist()))}.")
    x = np.log2(r)
    if len(np.unique(x)) < 2:
        raise UserError("trend test: needs at least 2 distinct ranks.")
    cx = x - x.mean()
    sxx = float(cx @ cx)
    slope = float(cx @ d) / sxx
    resid = d - d.mean() - slope * cx
    df = len(d) - 2
    se = math.sqrt(float(resid @ resid) / df / sxx)
    half = t_quantile(0.5 + level / 2.0, df) * se
    if se > 0:
        p_t = 2.0 * t_sf(abs(slope) / se, df)
    else:
        p_t = 0.0 if slope != 0 else 1.0
    perms, method = _permuted(d - d.mean(), n_perm=n_perm, rng_seed=rng_seed)
    p_perm = _perm_p(slope, perms @ cx / sxx, method)
    _, counts = np.unique(x, return_counts=True)
    return Trend(slope, se, slope - half, slope + half, level, df, p_t, p_perm, method,
                 len(d), len(counts), bool((counts > 1).any()))
