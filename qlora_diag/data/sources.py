"""Data sources: read ``data.source`` into checked Alpaca records, and the Alpaca prompt format.

Sources: ``embedded:probe`` (:mod:`qlora_diag.data.probe`), a local Alpaca ``.json`` (a list of
objects) or ``.jsonl`` (one object per line) file, or a Hugging Face data set id. Bad input
becomes one :class:`~qlora_diag.core.errors.UserError` paragraph naming the file, line and key.
Splitting and tokenizing the records is :mod:`qlora_diag.data.splits`.
"""
from __future__ import annotations

import json
from pathlib import Path

from qlora_diag.core.errors import UserError
from qlora_diag.data.probe import generate_probe

PROBE = "embedded:probe"
SOURCE_KINDS = ("embedded:probe, a local Alpaca-format .json (a list of objects) or .jsonl "
                "(one object per line) file, or a Hugging Face data set id such as "
                "tatsu-lab/alpaca")
ALPACA_KEYS = "instruction (string), output (non-empty string), input (string, optional), " \
              "task (string, optional)"
DEFAULT_TASK = "alpaca"

# Stanford Alpaca's templates, verbatim (github.com/tatsu-lab/stanford_alpaca, train.py).
PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def format_prompt(instruction: str, input: str) -> str:  # noqa: A002 -- Alpaca's field name
    """The Alpaca prompt, with the Input section only when ``input`` is non-empty."""
    if input.strip():
        return PROMPT_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def load_examples(source: str, n_needed: int, seed: int) -> list[dict]:
    """Records ``{instruction, input, output, task}`` from ``source``.

    ``n_needed`` and ``seed`` only matter for ``embedded:probe``, which generates exactly
    ``n_needed`` examples from ``seed``; file and hub sources return all their records.
    """
    if source == PROBE:
        return generate_probe(n_needed, seed)
    if source.startswith("embedded:"):
        raise UserError(f"data.source = {source!r}: unknown embedded data set; valid sources: "
                        f"{SOURCE_KINDS}")
    if source.endswith(".jsonl"):
        return _load_jsonl(Path(source))
    if source.endswith(".json"):
        return _load_json(Path(source))
    return _load_hub(source)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"data.source = {str(path)!r}: file not found; give an existing file "
                        f"(paths are relative to the repository root) or another source: "
                        f"{SOURCE_KINDS}") from None
    except IsADirectoryError:
        raise UserError(f"data.source = {str(path)!r}: is a directory, not a .json/.jsonl "
                        "file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"data.source = {str(path)!r}: cannot read the file ({exc}); it must "
                        "be a readable UTF-8 text file") from None


def _load_jsonl(path: Path) -> list[dict]:
    records = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} line {lineno}: not valid JSON ({exc.msg} at column "
                            f"{exc.colno}); a .jsonl file holds one JSON object per line with "
                            f"keys {ALPACA_KEYS}") from None
        records.append(_check_record(obj, f"{path} line {lineno}"))
    if not records:
        raise UserError(f"{path}: holds no records; a .jsonl file needs one JSON object per line "
                        f"with keys {ALPACA_KEYS}")
    return records


def _load_json(path: Path) -> list[dict]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} line {exc.lineno} column {exc.colno}: not valid JSON "
                        f"({exc.msg}); a .json source holds a list of objects with keys "
                        f"{ALPACA_KEYS}") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: the top level is a {type(data).__name__}, not a list; a .json "
                        f"source holds a list of objects with keys {ALPACA_KEYS} (one object "
                        "per line is the .jsonl format)")
    if not data:
        raise UserError(f"{path}: the list is empty; it needs objects with keys {ALPACA_KEYS}")
    # json gives no line numbers per element, so records are named by their 1-based position.
    return [_check_record(obj, f"{path} record {i}") for i, obj in enumerate(data, start=1)]


def _load_hub(source: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(source, split="train")
    except (OSError, ValueError) as exc:  # ConnectionError, DatasetNotFoundError are OSErrors
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise UserError(
            f"data.source = {source!r}: could not load it as a Hugging Face data set with a "
            f"'train' split ({reason}). This machine may be offline (HF_DATASETS_OFFLINE / "
            f"HF_HUB_OFFLINE), or the id is wrong. Valid sources: {SOURCE_KINDS}.") from None
    missing = [k for k in ("instruction", "output") if k not in ds.column_names]
    if missing:
        raise UserError(f"data.source = {source!r}: the data set has no column "
                        f"{', '.join(missing)} (columns: {', '.join(ds.column_names)}); an "
                        f"Alpaca-format data set has {ALPACA_KEYS}")
    # A hub data set cannot be edited by the user, so records with an empty answer are skipped
    # rather than failing the run; n_available in the stats counts only the usable records.
    return [_check_record(row, f"{source} row {i}") for i, row in enumerate(ds, start=1)
            if isinstance(row.get("output"), str) and row["output"].strip()]


def _check_record(obj: object, where: str) -> dict:
    """One Alpaca record, checked; ``where`` names it in errors ("file line 3")."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: is a {type(obj).__name__}, not a JSON object; each record "
                        f"needs keys {ALPACA_KEYS}")
    for key in ("instruction", "output"):
        if key not in obj:
            raise UserError(f"{where}: missing key {key!r}; each record needs {ALPACA_KEYS}")
    for key in ("instruction", "output", "input", "task"):
        if key in obj and not isinstance(obj[key], str):
            raise UserError(f"{where}: key {key!r} is a {type(obj[key]).__name__} "
                            f"({json.dumps(obj[key])[:60]}), not a string; each record needs "
                            f"{ALPACA_KEYS}")
    if not obj["instruction"].strip():
        raise UserError(f"{where}: key 'instruction' is empty; every record needs an instruction")
    if not obj["output"].strip():
        raise UserError(f"{where}: key 'output' is empty; every record needs the answer the "
                        "model should learn (remove the record or fill in its output)")
    task = obj.get("task", DEFAULT_TASK)
    if not task.strip():
        raise UserError(f"{where}: key 'task' is empty; leave it out (defaults to "
                        f"{DEFAULT_TASK!r}) or give a label")
    return {"instruction": obj["instruction"], "input": obj.get("input", ""),
            "output": obj["output"], "task": task}
