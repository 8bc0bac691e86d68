"""Function-level quality, LoRA vs QLoRA: per rank (and the rank threshold, H3), per target
preset (module sensitivity, H2), per task family, against the base models and with each adapter
on the other base (transfer)."""
from __future__ import annotations

from qlora_diag.core import numbers as fmt
from qlora_diag.core.config import Params
from qlora_diag.report.inputs import ReportInputs
from qlora_diag.report.paired import Comparison, over_words
from qlora_diag.report.tables import md_table
from qlora_diag.report.verdicts import Diagnosis


def _ci(c: Comparison) -> str:
    i = c.decision.interval95
    return f"[{fmt.gap(i.low)}, {fmt.gap(i.high)}]"


def section_paired_gaps(inp: ReportInputs) -> str:
    """The headline paired gaps (estimate ± interval, decision) and the seed-level table."""
    pe = inp.paired
    rows = [[int(r.seed), fmt.loss(r.eval_loss_lora), fmt.loss(r.eval_loss_qlora),
             fmt.gap(r.eval_loss_gap), fmt.pct_value(r.exact_match_lora),
             fmt.pct_value(r.exact_match_qlora), fmt.gap(r.exact_match_gap), int(r.n_generated)]
            for r in pe.seed_table.itertuples()]
    parts = [f"**Eval loss: {pe.headline_loss.label}.** {pe.headline_loss.analysis.sentence}"]
    b = pe.headline_loss.analysis.bootstrap95
    parts.append(f"Hierarchical bootstrap (seeds, then eval examples), 95 %: "
                 f"[{fmt.gap(b.low)}, {fmt.gap(b.high)}] ({b.n_boot} replicates).")
    if pe.headline_em is not None:
        parts.append(f"**Exact match: {pe.headline_em.label}.** "
                     f"{pe.headline_em.analysis.sentence}")
    else:
        parts.append("Exact match: no generated examples, so no paired exact-match gap.")
    return ("\n\n".join(parts) + "\n\n"
            + md_table(["seed", "eval loss LoRA", "eval loss QLoRA", "d_s = QLoRA − LoRA",
                        "exact match LoRA (%)", "exact match QLoRA (%)", "exact-match gap "
                        "(points)", "generated examples"], rows)
            + f"\n\nMargins: ±{pe.margin:g} nats/token (compare.margin), "
              f"±{pe.margin_exact_match:g} points (compare.margin_exact_match).")


def section_quality(inp: ReportInputs, p: Params) -> str:
    th = p.compare.cos_threshold
    pr = inp.paired.per_rank
    rows = [[int(r["rank"]), fmt.pct(r["token_match_rate"]), fmt.pct(r["exact_output_agreement"]),
             fmt.sim(r["hidden_cos_sim"]), fmt.loss(r["eval_loss_lora"]),
             fmt.loss(r["eval_loss_qlora"]), fmt.gap(pr[int(r["rank"])].estimate),
             _ci(pr[int(r["rank"])]), pr[int(r["rank"])].label, fmt.fixed(r["kl_mean"], 4),
             fmt.sim(r["cos_sim_mean"]), fmt.yes_no(r["cos_sim_mean"] > th)]
            for _, r in inp.ranks.iterrows()]
    return (md_table(["rank", "token match", "exact output agreement", "embedding cos",
                      "eval loss LoRA", "eval loss QLoRA", "paired gap", "95 % interval",
                      "decision", "KL", "cos(ΔW)", f"cos(ΔW) > θ = {th:.2f}?"], rows)
            + f"\n\nEval losses and the similarity columns are of the seed-{p.seed} pair. The "
              f"paired gap at r={p.lora.r} is over every seed; at the other ranks one seed is "
              "trained, so its interval is over eval examples only and omits seed noise. Token "
              "match, exact output agreement, embedding cosine and KL compare the LoRA and "
              "QLoRA models of the same seed on the eval prompts.")


def section_modules(inp: ReportInputs, p: Params, diag: Diagnosis) -> str:
    mod = inp.modules.reset_index(drop=True)
    rows = [[f"`{r['targets']}`", fmt.count(r["trainable_params"]),
             fmt.loss(r["eval_loss_lora"]), fmt.loss(r["eval_loss_qlora"]),
             fmt.gap(r["eval_loss_gap"]), fmt.pct_value(r["quality_drop_pct"]),
             fmt.fixed(r["kl_mean"], 4), fmt.pct(r["token_match_rate"]),
             fmt.mb(r["weights_mb_qlora"]), fmt.mb(r["peak_mem_mb_qlora"])]
            for i, r in mod.iterrows()]
    pe = inp.paired
    gap_col = [fmt.gap(pe.per_preset[str(t)].estimate) + " " + _ci(pe.per_preset[str(t)])
               if str(t) in pe.per_preset else "n/a" for t in mod["targets"]]
    for row, g in zip(rows, gap_col):
        row[4] = g
    return (md_table(["preset", "trainable params", "eval loss LoRA", "eval loss QLoRA",
                      "paired gap [95 % interval]", "quality drop", "KL", "token match", "weights QLoRA (MB)",
                      "peak QLoRA (MB)"], rows)
            + f"\n\nAt rank {p.lora.r}, seed {p.seed}. Quality drop = relative eval-loss increase "
              f"of QLoRA over LoRA, 100 · (QLoRA − LoRA) / LoRA (`quality_drop_pct`). One seed "
              f"per preset except `{p.lora.targets}` (every seed): the other presets' intervals "
              "are over eval examples only and omit seed noise. The presets adapt different "
              "numbers of matrices, so sensitivity here is confounded with adapter capacity."
              f"\n\n**H2: {diag.h2.status}.** {diag.h2.summary}")


def section_ranks(inp: ReportInputs, p: Params, diag: Diagnosis) -> str:
    pr = inp.paired.per_rank
    rows = [[r, fmt.gap(c.estimate), _ci(c), over_words(c), c.label,
             "n/a" if c.decision.seeds_needed is None else str(c.decision.seeds_needed)]
            for r, c in pr.items()]
    r_star = diag.h3.evidence["r_star"]
    head = (f"**r\\* = {r_star}**" if r_star is not None else
            "**r\\* not found in the tested ranks**")
    return (md_table(["rank", "paired gap QLoRA − LoRA", "95 % interval", "interval over",
                      "decision", "paired seeds needed"], rows)
            + f"\n\n{head} ({diag.h3.status}). Rule: {diag.h3.rule}\n\n{diag.h3.summary}")


def section_transfer(inp: ReportInputs) -> str:
    m = inp.metrics
    q = inp.runs[inp.headline["qlora"]]
    lo = inp.runs[inp.headline["lora"]]
    cases = (inp.transfer or {}).get("cases", {})

    def change(case: str) -> str:
        # one compare pass: the change against the native loss recomputed in the same process
        return fmt.gap(cases[case]["eval_loss_change"]) if case in cases else "n/a"

    rows = [
        ["QLoRA adapter on the quantized base (as trained)", fmt.loss(q["eval_loss"]),
         fmt.gap(0.0), fmt.pct(q["exact_match"])],
        ["QLoRA adapter on the unquantized base", fmt.loss(m["transfer_qlora_on_base_eval_loss"]),
         change("qlora_on_base"), fmt.pct(m["transfer_qlora_on_base_exact_match"])],
        ["QLoRA adapter merged into the unquantized base",
         fmt.loss(m["transfer_qlora_merged_eval_loss"]), change("qlora_merged"),
         fmt.pct(m["transfer_qlora_merged_exact_match"])],
        ["LoRA adapter on the unquantized base (as trained)", fmt.loss(lo["eval_loss"]),
         fmt.gap(0.0), fmt.pct(lo["exact_match"])],
        ["LoRA adapter on the quantized base", fmt.loss(m["transfer_lora_on_quantized_eval_loss"]),
         change("lora_on_quantized"), fmt.pct(m["transfer_lora_on_quantized_exact_match"])],
    ]
    return (md_table(["adapter and base", "eval loss", "vs as trained", "exact match"], rows)
            + f"\n\nHeadline-seed adapters (`{inp.headline['qlora']}`, "
              f"`{inp.headline['lora']}`). Changes are from one compare pass (against the "
              "native loss recomputed there); one adapter each, so no interval: a failure mode "
              f"fires only beyond the margin ±{inp.paired.margin:g}.")


def section_base(inp: ReportInputs) -> str:
    m = inp.metrics
    rows = [
        [f"base model ({inp.base_dtype})", fmt.loss(m["base_eval_loss"]),
         fmt.pct(m["base_exact_match"])],
        ["base model, quantized", fmt.loss(m["base_eval_loss_quantized"]),
         fmt.pct(m["base_exact_match_quantized"])],
        [f"LoRA (mean over {inp.n_seeds} seeds)", fmt.loss(inp.seed_mean("lora", "eval_loss")),
         fmt.pct(inp.seed_mean("lora", "exact_match"))],
        [f"QLoRA (mean over {inp.n_seeds} seeds)", fmt.loss(inp.seed_mean("qlora", "eval_loss")),
         fmt.pct(inp.seed_mean("qlora", "exact_match"))],
    ]
    base_gap = float(m["base_eval_loss_quantized"]) - float(m["base_eval_loss"])
    head = inp.paired.headline_loss
    text = (f"Quantizing the base model changed its eval loss by {fmt.gap(base_gap)} (one pass, "
            f"no interval); after fine-tuning the paired QLoRA − LoRA gap is "
            f"{fmt.gap(head.estimate)}, 95 % interval {_ci(head)} ({over_words(head)}). No "
            "share of the quantization gap \"closed\" by fine-tuning is claimed: the base "
            "difference has no interval to compare with.")
    return md_table(["model", "eval loss", "exact match"], rows) + "\n\n" + text


def section_tasks(inp: ReportInputs) -> str:
    fams = inp.paired.families_em
    if not fams:
        return "No generated examples: exact match per task family is not available."
    rows = []
    for f, c in fams.items():
        i = c.decision.interval95
        rows.append([f, i.n_examples, fmt.gap(c.estimate),
                     f"[{fmt.gap(i.low)}, {fmt.gap(i.high)}]", c.label])
    return (md_table(["task family", "paired examples (all seeds)",
                      "exact-match gap QLoRA − LoRA (points)", "95 % interval", "decision"],
                     rows)
            + f"\n\nPaired over {inp.n_seeds} seed(s) on the generated examples, decided "
              f"against ±{inp.paired.margin_exact_match:g} points; each family is tested on its "
              "own at 5 %, without a correction for testing several families.")
