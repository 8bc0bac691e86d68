"""Paired per-example records of one seed, from the two runs' ``examples.jsonl``
(:mod:`qlora_diag.core.examples`), as :class:`~qlora_diag.report.statistics.SeedRecords`.

Exact match exists only for the generated examples (the first ``compare.n_generate``; the rest
have ``exact_match: null``), while :class:`SeedRecords` needs a 0/1 for every example it holds.
So the records come in two sets (:class:`PairedSeedRecords`):

* ``loss``: every eval example, for the eval-loss gap. Its ``em_*`` fields are the real exact
  matches when every example was generated (the default, ``compare.n_generate`` = ``data.n_eval``);
  otherwise they hold 0 for both methods and carry no information: analyse exact match on
  ``exact_match`` only (``loss_has_exact_match`` says which case applies);
* ``exact_match``: the examples both runs generated (the same first ones for both), for the
  exact-match gap; ``None`` when no example was generated.
"""
from __future__ import annotations

from typing import NamedTuple

from qlora_diag.core.errors import UserError
from qlora_diag.report.statistics import SeedRecords


class PairedSeedRecords(NamedTuple):
    loss: SeedRecords                 # every eval example (eval loss)
    exact_match: SeedRecords | None   # the generated examples (exact match), None if none
    loss_has_exact_match: bool        # True when loss.em_* are real (every example generated)


def _records(seed: int, lora: list[dict], qlora: list[dict], with_em: bool) -> SeedRecords:
    return SeedRecords(
        seed=seed, nll_lora=[r["nll_sum"] for r in lora], nll_qlora=[r["nll_sum"] for r in qlora],
        n_tokens=[r["n_tokens"] for r in lora],
        em_lora=[r["exact_match"] if with_em else 0 for r in lora],
        em_qlora=[r["exact_match"] if with_em else 0 for r in qlora],
        family=[r["family"] for r in lora])


def paired_seed_records(lora_rows: list[dict], qlora_rows: list[dict], seed: int,
                        what: str = "the LoRA and QLoRA runs") -> PairedSeedRecords:
    """The paired records of ``seed`` from the LoRA run's and the QLoRA run's
    :func:`~qlora_diag.core.examples.read_examples` rows. Both must list the same examples in
    the same order with the same token counts and families, and have generated the same
    examples; otherwise a :class:`UserError` (naming ``what``) says where they differ."""
    if len(lora_rows) != len(qlora_rows):
        raise UserError(f"{what} of seed {seed}: {len(lora_rows)} vs {len(qlora_rows)} eval "
                        "examples; both runs must be evaluated on the same prepared eval split "
                        "(rerun the stale one with `dvc repro`)")
    for i, (a, b) in enumerate(zip(lora_rows, qlora_rows)):
        for key in ("id", "n_tokens", "family"):
            if a[key] != b[key]:
                raise UserError(f"{what} of seed {seed}: eval example {i} has {key} {a[key]!r} "
                                f"vs {b[key]!r}; both runs must be evaluated on the same "
                                "prepared eval split (rerun the stale one with `dvc repro`)")
        if (a["exact_match"] is None) != (b["exact_match"] is None):
            raise UserError(f"{what} of seed {seed}: eval example {i} ({a['id']}) was generated "
                            "by one run and not the other; both must be trained with the same "
                            "compare.n_generate (rerun the stale one with `dvc repro`)")
    generated = [i for i, r in enumerate(lora_rows) if r["exact_match"] is not None]
    everything = len(generated) == len(lora_rows)
    em = None
    if generated:
        em = _records(seed, [lora_rows[i] for i in generated], [qlora_rows[i] for i in generated],
                      with_em=True)
    return PairedSeedRecords(_records(seed, lora_rows, qlora_rows, with_em=everything), em,
                             everything)
