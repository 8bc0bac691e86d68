"""The report's frame: the summary at the top, what ran (setup), the headline numbers at rank
lora.r, and the caveats at the end."""
from __future__ import annotations

import math

from qlora_diag.core import numbers as fmt
from qlora_diag.core.config import SMOLLM2, SMOLLM2_GGUF, Params, headline_seeds, setting_seeds
from qlora_diag.report.inputs import ReportInputs
from qlora_diag.report.tables import md_table
from qlora_diag.report.verdicts import Diagnosis


def section_summary(inp: ReportInputs, p: Params, diag: Diagnosis) -> str:
    m = inp.metrics
    lines = [
        f"At rank {p.lora.r} on `{p.lora.targets}`, QLoRA's eval loss is "
        f"{fmt.loss(inp.paired.seed_table['eval_loss_qlora'].mean())} against LoRA's "
        f"{fmt.loss(inp.paired.seed_table['eval_loss_lora'].mean())} (means over "
        f"{len(inp.paired.seed_table)} paired seeds, from the per-example records). "
        f"**{inp.paired.headline_loss.label}**: {inp.paired.headline_loss.analysis.sentence} "
        f"The weights take {fmt.mb(m['weights_mb_qlora'])} MB instead of "
        f"{fmt.mb(m['weights_mb_lora'])} MB, the training peak {fmt.mb(m['peak_mem_mb_qlora'])} "
        f"MB instead of "
        f"{fmt.mb(m['peak_mem_mb_lora'])} MB, and a QLoRA step takes "
        f"{fmt.ratio(m['step_time_ratio'])} as long.",
        "",
    ]
    lines += [f"- **{v.hypothesis}: {v.status}** (decision of its primary comparison: "
              f"{v.primary['decision']}). {v.summary}" for v in (diag.h1, diag.h2, diag.h3)]
    if diag.failure_modes:
        lines.append("- **Failure modes observed**: "
                     + "; ".join(f.title for f in diag.failure_modes) + ".")
    return "\n".join(lines)


def _list(items) -> str:
    return ", ".join(str(x) for x in items)


def section_setup(inp: ReportInputs, p: Params) -> str:
    s, d, m = inp.setup, inp.data, inp.metrics
    tr, ev = d["splits"]["train"], d["splits"]["eval"]
    info = s["model"]
    extra = ", ".join(f"{k} {info[k]}" for k in ("class", "model_type") if k in info)
    size = f", {fmt.count(info['n_params'])} parameters" if "n_params" in info else ""
    lines = [f"- **Base model**: `{inp.model}`" + (f" ({extra}{size})." if extra or size else ".")]
    if inp.model == SMOLLM2:
        lines.append(
            f"  It is shipped as `{SMOLLM2_GGUF}`, a Q4_1 GGUF file: the unquantized base "
            "used for LoRA is those Q4_1 weights dequantized, and QLoRA's base re-quantizes "
            "them to NF4. The quantization error measured here is NF4 on top of an earlier "
            "4-bit rounding, not NF4 of original 16-bit weights.")
    lines.append(
        f"- **Data**: `{d['source']}`, {tr['n']} training and {ev['n']} eval examples over "
        f"{len(ev['tasks'])} task families; max length {d['max_length']} tokens "
        f"({tr['n_truncated'] + ev['n_truncated']} truncated, "
        f"{tr['n_dropped'] + ev['n_dropped']} dropped); eval responses "
        f"{fmt.fixed(ev['tokens']['response']['mean'], 1)} tokens on average (95th percentile "
        f"{fmt.fixed(ev['tokens']['response']['p95'], 1)}, with eos). The first "
        f"{p.compare.n_generate} eval examples are decoded greedily (at most "
        f"{d['max_new_tokens']['value']} new tokens"
        f"{', compare.max_new_tokens = auto' if p.compare.max_new_tokens == 'auto' else ''}).")
    versions = ", ".join(f"{k} {v}" for k, v in s["versions"].items())
    lines.append(f"- **Hardware**: {s['device']} ({s['cpu_model']}), {s['threads']} torch "
                 f"threads; peak memory is the {inp.memory_measure}.")
    dtype_line = (f"- **Dtypes (resolved)**: LoRA base `{inp.base_dtype}` (base.dtype = "
                  f"`{p.base.dtype}`), QLoRA compute dtype `{inp.compute_dtype}` "
                  f"(quant.compute_dtype = `{p.quant.compute_dtype}`); adapters train in "
                  "float32.")
    if inp.base_dtype == "float32":
        why = ("`auto` chose float32 because bf16 is emulated on this CPU (no AVX512-BF16/AMX) "
               "and runs several times slower than float32" if p.base.dtype == "auto" else
               "base.dtype asks for float32")
        dtype_line += (f" The \"16-bit\" LoRA base therefore computes and is stored in float32 "
                       f"({why}), so LoRA's weight memory is 4 bytes per parameter here, not 2.")
    lines.append(dtype_line)
    lines.append(
        f"- **Quantization**: {p.quant.type.upper()}"
        f"{' + double quantization' if p.quant.double_quant else ''}, blocks of "
        f"{inp.quant['blocksize']} weights; kept unquantized: {inp.quant['kept_16bit']}.")
    run = inp.runs[inp.headline["lora"]]
    lines.append(
        f"- **Training**: {p.train.max_steps} steps × batch {p.train.batch_size} "
        f"({p.train.max_steps * p.train.batch_size} examples seen), lr {p.train.lr:g} "
        f"({p.train.lr_scheduler}, {p.train.warmup_steps} warm-up steps), optimizer "
        f"{run['optimizer']}, LoRA alpha {p.lora.alpha:g}, dropout {p.lora.dropout:g}, "
        f"targets `{p.lora.targets}`; QLoRA "
        + ("with peft's prepare_model_for_kbit_training (train.kbit_prep: norms and "
           "embeddings upcast to float32)." if p.train.kbit_prep else
           "without prepare_model_for_kbit_training (train.kbit_prep = false: the same "
           "training code path as LoRA).")
        + (" Both methods trained with gradient checkpointing (train.gradient_checkpointing)."
           if p.train.gradient_checkpointing else "")
        + (" Prompt prefixes that rows of a batch share are encoded once per step "
           "(train.share_prefix: the same loss and gradient; LoRA dropout on those positions "
           "draws one mask per distinct prefix)." if p.train.share_prefix else ""))
    lines.append(
        f"- **Runs**: rank sweep {_list(p.sweep.ranks)} on `{p.lora.targets}` and module "
        f"sweep {_list(p.sweep.targets)} at rank {p.lora.r}, each at seeds "
        f"{_list(setting_seeds(p))}; headline setting (rank {p.lora.r} on `{p.lora.targets}`) "
        f"at seeds {_list(headline_seeds(p))}; same-init control: the adapter init of seed "
        f"{p.seed} with the batch order of seed {p.sweep.seeds[0]}; H1 threshold θ = "
        f"{p.compare.cos_threshold:.2f}; subspace similarity over the top "
        f"{p.compare.subspace_k} singular directions.")
    lines.append(f"- **Libraries**: {versions}.")
    lines.append(f"- **Reference**: base model eval loss {fmt.loss(m['base_eval_loss'])} "
                 f"({inp.base_dtype}), {fmt.loss(m['base_eval_loss_quantized'])} quantized.")
    return "\n".join(lines)


def section_headline(inp: ReportInputs, p: Params) -> str:
    m, hl, hq = inp.metrics, inp.headline_run("lora"), inp.headline_run("qlora")
    rows = [
        [f"eval loss, seed {p.seed} (nats/token)", fmt.loss(hl["eval_loss"]),
         fmt.loss(hq["eval_loss"]),
         f"single-seed difference {fmt.gap(hq['eval_loss'] - hl['eval_loss'])} (no interval)"],
        [f"eval loss, mean over {inp.n_seeds} seeds",
         fmt.loss(inp.seed_mean("lora", "eval_loss")),
         fmt.loss(inp.seed_mean("qlora", "eval_loss")),
         f"paired gap {fmt.gap(inp.paired.headline_loss.estimate)}, 95 % interval "
         f"[{fmt.gap(inp.paired.headline_loss.decision.interval95.low)}, "
         f"{fmt.gap(inp.paired.headline_loss.decision.interval95.high)}]"],
        [f"exact match, seed {p.seed}", fmt.pct(hl["exact_match"]), fmt.pct(hq["exact_match"]),
         f"base {fmt.pct(m['base_exact_match'])}"],
        [f"exact match, mean over {inp.n_seeds} seeds",
         fmt.pct(inp.seed_mean("lora", "exact_match")),
         fmt.pct(inp.seed_mean("qlora", "exact_match")),
         f"base quantized {fmt.pct(m['base_exact_match_quantized'])}"],
        ["weights (MB)", fmt.mb(m["weights_mb_lora"]), fmt.mb(m["weights_mb_qlora"]),
         f"{fmt.reduction(m['weights_mb_lora'], m['weights_mb_qlora'])} less"],
        ["training peak (MB)", fmt.mb(m["peak_mem_mb_lora"]), fmt.mb(m["peak_mem_mb_qlora"]),
         inp.memory_measure],
        ["training peak growth (MB)", fmt.mb(m["peak_mem_growth_mb_lora"]),
         fmt.mb(m["peak_mem_growth_mb_qlora"]), "peak minus memory at the start of training"],
        ["tokens per second", fmt.fixed(m["tokens_per_s_lora"], 1),
         fmt.fixed(m["tokens_per_s_qlora"], 1),
         f"QLoRA / LoRA step time {fmt.ratio(m['step_time_ratio'])}"],
    ]
    out = md_table(["at rank " + str(p.lora.r) + f", `{p.lora.targets}`", "LoRA", "QLoRA",
                    "note"], rows)
    pair = [
        ["greedy token match rate", fmt.pct(m["token_match_rate"])],
        ["exact output agreement", fmt.pct(m["exact_output_agreement"])],
        ["KL divergence of next-token distributions (nats/token)", fmt.fixed(m["kl_mean"], 4)],
        ["embedding (final hidden state) cosine similarity", fmt.sim(m["hidden_cos_sim"])],
        ["cos(ΔW), same seed (mean over modules)", fmt.sim(m["cos_sim_mean"])],
        [f"subspace similarity φ({p.compare.subspace_k}, {p.compare.subspace_k})",
         fmt.sim(m["subspace_sim_mean"])],
        ["relative difference ‖ΔW_QLoRA − ΔW_LoRA‖ / ‖ΔW‖", fmt.pct(m["rel_frob_mean"])],
        ["cos(ΔW) noise floor (same method, other seed)", fmt.sim(m["noise_floor_cos_sim"])],
    ]
    return (out + "\n\nLoRA vs QLoRA at the same seed, function and weights:\n\n"
            + md_table(["measure", "value"], pair))


def section_caveats(inp: ReportInputs, p: Params) -> str:
    ev = inp.data["splits"]["eval"]
    per_task = p.compare.n_generate / max(1, len(ev["tasks"]))
    lines = [
        f"- One machine ({inp.setup['device']}, {inp.setup['cpu_model']}, "
        f"{inp.setup['threads']} threads); timings and memory are this machine's and vary "
        "between runs by a few percent.",
        f"- {inp.n_seeds} paired seed(s) at rank {p.lora.r} on `{p.lora.targets}`; every other "
        f"rank and preset has {1 + len(p.sweep.setting_seeds)} (seed and sweep.setting_seeds), "
        "so its interval is wider; with one seed an interval is over eval examples only and "
        "omits seed noise.",
        f"- Short training: {p.train.max_steps} steps of {p.train.batch_size} examples. Weight "
        "similarities between independently trained adapters grow with longer training; the "
        "noise floor here belongs to this training length.",
        f"- Small eval set: {ev['n']} examples for the loss, {p.compare.n_generate} generated "
        f"(about {fmt.fixed(per_task, 0)} per task family, so one example moves a task's exact "
        f"match by about {fmt.pct(1 / per_task if per_task else math.nan)}).",
    ]
    if inp.setup["device"] != "cuda":
        lines.append(
            "- CPU-specific: memory is the process's resident memory, not CUDA tensor memory; "
            "bitsandbytes dequantizes on the CPU for every matmul, so QLoRA's speed and memory "
            "here say little about a GPU. Paged optimizers (CUDA only) were not used.")
    if inp.base_dtype == "float32":
        lines.append("- The LoRA base computed in float32, not bf16: LoRA here is a "
                     "higher-precision reference than \"16-bit LoRA\" on a GPU.")
    if inp.model == SMOLLM2:
        lines.append("- The unquantized base is itself dequantized Q4_1 (GGUF), so the NF4 "
                     "error is measured on weights that were already rounded to 4 bits once.")
    return "\n".join(lines)
