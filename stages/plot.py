"""Stage `plot`: figures, verdicts and the written report from the compare stage's numbers.

Writes reports/figures/*.png, reports/verdicts.json and reports/report.md, and prints the
verdict lines.
"""
from qlora_diag.core.cli import exit_quietly_while_loading

exit_quietly_while_loading()  # first: Ctrl-C while the imports below load exits 130 quietly

from pathlib import Path

from qlora_diag.core.atomic import atomic_dir, write_json, write_text
from qlora_diag.core.cli import run_stage
from qlora_diag.core.config import load_params
from qlora_diag.report.figures import load_loss_curves, make_figures
from qlora_diag.report.inputs import diagnose_inputs, read_inputs
from qlora_diag.report.markdown import render_report
from qlora_diag.report.paired import gap_table

REPORTS = Path("reports")


def main() -> None:
    params = load_params("params.yaml")
    inputs = read_inputs(REPORTS, params)
    diagnosis = diagnose_inputs(inputs, params)
    m = inputs.metrics
    with atomic_dir(REPORTS / "figures") as tmp:
        make_figures(out_dir=tmp, ranks=inputs.ranks, modules=inputs.modules,
                     layers=inputs.layers, quant_table=inputs.quant_table,
                     curves=load_loss_curves(inputs.run_dirs, inputs.runs),
                     rank_gaps=gap_table(inputs.paired.per_rank, "rank"),
                     preset_gaps=gap_table(inputs.paired.per_preset, "targets"),
                     margin=params.compare.margin,
                     cos_threshold=params.compare.cos_threshold,
                     noise_floor_cos_sim=m["noise_floor_cos_sim"],
                     memory_measure=inputs.memory_measure, lora_r=params.lora.r)
    write_json(REPORTS / "verdicts.json", diagnosis.to_json())
    write_text(REPORTS / "report.md", render_report(inputs, diagnosis, params, "figures"))
    for line in diagnosis.lines():
        print(line)
    print(f"plot: wrote {REPORTS / 'report.md'}, {REPORTS / 'verdicts.json'} and "
          f"{REPORTS / 'figures'}/")


if __name__ == "__main__":
    run_stage(main)
