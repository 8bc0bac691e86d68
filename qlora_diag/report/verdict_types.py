"""What a verdict is: the status of a hypothesis with its rule and the numbers behind it, and an
observed failure mode with its symptom, cause and mitigation (:mod:`qlora_diag.report.verdicts`
collects them into a :class:`~qlora_diag.report.verdicts.Diagnosis`)."""
from __future__ import annotations

import dataclasses

# The status of a verdict (the verdicts of H1-H3 say which numbers decide it).
SUPPORTED = "supported"
PARTIAL = "partially supported"
REJECTED = "rejected"
NOT_FOUND = "not found in the tested ranks"
# The paired comparisons cannot decide (e.g. intervals too wide at this number of seeds).
INCONCLUSIVE = "inconclusive"


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The verdict on one hypothesis: ``status`` (one of :data:`SUPPORTED`, :data:`PARTIAL`,
    :data:`REJECTED`, :data:`NOT_FOUND`, :data:`INCONCLUSIVE`), the rule in words, the numbers
    behind it, and ``primary``: the verdicts.json fields of the paired comparison it rests on
    (:meth:`qlora_diag.report.paired.Comparison.fields`: estimate, intervals, margin, n_seeds,
    decision, seeds needed)."""

    hypothesis: str
    status: str
    rule: str
    evidence: dict
    summary: str
    primary: dict


@dataclasses.dataclass(frozen=True)
class FailureMode:
    """An observed failure: what a user sees, why (with the numbers), what to do."""

    key: str
    title: str
    symptom: str
    cause: str
    mitigation: str
    rule: str
    evidence: dict
