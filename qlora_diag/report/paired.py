"""The one estimator of every verdict: paired gaps QLoRA − LoRA from per-example eval records.

For each seed s the LoRA and QLoRA runs share the adapter init and the batches; the unit of
evidence is d_s = QLoRA_s − LoRA_s (RESEARCH.md, "How a verdict must be decided"). This module
turns the runs' ``examples.jsonl`` into :class:`~qlora_diag.report.statistics.SeedRecords` and
runs :func:`~qlora_diag.report.statistics.analyze` on every comparison the verdicts look at:

* the headline (rank ``lora.r``, ``lora.targets``, every seed) for eval loss and exact match,
  overall and per task family;
* the gap per rank (H3) and per target preset (H2): one seed where the sweep trains one, so the
  interval is over eval examples only and omits seed noise (the decision says so: ``over``);
* preset contrasts (H2): the gap of a preset minus the gap of ``lora.targets``, paired per eval
  example of the same seed;
* the trend of the gap over log2(rank) (H3), one point per (rank, seed).

No single-seed gap is read from a table and no max − min spread is used anywhere.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from qlora_diag.core.errors import UserError
from qlora_diag.core.run_names import run_name
from qlora_diag.report import statistics as st

# Permutations of the trend test when there are more than 8 (rank, seed) points (exact below).
N_PERM = 9999


def paired_seed_records(lora_rows: Sequence[dict], qlora_rows: Sequence[dict], seed: int,
                        quantity: str = "eval_loss") -> st.SeedRecords | None:
    """One seed's paired records from the two runs' ``examples.jsonl`` rows (same examples in
    the same order, checked by id and token count).

    ``quantity="eval_loss"``: every eval example. ``"exact_match"``: only the examples both
    runs generated (``exact_match`` not null); None when there is none. For eval loss the
    exact-match arrays of examples that were not generated hold 0: they are never read for
    that quantity (:meth:`SeedRecords.terms` reads nll and tokens only).

    The single place that reads per-example rows (issue 11: i11a's reader replaces it).
    """
    if len(lora_rows) != len(qlora_rows):
        raise UserError(f"seed {seed}: the LoRA run has {len(lora_rows)} eval examples and the "
                        f"QLoRA run {len(qlora_rows)}; a paired comparison needs the same eval "
                        "examples in both examples.jsonl files (rerun the runs' training stages)")
    for i, (a, b) in enumerate(zip(lora_rows, qlora_rows)):
        if a["id"] != b["id"] or a["n_tokens"] != b["n_tokens"]:
            raise UserError(f"seed {seed}: eval example {i} differs between the LoRA and QLoRA "
                            f"examples.jsonl (id {a['id']!r} vs {b['id']!r}, tokens "
                            f"{a['n_tokens']} vs {b['n_tokens']}); both must list the same "
                            "examples in eval order")
    rows = list(zip(lora_rows, qlora_rows))
    if quantity == "exact_match":
        rows = [(a, b) for a, b in rows
                if a["exact_match"] is not None and b["exact_match"] is not None]
        if not rows:
            return None
    return st.SeedRecords(
        seed=seed,
        nll_lora=[a["nll_sum"] for a, _ in rows], nll_qlora=[b["nll_sum"] for _, b in rows],
        n_tokens=[a["n_tokens"] for a, _ in rows],
        em_lora=[a["exact_match"] or 0 for a, _ in rows],
        em_qlora=[b["exact_match"] or 0 for _, b in rows],
        family=[a["family"] for a, _ in rows])


def guard_zero_width(a: st.GapAnalysis) -> st.GapAnalysis:
    """A t-interval of zero width (every paired value identical: e.g. exact match on a handful
    of examples where both methods answer alike in every seed) measures no noise, so no
    decision rests on it: the label becomes *inconclusive* and the sentence says why."""
    d = a.decision
    if d.interval95.se > 0 or d.label == st.INCONCLUSIVE:
        return a
    q = st.QUANTITIES[d.quantity]
    what = q.label if d.family is None else f"{q.label} on {d.family}"
    basis = (f"{d.interval95.n_seeds} paired seeds" if d.over == st.OVER_SEEDS
             else f"{d.interval95.n_examples} eval examples of one seed")
    sentence = (f"QLoRA − LoRA {what}: {d.interval95.estimate:+g} {q.unit} in every one of "
                f"{basis}; with no variation the interval has zero width and measures no "
                "noise: inconclusive; more examples or seeds are needed.")
    dec = dataclasses.replace(d, label=st.INCONCLUSIVE, seeds_needed=None,
                              seeds_needed_for=None, seeds_needed_z=None)
    return dataclasses.replace(a, decision=dec, sentence=sentence)


def contrast_records(first: st.SeedRecords, second: st.SeedRecords) -> st.SeedRecords:
    """Records whose eval-loss gap is ``gap(first) − gap(second)`` per example of one seed:
    QLoRA side ``nll_qlora(first) + nll_lora(second)``, LoRA side ``nll_lora(first) +
    nll_qlora(second)`` (sums of nlls stay >= 0, so the statistics' checks hold). Eval loss
    only: the exact-match arrays are zeros and never read."""
    if first.seed != second.seed or first.n_examples != second.n_examples \
            or (first.n_tokens != second.n_tokens).any():
        raise UserError(f"a preset contrast needs the same seed and eval examples on both sides "
                        f"(seeds {first.seed}, {second.seed}; {first.n_examples} vs "
                        f"{second.n_examples} examples)")
    zeros = np.zeros(first.n_examples)
    return st.SeedRecords(first.seed, first.nll_lora + second.nll_qlora,
                          first.nll_qlora + second.nll_lora, first.n_tokens, zeros, zeros,
                          first.family)


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One analysed paired gap: a name for the report (``r=8``, ``kv``, ``kv − qv``), what it
    compares, and :class:`~qlora_diag.report.statistics.GapAnalysis`."""

    name: str
    what: str
    analysis: st.GapAnalysis

    @property
    def decision(self) -> st.Decision:
        return self.analysis.decision

    @property
    def label(self) -> str:
        return self.analysis.decision.label

    @property
    def estimate(self) -> float:
        return self.analysis.decision.interval95.estimate

    def fields(self) -> dict:
        """The verdicts.json fields of this comparison (SPEC.md, Outputs)."""
        d = self.analysis.decision
        i95, i90, boot = d.interval95, d.interval90, self.analysis.bootstrap95

        def iv(i: st.Interval) -> dict:
            return {"low": i.low, "high": i.high, "level": i.level, "over": i.over,
                    "method": i.method}

        return st._jsonable({
            "comparison": f"{self.name}: {self.what}", "quantity": d.quantity, "unit": d.unit,
            "estimate": i95.estimate, "interval": iv(i95), "interval_90": iv(i90),
            "bootstrap": iv(boot), "margin": d.margin, "n_seeds": i95.n_seeds,
            "decision": d.label, "seeds_needed": d.seeds_needed,
            "seeds_needed_for": d.seeds_needed_for, "sentence": self.analysis.sentence})


def no_comparison_fields(what: str) -> dict:
    """The verdicts.json fields when a hypothesis has no paired comparison to decide on."""
    return {"comparison": what, "quantity": None, "unit": None, "estimate": None,
            "interval": None, "interval_90": None, "bootstrap": None, "margin": None,
            "n_seeds": 0, "decision": st.INCONCLUSIVE, "seeds_needed": None,
            "seeds_needed_for": None, "sentence": what}


@dataclasses.dataclass(frozen=True)
class PairedEvidence:
    """Every paired comparison the verdicts, the report and the figures use."""

    margin: float
    margin_exact_match: float
    headline_loss: Comparison
    headline_em: Comparison | None
    families_em: dict[str, Comparison]
    per_rank: dict[int, Comparison]
    per_preset: dict[str, Comparison]
    contrasts: dict[str, Comparison]
    trend: st.Trend | None
    seed_table: pd.DataFrame
    lora_targets: str
    lora_r: int


def _seed_row(seed: int, loss: st.SeedRecords, em: st.SeedRecords | None) -> dict:
    tokens = loss.n_tokens.sum()
    row = {"seed": seed, "eval_loss_lora": loss.nll_lora.sum() / tokens,
           "eval_loss_qlora": loss.nll_qlora.sum() / tokens,
           "eval_loss_gap": (loss.nll_qlora.sum() - loss.nll_lora.sum()) / tokens,
           "n_examples": loss.n_examples, "n_generated": 0 if em is None else em.n_examples,
           "exact_match_lora": math.nan, "exact_match_qlora": math.nan,
           "exact_match_gap": math.nan}
    if em is not None:
        row |= {"exact_match_lora": 100 * em.em_lora.mean(),
                "exact_match_qlora": 100 * em.em_qlora.mean(),
                "exact_match_gap": 100 * (em.em_qlora.mean() - em.em_lora.mean())}
    return row


def build_paired_evidence(examples: Mapping[str, Sequence[dict]], *, seed: int,
                          sweep_seeds: Sequence[int], lora_r: int, lora_targets: str,
                          ranks: Sequence[int], presets: Sequence[str], margin: float,
                          margin_exact_match: float, n_boot: int) -> PairedEvidence:
    """All comparisons from ``examples`` (run name -> its examples.jsonl rows). Seeds: the
    headline pair (``lora.r``, ``lora.targets``) at ``[seed, *sweep_seeds]``; the other ranks
    and presets at ``seed`` only, as dvc.yaml trains them. The bootstrap's random stream is
    seeded with ``seed`` so a rerun gives the same intervals."""
    seeds = [seed, *sweep_seeds]

    def records(rank: int, targets: str, s: int, quantity: str) -> st.SeedRecords | None:
        names = [run_name(m, rank, targets, s) for m in ("lora", "qlora")]
        for n in names:
            if n not in examples:
                raise UserError(f"reports/train/{n}/examples.jsonl: not loaded; the paired "
                                "comparison needs every run's per-example records")
        return paired_seed_records(examples[names[0]], examples[names[1]], s, quantity)

    def analyze(recs: list[st.SeedRecords], quantity: str) -> st.GapAnalysis:
        m = margin if quantity == "eval_loss" else margin_exact_match
        return guard_zero_width(st.analyze(recs, quantity, margin=m, n_boot=n_boot,
                                           rng_seed=seed, examples_shared=True))

    loss_recs = [records(lora_r, lora_targets, s, "eval_loss") for s in seeds]
    em_recs = [records(lora_r, lora_targets, s, "exact_match") for s in seeds]
    what_seeds = (f"QLoRA − LoRA at r={lora_r} on {lora_targets}, "
                  f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}")
    headline_loss = Comparison("headline", what_seeds, analyze(loss_recs, "eval_loss"))
    headline_em = families_em = None
    if all(r is not None for r in em_recs):
        headline_em = Comparison("headline", what_seeds, analyze(em_recs, "exact_match"))
        common = set.intersection(*(set(r.family.tolist()) for r in em_recs))
        families_em = {}
        for f in sorted(common):
            # one seed: an interval over examples needs at least two of the family
            if len(em_recs) == 1 and len(em_recs[0].terms("exact_match", f)[0]) < 2:
                continue
            a = st.analyze(em_recs, "exact_match", margin=margin_exact_match, n_boot=n_boot,
                           rng_seed=seed, examples_shared=True, family=f)
            families_em[f] = Comparison(f, f"{what_seeds}, task family {f}",
                                        guard_zero_width(a))
    seed_table = pd.DataFrame([_seed_row(s, lo, em) for s, lo, em in
                               zip(seeds, loss_recs, em_recs)])

    per_rank, trend_x, trend_y = {}, [], []
    for r in sorted(ranks):
        recs = loss_recs if r == lora_r else [records(r, lora_targets, seed, "eval_loss")]
        per_rank[r] = Comparison(f"r={r}", f"QLoRA − LoRA at r={r} on {lora_targets}",
                                 analyze(recs, "eval_loss"))
        trend_x += [r] * len(recs)
        trend_y += list(per_rank[r].analysis.seed_gaps)
    trend = None
    if len(trend_y) >= 3 and len(set(trend_x)) >= 2:
        trend = st.trend_test(trend_x, trend_y, level=st.DIFFERENCE_LEVEL, n_perm=N_PERM,
                              rng_seed=seed)

    # H2 at the main seed: the lora.targets preset uses all its seeds for its own gap, but its
    # contrasts pair it with the other presets' single seed.
    base_main = records(lora_r, lora_targets, seed, "eval_loss")
    per_preset = {lora_targets: per_rank.get(lora_r) or Comparison(
        lora_targets, f"QLoRA − LoRA at r={lora_r} on {lora_targets}",
        analyze(loss_recs, "eval_loss"))}
    contrasts = {}
    for t in presets:
        if t == lora_targets:
            continue
        rec = records(lora_r, t, seed, "eval_loss")
        per_preset[t] = Comparison(t, f"QLoRA − LoRA at r={lora_r} on {t}, seed {seed}",
                                   analyze([rec], "eval_loss"))
        contrasts[t] = Comparison(
            f"{t} − {lora_targets}",
            f"gap on {t} minus gap on {lora_targets}, paired per eval example of seed {seed}",
            analyze([contrast_records(rec, base_main)], "eval_loss"))
    return PairedEvidence(margin, margin_exact_match, headline_loss, headline_em,
                          families_em or {}, per_rank, per_preset, contrasts, trend, seed_table,
                          lora_targets, lora_r)


def gap_table(comparisons: Mapping, key: str) -> pd.DataFrame:
    """``key`` (rank / targets), estimate and 95 % interval of each comparison (for figures)."""
    return pd.DataFrame([{key: k, "estimate": c.estimate, "low": c.decision.interval95.low,
                          "high": c.decision.interval95.high, "over": c.decision.over}
                         for k, c in comparisons.items()],
                        columns=[key, "estimate", "low", "high", "over"])


def over_words(c: Comparison) -> str:
    """What noise the comparison's interval covers, in words for the report."""
    i = c.decision.interval95
    if i.over == st.OVER_SEEDS:
        return f"t-interval over {i.n_seeds} paired seeds"
    return f"interval over the {i.n_examples} eval examples of one seed, omitting seed noise"
