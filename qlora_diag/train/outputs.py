"""What a finished training run writes: its adapter directory and its report directory.

Both are DVC outputs, written atomically (a killed run leaves no finished-looking output) and
byte-identical for two identical runs in the same directory, so DVC sees an unchanged output and
leaves every stage downstream cached.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from qlora_diag.core.atomic import atomic_dir, write_json
from qlora_diag.core.examples import write_examples

ADAPTER_CONFIG = "adapter_config.json"


def save_adapter(model, out_dir: Path, base_reference: str) -> None:
    """``save_pretrained`` of the PEFT ``model``, with ``base_reference`` (see
    :func:`qlora_diag.models.loading.base_model_reference`) recorded as the base in
    ``adapter_config.json`` (``base_model_name_or_path``), so that
    ``peft.AutoPeftModelForCausalLM.from_pretrained(out_dir)`` loads the base the adapter was
    trained on, and in the model card (``base_model``, which PEFT takes from the base model's
    config). The config file is rewritten after saving rather than the PEFT config changed
    before: ``save_pretrained`` looks the base up by that name to check for a resized
    vocabulary, which for a hub id would be a network request.

    The config's set-valued fields (``target_modules``) are written as sorted lists: PEFT writes
    ``list(set)``, whose order follows the per-process string-hash seed, so identical runs would
    write different bytes and DVC would see a changed output and rerun every stage downstream.
    """
    model.get_base_model().config.name_or_path = base_reference
    model.save_pretrained(out_dir)
    path = Path(out_dir) / ADAPTER_CONFIG
    saved = json.loads(path.read_text())
    for key, value in vars(model.peft_config["default"]).items():
        if isinstance(value, (set, frozenset)) and key in saved:
            saved[key] = sorted(value)
    saved["base_model_name_or_path"] = base_reference
    path.write_text(json.dumps(saved, indent=2, sort_keys=True))


def write_adapter(model, out_dir: Path, base_reference: str) -> None:
    """:func:`save_adapter` into ``out_dir``, atomically."""
    with atomic_dir(out_dir) as tmp:
        save_adapter(model, tmp, base_reference)


def write_run_report(report_dir: Path, live_dir: Path, metrics: dict, generations: list[dict],
                     examples: list[dict]) -> None:
    """``report_dir``: the run's dvclive directory (curves, summary, params), ``run.json`` (the
    run's metrics), ``generations.jsonl`` (one greedy answer per line) and ``examples.jsonl``
    (per eval example: nll sum, tokens, exact match; :mod:`qlora_diag.core.examples`),
    atomically."""
    with atomic_dir(report_dir) as tmp:
        shutil.copytree(live_dir, tmp, dirs_exist_ok=True)
        write_json(tmp / "run.json", metrics)
        with open(tmp / "generations.jsonl", "w") as fh:
            for row in generations:
                fh.write(json.dumps(row) + "\n")
        write_examples(tmp / "examples.jsonl", examples)
