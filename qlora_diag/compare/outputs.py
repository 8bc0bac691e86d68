"""Writing the comparison: ``reports/metrics.json`` (the DVC metrics), ``reports/{ranks,modules,
layers}.csv`` and ``reports/compare/`` (the other tables, the noise floors, the headline numbers beyond the
metrics, base reference, transfer check, setup, the cases' generations and per-example
records), plus the stage's
console summary. Columns and keys follow :mod:`qlora_diag.core.schemas`.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from qlora_diag.compare.run import ComparePaths, CompareResult
from qlora_diag.core import numbers as fmt
from qlora_diag.core.atomic import atomic_dir, atomic_file, write_json
from qlora_diag.core.examples import write_examples
from qlora_diag.core.schemas import FLOOR_KINDS, TRANSFER_CASES, split_headline


def _write_csv(path: Path, df: pd.DataFrame) -> None:
    with atomic_file(path) as fh:
        df.to_csv(fh, index=False, float_format="%.6g")


def write_outputs(result: CompareResult, paths: ComparePaths) -> None:
    """Write everything atomically: ``reports/compare/`` as one directory, then the CSVs and
    ``metrics.json`` (last, so a metrics file always has its tables next to it)."""
    metrics, headline = split_headline(result.metrics)
    with atomic_dir(paths.compare_dir) as tmp:
        result.pairs.to_csv(tmp / "pairs.csv", index=False, float_format="%.6g")
        result.per_task.to_csv(tmp / "per_task.csv", index=False, float_format="%.6g")
        result.function.to_csv(tmp / "function.csv", index=False, float_format="%.6g")
        result.seeds.to_csv(tmp / "seeds.csv", index=False, float_format="%.6g")
        result.floors.to_csv(tmp / "floors.csv", index=False, float_format="%.6g")
        result.function_floors.to_csv(tmp / "function_floors.csv", index=False,
                                      float_format="%.6g")
        for name, obj in (("headline", headline), ("base", result.base),
                          ("transfer", result.transfer), ("setup", result.setup)):
            (tmp / f"{name}.json").write_text(json.dumps(fmt.json_safe(obj), indent=2) + "\n")
        (tmp / "generations").mkdir()
        for case, rows in result.generations.items():
            with open(tmp / "generations" / f"{case}.jsonl", "w") as fh:
                for row in rows:
                    fh.write(json.dumps(row) + "\n")
        (tmp / "examples").mkdir()
        for case, rows in result.examples.items():
            write_examples(tmp / "examples" / f"{case}.jsonl", rows)
    _write_csv(paths.reports_dir / "ranks.csv", result.ranks)
    _write_csv(paths.reports_dir / "modules.csv", result.modules)
    _write_csv(paths.reports_dir / "layers.csv", result.layers)
    write_json(paths.reports_dir / "metrics.json", fmt.json_safe(metrics))


def summary_lines(result: CompareResult) -> list[str]:
    """One line per rank, then the headline with its noise floor, the weight-level floors by
    kind and the transfer check."""
    lines = []
    for row in result.ranks.itertuples():
        lines.append(f"r={row.rank:<3} eval_loss lora {row.eval_loss_lora:.4f} qlora "
                     f"{row.eval_loss_qlora:.4f} (gap {row.eval_loss_gap:+.4f})  "
                     f"token match {row.token_match_rate:.3f}  KL {row.kl_mean:.4f}  "
                     f"hidden cos {row.hidden_cos_sim:.4f}  cos(ΔW) {row.cos_sim_mean:.3f}")
    m = result.metrics
    lines.append(f"headline r={m['rank']}: eval_loss_gap {m['eval_loss_gap']:+.4f} over "
                 f"{m['n_seeds']} seed(s) (seed spread {fmt.fixed(m['eval_loss_seed_spread'], 4)}"
                 f"); cos(ΔW) {m['cos_sim_mean']:.3f} vs noise floor "
                 f"{fmt.fixed(m['noise_floor_cos_sim'], 4)}; base loss "
                 f"{m['base_eval_loss']:.4f} -> {m['base_eval_loss_quantized']:.4f} quantized")
    by_kind = result.floors.groupby("kind")["cos_sim_mean"].mean()
    lines.append("cos(ΔW) floors, mean over pairs: " + "  ".join(
        f"{kind} {by_kind[kind]:.3f}" for kind in FLOOR_KINDS if kind in by_kind))
    lines.append("transfer: " + "  ".join(
        f"{c} loss {m[f'transfer_{c}_eval_loss']:.4f} em {m[f'transfer_{c}_exact_match']:.3f}"
        for c in TRANSFER_CASES))
    return lines
