"""The training runs a params set implies, the DVC stage that produces each, and what training
left on disk for them.

``dvc.yaml`` trains five families of runs (its ``train_*``, ``seeds_*``, ``modules_*``, ``control_*``
stages); this module is the one place that lists them for a :class:`~qlora_diag.core.config.Params`:

- rank sweep: LoRA and QLoRA at each rank of ``sweep.ranks``, targets ``lora.targets``, each
  setting seed (``seed`` and ``sweep.setting_seeds``), one stage instance per rank and method;
- noise floor: LoRA and QLoRA at rank ``lora.r``, targets ``lora.targets``, each ``sweep.seeds``
  (beyond the setting seeds the rank sweep trains there);
- module sweep: LoRA and QLoRA at rank ``lora.r``, each setting seed, each preset of
  ``sweep.targets`` (``lora.targets`` itself comes from the rank sweep);
- same-init control: LoRA and QLoRA at rank ``lora.r`` on ``lora.targets`` with the adapter init
  of ``seed`` and the batch order of the first of ``sweep.seeds`` (``control_*`` stages).

The per-rank and per-preset comparisons use the ``seed`` pair; the extra setting seeds are
trained (and checked here) for per-setting intervals.

The headline pair is (``lora.r``, ``lora.targets``, ``seed``). A missing or stale run is a
:class:`~qlora_diag.core.errors.UserError` that names the path and the stage to reproduce.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

from qlora_diag.compare.adapters import CONFIG_FILE, WEIGHTS_FILE
from qlora_diag.core.config import Params, headline_seeds, setting_seeds
from qlora_diag.core.errors import UserError
from qlora_diag.core.schemas import (
    CROSS_SEED,
    GENERATION_KEYS,
    NOISE_LORA,
    NOISE_QLORA,
    RUN_KEYS,
    SAME_SEED,
)
from qlora_diag.train.trainer import RunSpec


@dataclasses.dataclass(frozen=True)
class Pair:
    """A LoRA run and a QLoRA run that differ only in the base they were trained on."""

    lora: RunSpec
    qlora: RunSpec


@dataclasses.dataclass(frozen=True)
class AdapterPair:
    """Two adapters compared at the weight level; ``b`` is the reference of ``rel_frob``."""

    kind: str
    a: RunSpec
    b: RunSpec


def _pair(rank: int, targets: str, seed: int) -> Pair:
    return Pair(RunSpec("lora", rank, targets, seed), RunSpec("qlora", rank, targets, seed))


def headline_pair(p: Params) -> Pair:
    return _pair(p.lora.r, p.lora.targets, p.seed)


def rank_pairs(p: Params) -> dict[int, Pair]:
    """``{rank: pair}`` of the rank sweep (H3), ascending rank."""
    return {r: _pair(r, p.lora.targets, p.seed) for r in sorted(p.sweep.ranks)}


def preset_pairs(p: Params) -> dict[str, Pair]:
    """``{targets: pair}`` of the module sweep (H2): ``lora.targets`` first (its pair is the
    headline pair, trained by the rank sweep), then ``sweep.targets`` in their order."""
    presets = [p.lora.targets] + [t for t in p.sweep.targets if t != p.lora.targets]
    return {t: _pair(p.lora.r, t, p.seed) for t in presets}


def control_pair(p: Params) -> Pair:
    """The same-init control: the headline pair's init (``seed``), the data order (and dropout)
    of the first of ``sweep.seeds``."""
    d = p.sweep.seeds[0]
    return Pair(RunSpec("lora", p.lora.r, p.lora.targets, p.seed, d),
                RunSpec("qlora", p.lora.r, p.lora.targets, p.seed, d))


def noise_seeds(p: Params) -> list[int]:
    """The seeds of the runs at the headline setting: the main seed first, then
    ``sweep.setting_seeds``, then ``sweep.seeds``."""
    return list(dict.fromkeys(headline_seeds(p)))


def seed_runs(p: Params, method: str) -> list[RunSpec]:
    return [RunSpec(method, p.lora.r, p.lora.targets, s) for s in noise_seeds(p)]


def adapter_pairs(p: Params) -> list[AdapterPair]:
    """Every pair of adapters the weight-level comparison looks at, each once.

    - ``same_seed``: QLoRA vs LoRA with everything else equal (quantization alone), for every
      rank, every preset and every seed at rank ``lora.r``;
    - ``noise_lora`` / ``noise_qlora``: one method, two seeds (every unordered pair of
      :func:`noise_seeds`, the earlier seed as reference): the seed-to-seed noise floor;
    - ``cross_seed``: QLoRA of one seed vs LoRA of another (every ordered pair of distinct
      seeds), the apples-to-apples partner of the noise floor (both differ in seed).
    In LoRA-vs-QLoRA pairs ``a`` is the QLoRA run and the LoRA run is the reference ``b``.
    """
    out: list[AdapterPair] = []
    seen: set[tuple[str, str]] = set()

    def add(kind: str, a: RunSpec, b: RunSpec) -> None:
        if (a.name, b.name) not in seen:
            seen.add((a.name, b.name))
            out.append(AdapterPair(kind, a, b))

    for pair in (*rank_pairs(p).values(), *preset_pairs(p).values()):
        add(SAME_SEED, pair.qlora, pair.lora)
    seeds = noise_seeds(p)
    for s in seeds:
        pair = _pair(p.lora.r, p.lora.targets, s)
        add(SAME_SEED, pair.qlora, pair.lora)
    for method, kind in (("lora", NOISE_LORA), ("qlora", NOISE_QLORA)):
        for s1, s2 in itertools.combinations(seeds, 2):
            add(kind, RunSpec(method, p.lora.r, p.lora.targets, s2),
                RunSpec(method, p.lora.r, p.lora.targets, s1))
    for s_lora, s_qlora in itertools.permutations(seeds, 2):
        add(CROSS_SEED, RunSpec("qlora", p.lora.r, p.lora.targets, s_qlora),
            RunSpec("lora", p.lora.r, p.lora.targets, s_lora))
    return out


def all_runs(p: Params) -> list[RunSpec]:
    """Every run the params imply, each once (rank sweep, then the headline seeds, then
    presets, each setting's seeds in a row; then the same-init control)."""
    runs: dict[str, RunSpec] = {}
    per_setting = setting_seeds(p)
    pairs = [*(_pair(r, p.lora.targets, s) for r in sorted(p.sweep.ranks) for s in per_setting),
             *(_pair(p.lora.r, p.lora.targets, s) for s in noise_seeds(p)),
             *(_pair(p.lora.r, t, s) for t in p.sweep.targets for s in per_setting),
             control_pair(p)]
    for pair in pairs:
        runs.setdefault(pair.lora.name, pair.lora)
        runs.setdefault(pair.qlora.name, pair.qlora)
    return list(runs.values())


def producing_stage(spec: RunSpec, p: Params) -> str:
    """The ``dvc.yaml`` stage (with its matrix key) that trains ``spec``, e.g.
    ``train_qlora@8``, ``seeds_lora@3``, ``modules_qlora@kv``; one stage trains every setting
    seed of its setting; ``control_lora`` / ``control_qlora`` the same-init control."""
    if spec.data_seed != spec.seed:
        if spec == getattr(control_pair(p), spec.method):
            return f"control_{spec.method}"
        raise ValueError(f"producing_stage: run {spec.name} is not implied by these params")
    per_setting = setting_seeds(p)
    if spec.targets == p.lora.targets and spec.seed in per_setting and spec.rank in p.sweep.ranks:
        return f"train_{spec.method}@{spec.rank}"
    if spec.targets == p.lora.targets and spec.rank == p.lora.r and spec.seed in p.sweep.seeds:
        return f"seeds_{spec.method}@{spec.seed}"
    if spec.rank == p.lora.r and spec.seed in per_setting and spec.targets in p.sweep.targets:
        return f"modules_{spec.method}@{spec.targets}"
    raise ValueError(f"producing_stage: run {spec.name} is not implied by these params")


@dataclasses.dataclass(frozen=True)
class RunFiles:
    """Where training left one run: its adapter directory and its report directory."""

    spec: RunSpec
    adapter_dir: Path
    report_dir: Path
    stage: str

    def _missing(self, path: Path, what: str) -> UserError:
        return UserError(f"{path}: {what} of run {self.spec.name} not found; it is written by "
                         f"the stage `{self.stage}`: run `dvc repro {self.stage}` (or `dvc "
                         "repro` for the whole pipeline)")

    def check_adapter(self) -> Path:
        """The adapter directory, after checking PEFT's two files are there."""
        for path, what in ((self.adapter_dir, "the adapter directory"),
                           (self.adapter_dir / CONFIG_FILE, "the adapter config"),
                           (self.adapter_dir / WEIGHTS_FILE, "the adapter weights")):
            if not path.exists():
                raise self._missing(path, what)
        return self.adapter_dir

    def metrics(self) -> dict:
        """``run.json``, checked for every key of its schema
        (:data:`~qlora_diag.core.schemas.RUN_KEYS`) and for its run name."""
        path = self.report_dir / "run.json"
        if not self.report_dir.is_dir():
            raise self._missing(self.report_dir, "the report directory")
        if not path.is_file():
            raise self._missing(path, "the metrics file")
        try:
            run = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: not valid JSON ({exc}); re-create it with `dvc repro -f "
                            f"{self.stage}`") from None
        missing = [k for k in RUN_KEYS if not isinstance(run, dict) or k not in run]
        if missing:
            raise UserError(f"{path}: missing key(s) {', '.join(missing)}; it was written by an "
                            f"older or different training code: re-create it with `dvc repro -f "
                            f"{self.stage}`")
        if run["run"] != self.spec.name:
            raise UserError(f"{path}: holds run {run['run']!r}, expected {self.spec.name!r}; "
                            f"re-create it with `dvc repro -f {self.stage}`")
        return run

    def generations(self, eval_ids: list[str]) -> list[dict]:
        """``generations.jsonl``, checked to cover exactly the examples ``eval_ids`` in order
        (the first ``compare.n_generate`` eval examples, as training decodes them)."""
        path = self.report_dir / "generations.jsonl"
        if not path.is_file():
            raise self._missing(path, "the generations file")
        rows = []
        for lineno, line in enumerate(path.read_text().splitlines(), start=1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path} line {lineno}: not valid JSON ({exc.msg}); re-create "
                                f"it with `dvc repro -f {self.stage}`") from None
            missing = [k for k in GENERATION_KEYS if k not in row]
            if missing:
                raise UserError(f"{path} line {lineno}: missing key(s) {', '.join(missing)}; "
                                f"re-create it with `dvc repro -f {self.stage}`")
            rows.append(row)
        ids = [r["id"] for r in rows]
        if ids != eval_ids:
            raise UserError(f"{path}: holds {len(ids)} generations whose ids do not match the "
                            f"first {len(eval_ids)} eval examples (compare.n_generate) of the "
                            f"prepared eval split; the run is stale: `dvc repro {self.stage}`")
        return rows


def run_files(spec: RunSpec, p: Params, adapters_dir: Path, train_dir: Path) -> RunFiles:
    return RunFiles(spec, Path(adapters_dir) / spec.name, Path(train_dir) / spec.name,
                    producing_stage(spec, p))
