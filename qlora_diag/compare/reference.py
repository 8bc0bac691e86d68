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
from qlora_diag.core.schemas import BASE_CASES, TRANSFER_CASES
from qlora_diag.train.generation import exact_match_summary
from qlora_diag.train.losses import evaluate_loss
from qlora_diag.train.trainer import GenerationCfg


def base_reference(base, quant, eval_records: list[dict], gen_records: list[dict], tokenizer,
                   gen: GenerationCfg, batch_size: int) -> tuple[dict, dict[str, list[dict]]]:
    """The bases without adapter: 16-bit and 4-bit eval loss and exact match, and how far apart
    quantization alone puts them (KL(P_16bit ‖ P_4bit), hidden cosine, token match).

    Returns ``base.json``'s content and the generations of both (``base``, ``base_quantized``).
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
    return out, rows


def transfer_check(base, quant, lora_dir: Path, qlora_dir: Path, native: dict,
                   eval_records: list[dict], gen_records: list[dict], tokenizer,
                   gen: GenerationCfg, batch_size: int) -> tuple[dict, dict[str, list[dict]]]:
    """The headline adapters on the other base: QLoRA's on the 16-bit base unmerged and merged
    (``merge_and_unload``), LoRA's on the 4-bit base. Eval loss and exact match of each, and
    the change against the adapter's native pairing in ``native`` (``{"lora"|"qlora": {"run",
    "eval_loss", "eval_loss_recomputed", "exact_match"}}``).

    **Consumes** ``base``: merging writes W + ΔW_QLoRA into its weights, so it runs last and
    the caller must not use ``base`` afterwards.
    """
    loss, rows = {}, {}
    with attached(base, qlora_dir) as m:
        loss["qlora_on_base"] = evaluate_loss(m, eval_records, batch_size, tokenizer.pad_token_id)[0]
        rows["qlora_on_base"] = generate_case(m, gen_records, tokenizer, gen)
    with attached(quant, lora_dir) as m:
        loss["lora_on_quantized"] = evaluate_loss(m, eval_records, batch_size,
                                                  tokenizer.pad_token_id)[0]
        rows["lora_on_quantized"] = generate_case(m, gen_records, tokenizer, gen)
    from peft import PeftModel

    merged = PeftModel.from_pretrained(base, str(qlora_dir)).merge_and_unload()
    merged.eval()
    loss["qlora_merged"] = evaluate_loss(merged, eval_records, batch_size,
                                                 tokenizer.pad_token_id)[0]
    rows["qlora_merged"] = generate_case(merged, gen_records, tokenizer, gen)

    # Changes are against the native loss recomputed in this process, so they are free of the
    # rounding differences between training's evaluation and this one.
    native_of = {"qlora_on_base": "qlora", "qlora_merged": "qlora",
                 "lora_on_quantized": "lora"}
    cases = {}
    for case in TRANSFER_CASES:
        em = exact_match_summary(rows[case])
        nat = native[native_of[case]]
        cases[case] = {"adapter": nat["run"],
                       "base": "4-bit" if case == "lora_on_quantized" else "16-bit",
                       "merged": case == "qlora_merged", "eval_loss": loss[case],
                       "exact_match": em["exact_match"],
                       "exact_match_per_task": em["exact_match_per_task"],
                       "eval_loss_change": loss[case] - nat["eval_loss_recomputed"],
                       "exact_match_change": em["exact_match"] - nat["exact_match"]}
    return {"native": native, "cases": cases}, rows
