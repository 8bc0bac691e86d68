"""Which answer measures apply to this run's data source, and the free-form ones: chrF against
the reference per method, and LoRA-vs-QLoRA agreement over full answers (issue 15).

Exact match is a quality measure for ``embedded:probe`` only (:mod:`qlora_diag.data.overlap`);
for any other source this section says so, and the report's exact-match table is replaced by a
pointer here.
"""
from __future__ import annotations

from qlora_diag.core import numbers as fmt
from qlora_diag.core.config import Params
from qlora_diag.core.schemas import GENERATION_KEYS
from qlora_diag.data.overlap import chrf, exact_match_applies
from qlora_diag.data.sources import PROBE
from qlora_diag.report.inputs import ReportInputs, _read_jsonl
from qlora_diag.report.tables import md_table


def headline_agreement(inp: ReportInputs) -> dict:
    """LoRA-vs-QLoRA agreement over the headline pair's full greedy answers: chrF of QLoRA's
    answers with LoRA's as the references, the share of identical answers, the number of
    answers."""
    rows = {m: _read_jsonl(inp.run_dirs[inp.headline[m]] / "generations.jsonl", GENERATION_KEYS)
            for m in ("lora", "qlora")}
    lora = {r["id"]: r["output"] for r in rows["lora"]}
    pairs = [(r["output"], lora[r["id"]]) for r in rows["qlora"] if r["id"] in lora]
    return {"chrf": chrf([q for q, _ in pairs], [ref for _, ref in pairs]),
            "identical": sum(q == ref for q, ref in pairs) / len(pairs), "n": len(pairs)}


def section_answers(inp: ReportInputs, p: Params) -> str:
    source = inp.data["source"]
    em = exact_match_applies(source)
    applies = [
        ["exact match", "the normalized answer equals the reference", f"`{PROBE}` only",
         "yes" if em else "no: free-form answers almost never match word for word"],
        ["chrF vs reference", "character n-gram F-score of the answer against the reference "
         "(sacrebleu chrF2, 0..100)", "every source; the quality measure of free-form ones",
         "yes"],
        ["LoRA-vs-QLoRA chrF", "QLoRA's full answer against LoRA's as the reference",
         "every source", "yes"],
        ["identical answers", "QLoRA's full answer equals LoRA's", "every source", "yes"],
    ]
    agree = headline_agreement(inp)
    numbers = [[f"chrF vs reference (mean over {inp.n_seeds} seeds)",
                fmt.fixed(inp.seed_mean("lora", "chrf"), 1),
                fmt.fixed(inp.seed_mean("qlora", "chrf"), 1)]]
    if em:
        numbers.append([f"exact match (mean over {inp.n_seeds} seeds)",
                        fmt.pct(inp.seed_mean("lora", "exact_match")),
                        fmt.pct(inp.seed_mean("qlora", "exact_match"))])
    n_new = inp.data["max_new_tokens"]["value"]
    return "\n\n".join([
        f"Measures by source (this run: `{source}`):",
        md_table(["measure", "what it compares", "applies to", "used here"], applies),
        md_table(["", "LoRA", "QLoRA"], numbers),
        f"LoRA vs QLoRA over the full answers of the headline pair (r={p.lora.r}, seed "
        f"{p.seed}, {agree['n']} answers of at most {n_new} new tokens): chrF "
        f"{fmt.fixed(agree['chrf'], 1)}, identical answers {fmt.pct(agree['identical'])}. "
        "Answers cut at the token limit score lower against their reference than whole ones.",
    ])


def section_tasks_for_source(inp: ReportInputs, probe_body: str) -> str:
    """The exact-match-per-task section for the probe; for other sources a pointer to the
    measures that apply."""
    if exact_match_applies(inp.data["source"]):
        return probe_body
    return (f"Not shown: exact match is not a quality measure for the free-form source "
            f"`{inp.data['source']}`; see \"Answer measures by data source\".")
