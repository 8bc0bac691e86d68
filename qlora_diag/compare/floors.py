"""Noise floors at both levels (issue 11 item 4): how alike two runs are when quantization is
not what differs, beside the LoRA-vs-QLoRA numbers it is the yardstick for.

All runs are at rank ``lora.r`` on ``lora.targets``. Kinds (:data:`~qlora_diag.core.schemas.FLOOR_KINDS`):

- ``lora-lora`` / ``qlora-qlora``: two seeds of one method (init and data order both differ):
  the same-method floor;
- ``lora-qlora-cross``: LoRA of seed s vs QLoRA of seed t != s: the method differs *and* the
  seed; the number to read against the same-method floor (both differ in seed);
- ``lora-qlora-same``: LoRA vs QLoRA with the same init and data order (quantization alone);
  shared init inflates its similarity by construction;
- ``lora-qlora-control``: LoRA vs QLoRA with the same init and another data order (the
  ``control_*`` runs: init of ``seed``, data order and dropout of the first of ``sweep.seeds``),
  both ways round; ``lora-lora-control`` / ``qlora-qlora-control``: one method, same init,
  other data. Against ``same`` and ``cross`` these say how much of the same-seed similarity
  the shared init explains.

Weight level (``floors.csv``): every pair of seeds (a distribution, not one number), cos(ΔW),
the subspace similarity phi with its left (column space) and right (row space) halves kept
apart, and the relative Frobenius distance. Function level (``function_floors.csv``): KL,
hidden-state cosine (one forward pass of both runs over the eval split) and token match /
exact-output agreement (the runs' own greedy generations from training). The function level
costs a forward pass of two models per pair, so it takes consecutive seeds only
(``seed``, then ``sweep.seeds`` in order: s1-s2, s2-s3, ...), every seed's same-seed pair and one
control pair.
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from qlora_diag.compare.adapters import compare_adapters, load_adapter_factors
from qlora_diag.compare.function import (
    attached,
    exact_output_agreement,
    pair_forward_stats,
    token_match_rate,
)
from qlora_diag.compare.runs import control_pair, noise_seeds
from qlora_diag.core.config import Params
from qlora_diag.core.schemas import (
    FLOOR_CONTROL,
    FLOOR_CROSS,
    FLOOR_LORA,
    FLOOR_LORA_CONTROL,
    FLOOR_QLORA,
    FLOOR_QLORA_CONTROL,
    FLOOR_SAME,
    FLOORS_COLUMNS,
    FUNCTION_FLOORS_COLUMNS,
)
from qlora_diag.train.trainer import RunSpec


@dataclasses.dataclass(frozen=True)
class FloorPair:
    """Two runs compared for a floor; ``b`` is the reference of ``rel_frob`` and the second
    distribution of the KL (KL(P_a ‖ P_b)). In LoRA-vs-QLoRA kinds ``a`` is the LoRA run."""

    kind: str
    a: RunSpec
    b: RunSpec


def _runs(p: Params):
    def lora(s: int) -> RunSpec:
        return RunSpec("lora", p.lora.r, p.lora.targets, s)

    def qlora(s: int) -> RunSpec:
        return RunSpec("qlora", p.lora.r, p.lora.targets, s)

    return lora, qlora, noise_seeds(p), control_pair(p)


def weight_floor_pairs(p: Params) -> list[FloorPair]:
    """Every pair the weight-level floors compare: all pairs of seeds of each method, all
    ordered cross-seed LoRA/QLoRA pairs, every same-seed pair (the control's too) and the
    control pairs."""
    lora, qlora, seeds, ctl = _runs(p)
    out = []
    for s, t in itertools.combinations(seeds, 2):
        out += [FloorPair(FLOOR_LORA, lora(s), lora(t)), FloorPair(FLOOR_QLORA, qlora(s), qlora(t))]
    out += [FloorPair(FLOOR_CROSS, lora(s), qlora(t)) for s, t in itertools.permutations(seeds, 2)]
    out += [FloorPair(FLOOR_SAME, lora(s), qlora(s)) for s in seeds]
    out += [FloorPair(FLOOR_SAME, ctl.lora, ctl.qlora),
            FloorPair(FLOOR_CONTROL, lora(p.seed), ctl.qlora),
            FloorPair(FLOOR_CONTROL, ctl.lora, qlora(p.seed)),
            FloorPair(FLOOR_LORA_CONTROL, lora(p.seed), ctl.lora),
            FloorPair(FLOOR_QLORA_CONTROL, qlora(p.seed), ctl.qlora)]
    return out


def function_floor_pairs(p: Params) -> list[FloorPair]:
    """The pairs of the function-level floors (bounded cost): consecutive seeds of each method
    and across methods, every seed's same-seed pair, and one control pair (LoRA of ``seed`` vs
    the QLoRA control)."""
    lora, qlora, seeds, ctl = _runs(p)
    out = []
    for s, t in zip(seeds, seeds[1:]):
        out += [FloorPair(FLOOR_LORA, lora(s), lora(t)), FloorPair(FLOOR_QLORA, qlora(s), qlora(t)),
                FloorPair(FLOOR_CROSS, lora(s), qlora(t))]
    out += [FloorPair(FLOOR_SAME, lora(s), qlora(s)) for s in seeds]
    out.append(FloorPair(FLOOR_CONTROL, lora(p.seed), ctl.qlora))
    return out


def _ids(fp: FloorPair) -> dict:
    return {"kind": fp.kind, "run_a": fp.a.name, "run_b": fp.b.name, "seed_a": fp.a.seed,
            "seed_b": fp.b.seed, "data_seed_a": fp.a.data_seed, "data_seed_b": fp.b.data_seed}


def weight_floors(pairs: list[FloorPair], adapter_dirs: dict[str, Path], k: int) -> pd.DataFrame:
    """``floors.csv``: one row per pair, the means over adapted modules of
    :func:`~qlora_diag.compare.adapters.compare_adapters` (``a`` against reference ``b``, top-``k``
    singular directions for phi). ``adapter_dirs``: ``{run name: adapter directory}``."""
    factors = {}
    rows = []
    for fp in pairs:
        for spec in (fp.a, fp.b):
            if spec.name not in factors:
                factors[spec.name] = load_adapter_factors(adapter_dirs[spec.name])
        t = compare_adapters(factors[fp.a.name], factors[fp.b.name], k=k)

        def mean(col: str, t=t) -> float:
            return float(t[col].astype("float64").mean(skipna=False))

        rows.append({**_ids(fp), "rank": fp.a.rank, "targets": fp.a.targets,
                     "cos_sim_mean": mean("cos_sim"), "subspace_sim_mean": mean("subspace_sim"),
                     "subspace_sim_left_mean": mean("subspace_sim_left"),
                     "subspace_sim_right_mean": mean("subspace_sim_right"),
                     "rel_frob_mean": mean("rel_frob"), "n_modules": len(t)})
    return pd.DataFrame(rows, columns=list(FLOORS_COLUMNS))


def function_floors(pairs: list[FloorPair], bases: dict[str, object],
                    load_copy: Callable[[str], object], adapter_dirs: dict[str, Path],
                    generations: dict[str, list[dict]], eval_records: list[dict],
                    batch_size: int, pad_id: int) -> pd.DataFrame:
    """``function_floors.csv``: per pair one forward pass of both runs over ``eval_records``
    (each adapter attached to its method's base in ``bases``: ``{"lora": 16-bit, "qlora":
    4-bit}``) and their saved ``generations`` (``{run name: generations.jsonl rows}``) compared.

    Two runs of one method need two copies of its base (an adapter is injected into the model
    it is attached to): ``load_copy(method)`` loads the second, once per method, only when a
    same-method pair is asked for."""
    copies: dict[str, object] = {}
    rows = []
    for fp in pairs:
        base_a = bases[fp.a.method]
        if fp.a.method == fp.b.method:
            if fp.b.method not in copies:
                copies[fp.b.method] = load_copy(fp.b.method)
            base_b = copies[fp.b.method]
        else:
            base_b = bases[fp.b.method]
        with attached(base_a, adapter_dirs[fp.a.name]) as m_a, \
                attached(base_b, adapter_dirs[fp.b.name]) as m_b:
            fwd = pair_forward_stats(m_a, m_b, eval_records, batch_size, pad_id,
                                     desc=f"floor {fp.a.name} vs {fp.b.name}")
        out_a = [r["output_ids"] for r in generations[fp.a.name]]
        out_b = [r["output_ids"] for r in generations[fp.b.name]]
        rows.append({**_ids(fp), "eval_loss_a": fwd["loss_a"], "eval_loss_b": fwd["loss_b"],
                     "kl_mean": fwd["kl_mean"], "hidden_cos_sim": fwd["hidden_cos_sim"],
                     "token_match_rate": token_match_rate(out_a, out_b),
                     "exact_output_agreement": exact_output_agreement(out_a, out_b),
                     "eval_tokens": fwd["n_tokens"], "n_generations": len(out_a)})
    return pd.DataFrame(rows, columns=list(FUNCTION_FLOORS_COLUMNS))
