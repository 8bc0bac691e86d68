"""``reports/report.md`` and the README summary, written from one run's outputs.

:func:`~qlora_diag.report.inputs.read_inputs` reads every file the earlier stages wrote;
:func:`~qlora_diag.report.inputs.diagnose_inputs` hands the numbers to
:mod:`qlora_diag.report.verdicts`; :func:`render_report` and :func:`readme_summary` turn both
into markdown, one section at a time (:mod:`qlora_diag.report.sections`). Every number in the
text comes from those files; nothing is typed in here. Number formats are those of
:mod:`qlora_diag.core.numbers`.
"""
from __future__ import annotations

from qlora_diag.core import numbers as fmt
from qlora_diag.core.config import Params
from qlora_diag.data.overlap import exact_match_applies
from qlora_diag.report.inputs import ReportInputs
from qlora_diag.report.sections.answers import section_answers, section_tasks_for_source
from qlora_diag.report.sections.diagnosis import (
    FIGURE_CAPTIONS,
    section_failures,
    section_figures,
    section_verdicts,
)
from qlora_diag.report.sections.memory import (
    section_accounting,
    section_efficiency,
    section_memory,
)
from qlora_diag.report.sections.overview import (
    section_caveats,
    section_headline,
    section_setup,
    section_summary,
)
from qlora_diag.report.sections.quality import (
    section_base,
    section_modules,
    section_paired_gaps,
    section_quality,
    section_ranks,
    section_tasks,
    section_transfer,
)
from qlora_diag.report.sections.quantization import section_quant
from qlora_diag.report.sections.weights import (
    section_alignment,
    section_layers,
    section_noise,
)
from qlora_diag.report.tables import md_table
from qlora_diag.report.verdicts import Diagnosis

# The report's sections in order; render_report writes one `## <name>` each.
SECTIONS = (
    "Summary", "Setup", "Headline numbers", "Paired gaps", "Memory per rank", "Memory accounting",
    "Quality per rank", "Training efficiency", "Noise floor", "Weight similarity per layer",
    "Does the QLoRA adapter undo the quantization error?", "Module sensitivity",
    "Rank threshold", "Quantization error", "Transfer check", "Base model reference",
    "Exact match per task family", "Answer measures by data source", "Figures", "Verdicts",
    "Failure modes", "Caveats",
)


def render_report(inputs: ReportInputs, diagnosis: Diagnosis, params: Params,
                  figure_dir: str = "figures") -> str:
    """The whole ``reports/report.md``; figure links are relative to ``figure_dir``."""
    inp, p, diag = inputs, params, diagnosis
    bodies = {
        "Summary": section_summary(inp, p, diag),
        "Setup": section_setup(inp, p),
        "Headline numbers": section_headline(inp, p),
        "Paired gaps": section_paired_gaps(inp),
        "Memory per rank": section_memory(inp),
        "Memory accounting": section_accounting(inp, p),
        "Quality per rank": section_quality(inp, p),
        "Training efficiency": section_efficiency(inp, p),
        "Noise floor": section_noise(inp),
        "Weight similarity per layer": section_layers(inp),
        "Does the QLoRA adapter undo the quantization error?": section_alignment(inp),
        "Module sensitivity": section_modules(inp, p, diag),
        "Rank threshold": section_ranks(inp, p, diag),
        "Quantization error": section_quant(inp),
        "Transfer check": section_transfer(inp),
        "Base model reference": section_base(inp),
        "Exact match per task family": section_tasks_for_source(inp, section_tasks(inp)),
        "Answer measures by data source": section_answers(inp, p),
        "Figures": section_figures(figure_dir),
        "Verdicts": section_verdicts(diag),
        "Failure modes": section_failures(diag),
        "Caveats": section_caveats(inp, p),
    }
    title = (f"# When does QLoRA match LoRA? Diagnosis of `{inp.model}` on "
             f"`{inp.data['source']}`")
    parts = [title, "Written by the `plot` stage from this run's `reports/` files; every number "
                    "below comes from them."]
    parts += [f"## {name}\n\n{bodies[name]}" for name in SECTIONS]
    return "\n\n".join(parts) + "\n"


def readme_summary(inputs: ReportInputs, diagnosis: Diagnosis, params: Params,
                   figure_dir: str = "reports/figures") -> str:
    """A short markdown block for README.md: headline table, verdict lines, two figures."""
    m, p = inputs.metrics, params
    rows = [
        [f"eval loss (nats/token, mean over {inputs.n_seeds} seeds)",
         fmt.loss(inputs.seed_mean("lora", "eval_loss")),
         fmt.loss(inputs.seed_mean("qlora", "eval_loss"))],
        [f"exact match (mean over {inputs.n_seeds} seeds)",
         fmt.pct(inputs.seed_mean("lora", "exact_match")),
         fmt.pct(inputs.seed_mean("qlora", "exact_match"))]
        if exact_match_applies(inputs.data["source"]) else  # free-form: chrF instead
        [f"chrF vs reference (mean over {inputs.n_seeds} seeds)",
         fmt.fixed(inputs.seed_mean("lora", "chrf"), 1),
         fmt.fixed(inputs.seed_mean("qlora", "chrf"), 1)],
        ["weights (MB)", fmt.mb(m["weights_mb_lora"]), fmt.mb(m["weights_mb_qlora"])],
        ["training peak (MB)", fmt.mb(m["peak_mem_mb_lora"]), fmt.mb(m["peak_mem_mb_qlora"])],
        ["tokens per second", fmt.fixed(m["tokens_per_s_lora"], 1),
         fmt.fixed(m["tokens_per_s_qlora"], 1)],
    ]
    verdict_lines = [f"- **{v.hypothesis}: {v.status}** ({v.primary['decision']}). {v.summary}"
                     for v in (diagnosis.h1, diagnosis.h2, diagnosis.h3)]
    return "\n".join([
        f"**`{inputs.model}`, rank {p.lora.r} on `{p.lora.targets}`, {inputs.n_seeds} paired "
        f"seeds. Eval loss: {inputs.paired.headline_loss.label}.** "
        f"{inputs.paired.headline_loss.analysis.sentence}"
        + ("" if inputs.paired.headline_em is None else
           f" **Exact match: {inputs.paired.headline_em.label}.** "
           f"{inputs.paired.headline_em.analysis.sentence}"),
        "",
        md_table(["", "LoRA", "QLoRA"], rows),
        "",
        *verdict_lines,
        "",
        f"![{FIGURE_CAPTIONS['rank_threshold.png']}]({figure_dir}/rank_threshold.png)",
        f"![{FIGURE_CAPTIONS['memory.png']}]({figure_dir}/memory.png)",
        "",
        f"Training peak: {inputs.memory_measure}. Full diagnosis with every table, the rules "
        "and the failure modes: "
        "[reports/report.md](reports/report.md).",
    ]) + "\n"
