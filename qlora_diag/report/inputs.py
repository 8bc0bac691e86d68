"""Reading the plot stage's inputs: every file the earlier stages wrote, checked against its
schema (:mod:`qlora_diag.core.schemas`; a missing file, column or key is a UserError naming the
file and what is missing), into one :class:`ReportInputs`, and the verdicts on them
(:func:`diagnose_inputs`)."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pandas as pd

from qlora_diag.core.config import Params, headline_seeds, run_name, setting_seeds
from qlora_diag.core.errors import UserError
from qlora_diag.core.schemas import (
    DATA_KEYS,
    DATA_SPLIT_KEYS,
    DATA_SPLITS,
    EXAMPLE_KEYS,
    FLOORS_COLUMNS,
    GENERATION_KEYS,
    HEADLINE_KEYS,
    LAYERS_COLUMNS,
    METRICS_KEYS,
    MODULES_COLUMNS,
    PAIRS_COLUMNS,
    QUANTIZATION_COLUMNS,
    QUANTIZATION_KEYS,
    RANKS_COLUMNS,
    RUN_KEYS,
    SETUP_KEYS,
    SETUP_NESTED_KEYS,
)
from qlora_diag.data.overlap import exact_match_applies
from qlora_diag.report.evidence import max_length_rate
from qlora_diag.report.paired import PairedEvidence, build_paired_evidence
from qlora_diag.report.verdicts import Diagnosis, diagnose


@dataclasses.dataclass
class ReportInputs:
    """Everything the report, the figures and the verdicts read, as loaded from disk."""

    metrics: dict                     # metrics.json and compare/headline.json, nan for null
    ranks: pd.DataFrame
    modules: pd.DataFrame
    layers: pd.DataFrame
    pairs: pd.DataFrame
    quant_table: pd.DataFrame
    quant: dict
    data: dict
    setup: dict
    headline: dict[str, str]          # method -> run name at (lora.r, lora.targets, seed)
    seed_runs: dict[str, list[str]]   # method -> run names of every seed at lora.r
    runs: dict[str, dict]             # run name -> run.json
    run_dirs: dict[str, Path]         # run name -> reports/train/<run>
    no_stop_rate: dict[str, float]    # method -> share of outputs hitting max_new_tokens
    paired: PairedEvidence            # every paired comparison, from the examples.jsonl files
    floors: pd.DataFrame | None       # compare/floors.csv, None when absent (older runs)
    transfer: dict | None             # compare/transfer.json, None when absent

    @property
    def paired_seed(self) -> int:
        """The main seed: seeds the bootstrap and permutation streams of every test."""
        return int(self.paired.seed_table["seed"].iloc[0])

    @property
    def memory_measure(self) -> str:
        return self.runs[self.headline["lora"]]["memory_measure"]

    @property
    def n_seeds(self) -> int:
        return len(self.seed_runs["lora"])

    @property
    def model(self) -> str:
        return self.setup["model"]["source"]

    @property
    def base_dtype(self) -> str:
        return self.setup["dtypes"]["base"]

    @property
    def compute_dtype(self) -> str:
        return self.setup["dtypes"]["quant_compute"]

    def headline_run(self, method: str) -> dict:
        """``run.json`` of the headline-seed run of ``method`` (``lora`` / ``qlora``)."""
        return self.runs[self.headline[method]]

    def seed_mean(self, method: str, key: str) -> float:
        """Mean of ``run.json[key]`` over the seed runs of ``method`` at rank lora.r."""
        return sum(float(self.runs[n][key]) for n in self.seed_runs[method]) / self.n_seeds


def _need(path: Path) -> Path:
    if not path.exists():
        raise UserError(f"{path}: not found; it is written by an earlier stage, so run "
                        "`dvc repro` (the plot stage reads it)")
    return path


def _read_json(path: Path, keys: tuple[str, ...]) -> dict:
    try:
        obj = json.loads(_need(path).read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno}); re-create it "
                        "with `dvc repro -f` of the stage that writes it") from None
    missing = [k for k in keys if k not in obj]
    if missing:
        raise UserError(f"{path}: missing key(s) {', '.join(missing)}; the stage that writes it "
                        "and the report disagree on its contract")
    return obj


def _read_csv(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    df = pd.read_csv(_need(path))
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)} (has "
                        f"{', '.join(df.columns)}); the stage that writes it and the report "
                        "disagree on its contract")
    if df.empty:
        raise UserError(f"{path}: has no rows")
    return df


def _check_nested(path: Path, obj: dict, nested: dict[str, tuple[str, ...]]) -> None:
    """``obj[key]`` holds every key of ``nested[key]``."""
    for key, inner in nested.items():
        missing = [k for k in inner if not isinstance(obj[key], dict) or k not in obj[key]]
        if missing:
            raise UserError(f"{path}: {key} lacks key(s) {', '.join(missing)}; the stage that "
                            "writes it and the report disagree on its contract")


def _read_setup(path: Path) -> dict:
    setup = _read_json(path, SETUP_KEYS)
    _check_nested(path, setup, SETUP_NESTED_KEYS)
    return setup


def _read_data(path: Path) -> dict:
    data = _read_json(path, DATA_KEYS)
    _check_nested(path, data, {"splits": DATA_SPLITS})
    _check_nested(path, data["splits"], {split: DATA_SPLIT_KEYS for split in DATA_SPLITS})
    return data


def _read_jsonl(path: Path, keys: tuple[str, ...]) -> list[dict]:
    rows = []
    for lineno, line in enumerate(_need(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} line {lineno}: not valid JSON ({exc.msg}); re-create it "
                            "with `dvc repro -f` of the stage that writes it") from None
        missing = [k for k in keys if not isinstance(row, dict) or k not in row]
        if missing:
            raise UserError(f"{path} line {lineno}: missing key(s) {', '.join(missing)}; the "
                            "stage that writes it and the report disagree on its contract")
        rows.append(row)
    return rows


def _read_headline_numbers(reports: Path) -> dict:
    """metrics.json and compare/headline.json as one flat dict. JSON has no nan: the compare
    stage writes an undefined number (e.g. no step timed in a tiny run) as null; here it
    becomes nan again and prints as "n/a"."""
    metrics = _read_json(reports / "metrics.json", METRICS_KEYS)
    headline = _read_json(reports / "compare" / "headline.json", HEADLINE_KEYS)
    numbers = {k: metrics[k] for k in METRICS_KEYS} | {k: headline[k] for k in HEADLINE_KEYS}
    return {k: math.nan if v is None else v for k, v in numbers.items()}


def all_runs(params: Params) -> list[str]:
    """Every run the paired comparisons read, as dvc.yaml trains them: the headline seeds at
    lora.r on lora.targets, and every rank and preset at the setting seeds (seed and
    sweep.setting_seeds). The same-init control runs are not paired comparisons."""
    per_setting = setting_seeds(params)
    cells = ({(params.lora.r, params.lora.targets, s) for s in headline_seeds(params)}
             | {(r, params.lora.targets, s) for r in params.sweep.ranks for s in per_setting}
             | {(params.lora.r, t, s) for t in params.sweep.targets for s in per_setting})
    return [run_name(m, r, t, s) for r, t, s in sorted(cells) for m in ("lora", "qlora")]


def paired_evidence(examples: dict[str, list[dict]], params: Params,
                    source: str) -> PairedEvidence:
    """:func:`~qlora_diag.report.paired.build_paired_evidence` with the params' settings;
    ``source``: the data source prepare read (reports/data.json), which decides whether exact
    match is a measure at all."""
    return build_paired_evidence(
        examples, seed=params.seed, sweep_seeds=params.sweep.seeds,
        setting_seeds=params.sweep.setting_seeds, lora_r=params.lora.r,
        exact_match_applies=exact_match_applies(source),
        lora_targets=params.lora.targets, ranks=params.sweep.ranks,
        presets=params.sweep.targets, margin=params.compare.margin,
        margin_exact_match=params.compare.margin_exact_match, n_boot=params.compare.n_boot)


def run_sets(params: Params) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(headline run per method, every seed run per method at rank lora.r, main seed first)."""
    seeds = headline_seeds(params)
    headline = {m: run_name(m, params.lora.r, params.lora.targets, params.seed)
                for m in ("lora", "qlora")}
    seed_runs = {m: [run_name(m, params.lora.r, params.lora.targets, s) for s in seeds]
                 for m in ("lora", "qlora")}
    return headline, seed_runs


def read_inputs(reports: Path, params: Params) -> ReportInputs:
    """Read the outputs under ``reports`` (the repository's ``reports/``) for ``params``."""
    reports = Path(reports)
    headline, seed_runs = run_sets(params)
    names = [n for m in ("lora", "qlora") for n in seed_runs[m]]
    run_dirs = {n: reports / "train" / n for n in names}
    runs = {n: _read_json(d / "run.json", RUN_KEYS) for n, d in run_dirs.items()}
    gens = {n: _read_jsonl(d / "generations.jsonl", GENERATION_KEYS) for n, d in run_dirs.items()}
    examples = {n: _read_jsonl(reports / "train" / n / "examples.jsonl", EXAMPLE_KEYS)
                for n in all_runs(params)}
    floors_path = reports / "compare" / "floors.csv"
    floors = _read_csv(floors_path, FLOORS_COLUMNS) if floors_path.exists() else None
    transfer_path = reports / "compare" / "transfer.json"
    transfer = _read_json(transfer_path, ("cases",)) if transfer_path.exists() else None
    data = _read_data(reports / "data.json")
    max_new_tokens = data["max_new_tokens"]["value"]  # compare.max_new_tokens as prepare resolved it
    no_stop = {m: max_length_rate([r for n in seed_runs[m] for r in gens[n]],
                                  max_new_tokens) for m in ("lora", "qlora")}
    metrics = _read_headline_numbers(reports)
    ranks = _read_csv(reports / "ranks.csv", RANKS_COLUMNS).sort_values("rank", ignore_index=True)
    return ReportInputs(
        metrics=metrics, ranks=ranks,
        modules=_read_csv(reports / "modules.csv", MODULES_COLUMNS),
        layers=_read_csv(reports / "layers.csv", LAYERS_COLUMNS),
        pairs=_read_csv(reports / "compare" / "pairs.csv", PAIRS_COLUMNS),
        quant_table=_read_csv(reports / "quantization.csv", QUANTIZATION_COLUMNS),
        quant=_read_json(reports / "quantization.json", QUANTIZATION_KEYS),
        data=data,
        setup=_read_setup(reports / "compare" / "setup.json"),
        headline=headline, seed_runs=seed_runs, runs=runs, run_dirs=run_dirs,
        no_stop_rate=no_stop, paired=paired_evidence(examples, params, data["source"]),
        floors=floors,
        transfer=transfer)


def diagnose_inputs(inputs: ReportInputs, params: Params) -> Diagnosis:
    """:func:`qlora_diag.report.verdicts.diagnose` on the loaded inputs."""
    return diagnose(
        paired=inputs.paired, floors=inputs.floors, metrics=inputs.metrics, ranks=inputs.ranks,
        modules=inputs.modules, layers=inputs.layers, transfer=inputs.transfer,
        # train.gradient_checkpointing applies to both methods: QLoRA never has it alone
        gradient_checkpointing=False,
        no_stop_rate_lora=inputs.no_stop_rate["lora"],
        no_stop_rate_qlora=inputs.no_stop_rate["qlora"],
        reference_tokens_p95=float(inputs.data["splits"]["eval"]["tokens"]["response"]["p95"]),
        memory_measure=inputs.memory_measure, cos_threshold=params.compare.cos_threshold,
        lora_targets=params.lora.targets, max_new_tokens=inputs.data["max_new_tokens"]["value"],
        rng_seed=params.seed)
