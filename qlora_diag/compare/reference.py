"""The comparison's two references beside the trained pairs: the bases without any adapter
(how far quantization alone moves the model) and the headline adapters on the other base
(what a user deploying across base precisions gets).
"""
from __future__ import annotations

from pathlib import Path

from qlora_diag.compare.function import (
    attached,
    exact_output_agreement,
    generate_case,
    pair_forward_stats,
    token_match_rate,
)
from qlora_diag.core.examples import example_rows
from qlora_diag.core.schemas import BASE_CASES, TRANSFER_CASES
from qlora_diag.train.generation import exact_match_summary
from qlora_diag.train.losses import EvalResult, evaluate_examples
from qlora_diag.train.trainer import GenerationCfg


def base_reference(base, quant, eval_records: list[dict], gen_records: list[dict], tokenizer,
                   gen: GenerationCfg, batch_size: int
                   ) -> tuple[dict, dict[str, list[dict]], dict[str, list[dict]]]:
    """The bases without adapter: 16-bit and 4-bit eval loss and exact match, and how far apart
    quantization alone puts them (KL(P_16bit ‖ P_4bit), hidden cosine, token match).

    Returns ``base.json``'s content, the generations of both (``base``, ``base_quantized``)
    and their per-example records (:mod:`qlora_diag.core.examples`).
    """
    fwd = pair_forward_stats(base, quant, eval_records, batch_size, tokenizer.pad_token_id,
                             desc="base vs quantized base")
    rows = {"base": generate_case(base, gen_records, tokenizer, gen),
            "base_quantized": generate_case(quant, gen_records, tokenizer, gen)}
    em = {c: exact_match_summary(rows[c]) for c in BASE_CASES}
    ids = [[r["output_ids"] for r in rows[c]] for c in BASE_CASES]
    out = {"eval_loss": fwd["loss_a"], "eval_loss_quantized": fwd["loss_b"],
           "exact_match": em["base"]["exact_match"],
           "exact_match_quantized": em["base_quantized"]["exact_match"],
           "exact_match_per_task": em["base"]["exact_match_per_task"],
           "exact_match_per_task_quantized": em["base_quantized"]["exact_match_per_task"],
           "kl_mean": fwd["kl_mean"], "hidden_cos_sim": fwd["hidden_cos_sim"],
           "token_match_rate": token_match_rate(*ids),
           "exact_output_agreement": exact_output_agreement(*ids),
           "eval_tokens": fwd["n_tokens"], "n_generations": len(gen_records)}
    return out, rows, base_examples(fwd, eval_records, rows)


def base_examples(fwd: dict, eval_records: list[dict], rows: dict[str, list[dict]]
                  ) -> dict[str, list[dict]]:
    """Per-example records of the two bases from :func:`base_reference`'s forward pass
    (``fwd``, its ``nll_a`` = 16-bit, ``nll_b`` = 4-bit) and generations ``rows``."""
    return {"base": example_rows(eval_records, fwd["nll_a"], fwd["n_tokens_per"], rows["base"]),
            "base_quantized": example_rows(eval_records, fwd["nll_b"], fwd["n_tokens_per"],
                                           rows["base_quantized"])}


def transfer_check(base, quant, lora_dir: Path, qlora_dir: Path, runs: dict[str, str],
                   eval_records: list[dict], gen_records: list[dict], tokenizer,
                   gen: GenerationCfg, batch_size: int
                   ) -> tuple[dict, dict[str, list[dict]], dict[str, list[dict]]]:
    """The headline adapters on the other base: QLoRA's on the 16-bit base unmerged and merged
    (``merge_and_unload``), LoRA's on the 4-bit base. Eval loss and exact match of each, and
    the change against the adapter on its native base, ``runs`` = ``{"lora"|"qlora": run
    name}``.

    Both sides of every change come from this process: the native pairings are evaluated and
    decoded here too (same code, same batches), not taken from training's ``run.json``, so a
    change is free of the differences between two processes' evaluations.

    Returns ``transfer.json``'s content (``native`` per method: run, eval_loss, exact_match;
    ``cases``), the generations of the transfer cases, and the per-example records
    (:mod:`qlora_diag.core.examples`) of the native pairings (``native_lora``,
    ``native_qlora``) and of every case.

    **Consumes** ``base``: merging writes W + ΔW_QLoRA into its weights, so it runs last and
    the caller must not use ``base`` afterwards.
    """
    pad = tokenizer.pad_token_id
    scored: dict[str, EvalResult] = {}
    rows: dict[str, list[dict]] = {}

    def score(name: str, model) -> None:
        scored[name] = evaluate_examples(model, eval_records, batch_size, pad)
        rows[name] = generate_case(model, gen_records, tokenizer, gen)

    with attached(base, lora_dir) as m:
        score("native_lora", m)
    with attached(quant, qlora_dir) as m:
        score("native_qlora", m)
    with attached(base, qlora_dir) as m:
        score("qlora_on_base", m)
    with attached(quant, lora_dir) as m:
        score("lora_on_quantized", m)
    from peft import PeftModel

    merged = PeftModel.from_pretrained(base, str(qlora_dir)).merge_and_unload()
    merged.eval()
    score("qlora_merged", merged)

    em = {name: exact_match_summary(r) for name, r in rows.items()}
    native = {m: {"run": runs[m], "eval_loss": scored[f"native_{m}"].loss,
                  "exact_match": em[f"native_{m}"]["exact_match"]} for m in ("lora", "qlora")}
    native_of = {"qlora_on_base": "qlora", "qlora_merged": "qlora",
                 "lora_on_quantized": "lora"}
    cases = {}
    for case in TRANSFER_CASES:
        nat = native[native_of[case]]
        cases[case] = {"adapter": nat["run"],
                       "base": "4-bit" if case == "lora_on_quantized" else "16-bit",
                       "merged": case == "qlora_merged", "eval_loss": scored[case].loss,
                       "exact_match": em[case]["exact_match"],
                       "exact_match_per_task": em[case]["exact_match_per_task"],
                       "eval_loss_change": scored[case].loss - nat["eval_loss"],
                       "exact_match_change": em[case]["exact_match"] - nat["exact_match"]}
    examples = {name: example_rows(eval_records, r.nll_sums, r.n_tokens_per, rows[name])
                for name, r in scored.items()}
    return ({"native": native, "cases": cases}, {c: rows[c] for c in TRANSFER_CASES}, examples)
