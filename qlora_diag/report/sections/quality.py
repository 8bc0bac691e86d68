"""Function-level quality, LoRA vs QLoRA: per rank (and the rank threshold, H3), per target
preset (module sensitivity, H2), per task family, against the base models and with each adapter
on the other base (transfer)."""
from __future__ import annotations

import pandas as pd

from qlora_diag.core import numbers as fmt
from qlora_diag.core.config import Params
from qlora_diag.report.inputs import ReportInputs
from qlora_diag.report.tables import md_table
from qlora_diag.report.verdicts import Diagnosis


def section_quality(inp: ReportInputs, p: Params) -> str:
    spread = float(inp.metrics["eval_loss_seed_spread"])
    th = p.compare.cos_threshold
    rows = [[int(r["rank"]), fmt.pct(r["token_match_rate"]), fmt.pct(r["exact_output_agreement"]),
             fmt.sim(r["hidden_cos_sim"]), fmt.loss(r["eval_loss_lora"]),
             fmt.loss(r["eval_loss_qlora"]), fmt.gap(r["eval_loss_gap"]),
             fmt.yes_no(abs(r["eval_loss_gap"]) <= spread), fmt.fixed(r["kl_mean"], 4),
             fmt.sim(r["cos_sim_mean"]), fmt.yes_no(r["cos_sim_mean"] > th)]
            for _, r in inp.ranks.iterrows()]
    return (md_table(["rank", "token match", "exact output agreement", "embedding cos",
                      "eval loss LoRA", "eval loss QLoRA", "gap", "gap ≤ seed spread?", "KL",
                      "cos(ΔW)", f"cos(ΔW) > θ = {th:.2f}?"], rows)
            + f"\n\nOne LoRA/QLoRA pair per rank, seed {p.seed}; the seed spread "
              f"{fmt.loss(spread)} is measured at r={p.lora.r}. Token match, exact output "
              "agreement, embedding cosine and KL compare the LoRA and QLoRA models of the same "
              "seed on the eval prompts.")


def _best_marks(mod: pd.DataFrame) -> list[str]:
    least = mod["quality_drop_pct"].idxmin()
    lowest = mod["eval_loss_qlora"].idxmin()
    return [", ".join(x for x, hit in (("least drop", i == least),
                                       ("lowest QLoRA loss", i == lowest)) if hit)
            for i in mod.index]


def section_modules(inp: ReportInputs, p: Params, diag: Diagnosis) -> str:
    mod = inp.modules.reset_index(drop=True)
    marks = _best_marks(mod)
    rows = [[f"`{r['targets']}`", fmt.count(r["trainable_params"]),
             fmt.loss(r["eval_loss_lora"]), fmt.loss(r["eval_loss_qlora"]),
             fmt.gap(r["eval_loss_gap"]), fmt.pct_value(r["quality_drop_pct"]),
             fmt.fixed(r["kl_mean"], 4), fmt.pct(r["token_match_rate"]),
             fmt.mb(r["weights_mb_qlora"]), fmt.mb(r["peak_mem_mb_qlora"]), marks[i]]
            for i, r in mod.iterrows()]
    ev = diag.h2.evidence
    return (md_table(["preset", "trainable params", "eval loss LoRA", "eval loss QLoRA", "gap",
                      "quality drop", "KL", "token match", "weights QLoRA (MB)",
                      "peak QLoRA (MB)", "best"], rows)
            + f"\n\nAt rank {p.lora.r}, seed {p.seed}. Quality drop = relative eval-loss increase "
              f"of QLoRA over LoRA, 100 · (QLoRA − LoRA) / LoRA (`quality_drop_pct`). Most "
              f"sensitive by gap: "
              f"`{ev['most_sensitive']}`, by KL: `{ev['most_sensitive_by_kl']}`; least: "
              f"`{ev['least_sensitive']}`. The presets adapt different numbers of matrices, so "
              "sensitivity here is confounded with adapter capacity.")


def section_ranks(inp: ReportInputs, p: Params, diag: Diagnosis) -> str:
    spread = float(inp.metrics["eval_loss_seed_spread"])
    rows = [[int(r["rank"]), fmt.gap(r["eval_loss_gap"]), fmt.loss(abs(r["eval_loss_gap"])),
             fmt.yes_no(abs(r["eval_loss_gap"]) <= spread)] for _, r in inp.ranks.iterrows()]
    r_star = diag.h3.evidence["r_star"]
    head = (f"**r\\* = {r_star}**" if r_star is not None else
            "**r\\* not found in the tested ranks**")
    return (md_table(["rank", "gap QLoRA − LoRA", "abs(gap)",
                      f"abs(gap) ≤ seed spread {fmt.loss(spread)}?"], rows)
            + f"\n\n{head} ({diag.h3.status}). Rule: {diag.h3.rule}\n\n{diag.h3.summary}")


def section_transfer(inp: ReportInputs) -> str:
    m = inp.metrics
    q = inp.runs[inp.headline["qlora"]]
    lo = inp.runs[inp.headline["lora"]]
    rows = [
        ["QLoRA adapter on the quantized base (as trained)", fmt.loss(q["eval_loss"]),
         fmt.gap(0.0), fmt.pct(q["exact_match"])],
        ["QLoRA adapter on the unquantized base", fmt.loss(m["transfer_qlora_on_base_eval_loss"]),
         fmt.gap(m["transfer_qlora_on_base_eval_loss"] - q["eval_loss"]),
         fmt.pct(m["transfer_qlora_on_base_exact_match"])],
        ["QLoRA adapter merged into the unquantized base",
         fmt.loss(m["transfer_qlora_merged_eval_loss"]),
         fmt.gap(m["transfer_qlora_merged_eval_loss"] - q["eval_loss"]),
         fmt.pct(m["transfer_qlora_merged_exact_match"])],
        ["LoRA adapter on the unquantized base (as trained)", fmt.loss(lo["eval_loss"]),
         fmt.gap(0.0), fmt.pct(lo["exact_match"])],
        ["LoRA adapter on the quantized base", fmt.loss(m["transfer_lora_on_quantized_eval_loss"]),
         fmt.gap(m["transfer_lora_on_quantized_eval_loss"] - lo["eval_loss"]),
         fmt.pct(m["transfer_lora_on_quantized_exact_match"])],
    ]
    return (md_table(["adapter and base", "eval loss", "vs as trained", "exact match"], rows)
            + f"\n\nHeadline-seed adapters (`{inp.headline['qlora']}`, "
              f"`{inp.headline['lora']}`); a change counts when it exceeds the seed spread "
              f"{fmt.loss(m['eval_loss_seed_spread'])}.")


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
    gap = float(m["eval_loss_gap"])
    text = (f"Quantization alone raised the base model's eval loss by {fmt.gap(base_gap)}; after "
            f"fine-tuning the QLoRA − LoRA gap is {fmt.gap(gap)}")
    if base_gap > 0:
        text += f", so fine-tuning closed {fmt.pct(1 - gap / base_gap)} of the quantization gap."
    else:
        text += "; quantization did not hurt the base model on this eval set."
    return md_table(["model", "eval loss", "exact match"], rows) + "\n\n" + text


def section_tasks(inp: ReportInputs) -> str:
    rows = [[r.task, int(r.n), fmt.pct(r.exact_match_lora), fmt.pct(r.exact_match_qlora),
             fmt.pct(r.drop), fmt.pct(max(r.spread_lora, r.spread_qlora))]
            for r in inp.per_task.itertuples()]
    return (md_table(["task family", "examples", "LoRA", "QLoRA", "drop LoRA − QLoRA",
                      "seed spread (larger method)"], rows)
            + f"\n\nExact match of greedy outputs, mean over {inp.n_seeds} seeds per method "
              "(from each run's `run.json`).")
