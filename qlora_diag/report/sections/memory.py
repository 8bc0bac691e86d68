"""Memory and speed: weights and training peak per rank, the measured memory against the QLoRA
paper's quoted memory model, and the time per training step."""
from __future__ import annotations

import math

from qlora_diag.core import numbers as fmt
from qlora_diag.core.config import Params
from qlora_diag.report.inputs import ReportInputs
from qlora_diag.report.tables import md_table, row_at

# The quoted memory model (RESEARCH.md): full fine-tuning ~ 12 bytes/param; the adapter term
# 24·k·r·d bytes is 12 bytes per trainable adapter parameter (A and B hold 2·k·r·d of them).
# The 16-bit term 2p is the same number as
# qlora_diag.models.quantization.per_module.QUOTED_BYTES_PER_PARAM_16BIT; it is not imported from there
# because that module loads bitsandbytes (~10 s per plot run). The QLoRA term 0.52p and the
# paper's bits/param are read from reports/quantization.json.
QUOTED_FULL_FT_BYTES_PER_PARAM = 12
QUOTED_ADAPTER_BYTES_PER_PARAM = 12
QUOTED_BYTES_PER_PARAM_16BIT = 2


def section_memory(inp: ReportInputs) -> str:
    rows = [[int(r["rank"]), fmt.count(r["trainable_params"]), fmt.mb(r["weights_mb_lora"]),
             fmt.mb(r["weights_mb_qlora"]),
             fmt.reduction(r["weights_mb_lora"], r["weights_mb_qlora"]),
             fmt.mb(r["peak_mem_mb_lora"]), fmt.mb(r["peak_mem_mb_qlora"]),
             fmt.reduction(r["peak_mem_mb_lora"], r["peak_mem_mb_qlora"])]
            for _, r in inp.ranks.iterrows()]
    device = inp.setup["device"]
    cuda_note = ("" if device == "cuda" else
                 f" There is no CUDA peak: the runs trained on {device}, where the only "
                 "comparable measure is the process's resident memory.")
    return (md_table(["rank", "trainable params", "weights LoRA (MB)", "weights QLoRA (MB)",
                      "weights reduction", "peak LoRA (MB)", "peak QLoRA (MB)",
                      "peak reduction"], rows)
            + "\n\n*Weights*: parameters and buffers of the loaded model with its adapter "
              "(`get_memory_footprint`). *Peak*: the " + inp.memory_measure + " during "
              "training, measured the same way for both methods." + cuda_note)


def section_accounting(inp: ReportInputs, p: Params) -> str:
    q, m = inp.quant, inp.metrics
    n = float(q["n_params"])
    t = float(row_at(inp.ranks, "rank", p.lora.r)["trainable_params"])
    mb = 2 ** 20
    adapter_mb = QUOTED_ADAPTER_BYTES_PER_PARAM * t / mb
    quoted_qlora = float(q["bytes_per_param_quoted_qlora"])
    paper_bits = float(q["bits_per_param_paper"])
    paper_bytes = paper_bits / 8
    rows = [
        ["unquantized base, bytes/param", fmt.fixed(QUOTED_BYTES_PER_PARAM_16BIT, 3),
         fmt.fixed(q["bytes_per_param_16bit_model"], 3), f"stored as {inp.base_dtype}"],
        ["4-bit model as a whole, bytes/param", fmt.fixed(q["bytes_per_param_quoted_qlora"], 3),
         fmt.fixed(q["bytes_per_param_model"], 3),
         "embeddings, norms and LM head stay unquantized"],
        ["quantized linear layers only, bytes/param", fmt.fixed(paper_bytes, 3),
         fmt.fixed(q["bytes_per_param_quantized_linear"], 3),
         f"paper {fmt.fixed(paper_bits, 3)} bits, measured "
         f"{fmt.fixed(q['bits_per_param_measured'], 3)} bits"],
        ["unquantized base weights (MB)", fmt.mb(QUOTED_BYTES_PER_PARAM_16BIT * n / mb),
         fmt.mb(q["weights_mb_16bit"]), f"p = {fmt.count(n)} parameters"],
        ["4-bit base weights (MB)", fmt.mb(quoted_qlora * n / mb),
         fmt.mb(q["weights_mb_4bit"]),
         f"{fmt.count(q['n_params_quantized'])} of them quantized"],
        [f"LoRA training at r={p.lora.r} (MB)",
         fmt.mb(QUOTED_BYTES_PER_PARAM_16BIT * n / mb + adapter_mb),
         fmt.mb(m["peak_mem_mb_lora"]),
         f"quoted 2p + 24·k·r·d, {fmt.count(t)} adapter params; measured: training peak"],
        [f"QLoRA training at r={p.lora.r} (MB)",
         fmt.mb(quoted_qlora * n / mb + adapter_mb), fmt.mb(m["peak_mem_mb_qlora"]),
         "quoted 0.52p + 24·k·r·d; measured: training peak"],
        ["full 16-bit fine-tuning (MB)", fmt.mb(QUOTED_FULL_FT_BYTES_PER_PARAM * n / mb),
         "not measured", "quoted 12p"],
    ]
    cats = q["mb_4bit_by_category"]
    total_4bit = float(q["weights_mb_4bit"])
    unq = {k: v for k, v in cats.items() if k not in ("packed_4bit", "quant_constants") and v}
    share = ", ".join(f"{k} {fmt.mb(v)} MB ({fmt.pct(v / total_4bit)})" for k, v in unq.items())
    extra_bits = float(q["bits_per_param_measured"]) - paper_bits
    peak_ratio = float(m["peak_mem_mb_qlora"]) / (quoted_qlora * n / mb + adapter_mb)
    wrong = [
        f"- The 4-bit model takes {fmt.fixed(q['bytes_per_param_model'], 3)} bytes/param, not "
        f"{fmt.fixed(q['bytes_per_param_quoted_qlora'], 3)}: the quoted figure counts every "
        f"parameter as quantized, but these stay unquantized: {share}.",
        f"- The quantized layers alone take "
        f"{fmt.fixed(q['bytes_per_param_quantized_linear'], 3)} bytes/param against the paper's "
        f"{fmt.fixed(paper_bytes, 3)} ({fmt.fixed(extra_bits, 3)} bits/param "
        + ("more: each matrix also stores its code books, and a partial last block where its "
           "size is not a multiple of the block size; the paper's per-block accounting leaves "
           "both out)." if extra_bits > 0 else
           "difference: the paper's per-block accounting holds here)."),
        f"- The training peak is {fmt.ratio(peak_ratio)} the quoted QLoRA total: the model "
        "ignores activations, their gradients, the framework and its allocator caches, which "
        "dominate a model of this size.",
    ]
    if inp.base_dtype == "float32":
        wrong.append(f"- The unquantized base is float32 here ("
                     f"{fmt.fixed(q['bytes_per_param_16bit_model'], 3)} bytes/param), so the "
                     "quoted 2p undercounts LoRA's weights twofold on this machine.")
    return (md_table(["quantity", "quoted model", "measured", "note"], rows)
            + "\n\nWhere the quoted model is wrong here:\n\n" + "\n".join(wrong))


def section_efficiency(inp: ReportInputs, p: Params) -> str:
    rows = [[int(r["rank"]), fmt.seconds(r["step_time_lora_s"]),
             fmt.seconds(r["step_time_qlora_s"]),
             fmt.ratio(r["step_time_qlora_s"] / r["step_time_lora_s"])]
            for _, r in inp.ranks.iterrows()]
    r = row_at(inp.ranks, "rank", p.lora.r)
    m = inp.metrics
    ratio = float(m["step_time_ratio"])
    table = md_table(["rank", "LoRA (s/step)", "QLoRA (s/step)", "QLoRA / LoRA"], rows)
    if math.isnan(ratio):
        return (table + f"\n\nAt rank {p.lora.r} no step time was measured (the runs had no "
                        "steps after the timing warm-up), so no speed is compared.")
    return (table
            + f"\n\nAt rank {p.lora.r}: LoRA {fmt.seconds(r['step_time_lora_s'])} s/step, "
              f"QLoRA {fmt.seconds(r['step_time_qlora_s'])} s/step; a QLoRA step takes "
              f"{fmt.ratio(ratio)} as long ({'slower' if ratio > 1 else 'faster'}), "
              f"{fmt.fixed(m['tokens_per_s_qlora'], 1)} vs {fmt.fixed(m['tokens_per_s_lora'], 1)} "
              f"tokens/s. Median over steps after the first warm-up steps, batch "
              f"{p.train.batch_size}.")
