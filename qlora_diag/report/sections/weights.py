"""Weight-level comparison: the same-seed LoRA/QLoRA cosine of ΔW against the seed noise floor,
per layer, and whether the QLoRA update leans towards undoing the quantization error."""
from __future__ import annotations

import math

import pandas as pd

from qlora_diag.core import numbers as fmt
from qlora_diag.core.schemas import CROSS_SEED, NOISE_LORA, NOISE_QLORA, SAME_SEED
from qlora_diag.report.evidence import ALIGNED_FRACTION, undoes_quantization_error
from qlora_diag.report.floors import UNAVAILABLE, floor_sentence, floor_test, floor_tests
from qlora_diag.report.inputs import ReportInputs
from qlora_diag.report.tables import md_table

# The kinds of adapter pairs of pairs.csv, in words, in the order the noise-floor table lists them.
PAIR_KIND_LABELS = {
    SAME_SEED: "LoRA vs QLoRA, same seed (quantization alone)",
    NOISE_LORA: "LoRA vs LoRA, other seed (noise floor)",
    NOISE_QLORA: "QLoRA vs QLoRA, other seed (noise floor)",
    CROSS_SEED: "LoRA vs QLoRA, other seed",
}


def section_noise(inp: ReportInputs) -> str:
    m = inp.metrics
    g = inp.pairs.groupby("kind", sort=False)
    rows = []
    for kind, label in PAIR_KIND_LABELS.items():
        if kind not in g.groups:
            continue
        d = g.get_group(kind)
        rows.append([label, len(d), fmt.sim(d["cos_sim_mean"].mean()),
                     fmt.sim(d["subspace_sim_mean"].mean()), fmt.pct(d["rel_frob_mean"].mean())])
    seed_rows = [[label, inp.runs[n]["seed"], fmt.loss(inp.runs[n]["eval_loss"]),
                  fmt.pct(inp.runs[n]["exact_match"])]
                 for method, label in (("lora", "LoRA"), ("qlora", "QLoRA"))
                 for n in inp.seed_runs[method]]
    floor = floor_test(inp.floors, "cos_sim_mean", rng_seed=inp.paired_seed)
    return (md_table(["pair", "pairs", "cos(ΔW)", "subspace φ", "relative difference"], rows)
            + "\n\nMeans over modules, then over pairs (pairs.csv). Same-seed LoRA vs QLoRA "
              f"({fmt.sim(m['cos_sim_mean'])}) shares the adapter init and the batch order, "
              "which inflates its similarity, so H1 compares the cross-seed pairs with the "
              f"same-method floor (floors.csv): {floor_sentence(floor)}."
            + _floor_table(inp) + "\n\nThe runs behind the floor:\n\n"
            + md_table(["method", "seed", "eval loss", "exact match"], seed_rows))


def _floor_table(inp: ReportInputs) -> str:
    """Every measure of floors.csv: cross-seed LoRA vs QLoRA against the same-method floor."""
    tests = floor_tests(inp.floors, rng_seed=inp.paired_seed)
    if not tests:
        return ""
    rows = [[f"`{c}`", f"{fmt.fixed(t.cross_mean, 3)} (n = {t.n_cross})",
             f"{fmt.fixed(t.floor_mean, 3)} ({fmt.fixed(t.floor_min, 3)}–"
             f"{fmt.fixed(t.floor_max, 3)}, n = {t.n_floor})",
             fmt.fixed(t.same_seed_mean, 3), fmt.fixed(t.control_mean, 3),
             fmt.fixed(t.p_value, 3), t.outcome if t.outcome != UNAVAILABLE else t.reason]
            for c, t in tests.items()]
    return ("\n\nEvery measure of floors.csv, cross-seed LoRA vs QLoRA against the same-method "
            "floor (two-sided permutation test of the means; pairs that share a run are not "
            "independent, so p is approximate):\n\n"
            + md_table(["measure", "LoRA vs QLoRA, other seed", "same-method floor (range)",
                        "same seed", "same-init control", "p", "outcome"], rows))


def _pick_layers(layers: pd.DataFrame) -> list[int]:
    ids = sorted(int(x) for x in layers["layer"].unique())
    return list(dict.fromkeys([ids[0], ids[len(ids) // 2], ids[-1]]))


def section_layers(inp: ReportInputs) -> str:
    pick = _pick_layers(inp.layers)
    d = inp.layers[inp.layers["layer"].isin(pick)].sort_values(["layer", "module"])
    rows = [[int(r["layer"]), r["module"], fmt.sim(r["cos_sim"]), fmt.fixed(r["frob_dist"], 4),
             fmt.pct(r["rel_frob"]), fmt.sim(r["subspace_sim"]), fmt.fixed(r["norm_lora"], 4),
             fmt.fixed(r["norm_qlora"], 4)] for _, r in d.iterrows()]
    return (md_table(["layer", "module", "cosine", "L2 distance ‖ΔW_QLoRA − ΔW_LoRA‖_F",
                      "relative difference", "subspace φ", "‖ΔW_LoRA‖_F", "‖ΔW_QLoRA‖_F"],
                     rows)
            + f"\n\nFirst, middle and last layer ({', '.join(map(str, pick))}) of "
              f"{inp.layers['layer'].nunique()}; every layer is in `reports/layers.csv`.")


def section_alignment(inp: ReportInputs) -> str:
    m = inp.metrics
    pick = _pick_layers(inp.layers)
    d = inp.layers[inp.layers["layer"].isin(pick)].sort_values(["layer", "module"])
    rows = [[int(r["layer"]), r["module"], fmt.fixed(r["norm_residual"], 4),
             fmt.fixed(r["norm_lora"], 4), fmt.fixed(r["norm_qlora"], 4),
             fmt.sim(r["alignment"]), fmt.sim(r["alignment_ceiling"]),
             fmt.pct(r["quant_rel_error"])] for _, r in d.iterrows()]
    a, c = float(m["alignment_mean"]), float(m["alignment_ceiling_mean"])
    ratio = a / c if c else math.nan
    size = (inp.layers["norm_residual"] / inp.layers["norm_qlora"]).median()
    return (
        "QLoRA computes with deq(Q(W)) + ΔW_QLoRA; it equals the LoRA model W + ΔW_LoRA when "
        "ΔW_QLoRA − ΔW_LoRA = W − deq(Q(W)). The alignment is the cosine of those two "
        "matrices; a rank-r correction can reach at most the ceiling (Eckart–Young), since the "
        "quantization error is close to full rank.\n\n"
        + md_table(["layer", "module", "‖W − deq(Q(W))‖_F", "‖ΔW_LoRA‖_F", "‖ΔW_QLoRA‖_F",
                    "alignment", "ceiling", "quantization rel. error"], rows)
        + f"\n\nMean alignment {fmt.sim(a)} of a possible {fmt.sim(c)} "
          f"({fmt.pct(ratio)} of the ceiling). The quantization error is "
          f"{fmt.fixed(size, 2)}× the size of the QLoRA update (median over modules): "
          + ("the alignment reaches the rule's share of the ceiling"
             if undoes_quantization_error(a, c) else
             "the alignment stays below the rule's share of the ceiling")
          + f" (the rule: alignment ≥ {ALIGNED_FRACTION:.1f} × ceiling; a descriptive "
            "threshold on one adapter, not a test).")
