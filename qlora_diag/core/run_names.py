"""Run names: ``<method>-r<rank>-<targets>-s<seed>``, e.g. ``qlora-r8-qv-s42``; a run whose data
order comes from another seed than its adapter init (the same-init control) carries it as
``-d<data seed>``, e.g. ``qlora-r8-qv-s42-d1``.

A run's adapter and report directories are named by :func:`run_name` (``dvc.yaml``'s ``outs``
spell the same pattern); :func:`parse_run_name` is its inverse, for code that starts from a
directory name (the loss-curve figure). ``targets`` never contains ``-`` (it is a preset or
module names of ``[A-Za-z0-9_.]`` joined by commas, see ``lora.targets`` in
:mod:`qlora_diag.core.config.checks`), so the name splits unambiguously.
"""
from __future__ import annotations

import re
from typing import NamedTuple

from qlora_diag.core.errors import UserError

# Ranks and seeds without leading zeros, so that parse -> run_name gives back the same name.
_RUN_NAME = re.compile(r"(?P<method>[^-]+)-r(?P<rank>0|[1-9][0-9]*)-(?P<targets>[^-]+)"
                       r"-s(?P<seed>0|[1-9][0-9]*)(?:-d(?P<data_seed>0|[1-9][0-9]*))?")


class RunParts(NamedTuple):
    """The arguments of :func:`run_name`, in its order."""

    method: str
    rank: int
    targets: str
    seed: int
    data_seed: int | None = None  # None: the data order comes from ``seed`` too


def run_name(method: str, rank: int, targets: str, seed: int, data_seed: int | None = None) -> str:
    """Stable name of one training run, e.g. ``qlora-r8-qv-s42`` (must match dvc.yaml's outs).
    ``seed`` draws the adapter init; ``data_seed`` (default: ``seed``) the data order and
    dropout. Only a ``data_seed`` other than ``seed`` appears in the name (``-d<data_seed>``)."""
    suffix = "" if data_seed is None or data_seed == seed else f"-d{data_seed}"
    return f"{method}-r{rank}-{targets}-s{seed}{suffix}"


def parse_run_name(name: str) -> RunParts:
    """``qlora-r8-q_proj,v_proj-s42`` -> ``RunParts("qlora", 8, "q_proj,v_proj", 42)``,
    ``qlora-r8-qv-s42-d1`` -> ``RunParts("qlora", 8, "qv", 42, 1)``; the inverse of
    :func:`run_name`. Raises :class:`UserError` for a name of another form (also for a data
    seed equal to the seed, which :func:`run_name` never writes)."""
    m = _RUN_NAME.fullmatch(name)
    if m is None:
        raise UserError(f"{name!r} is not a run name; run names are "
                        "<method>-r<rank>-<targets>-s<seed>[-d<data seed>], e.g. qlora-r8-qv-s42")
    data_seed = None if m["data_seed"] is None else int(m["data_seed"])
    if data_seed is not None and data_seed == int(m["seed"]):
        raise UserError(f"{name!r}: a data seed equal to the seed is not written in a run name; "
                        f"the run is {run_name(m['method'], int(m['rank']), m['targets'], data_seed)}")
    return RunParts(m["method"], int(m["rank"]), m["targets"], int(m["seed"]), data_seed)
