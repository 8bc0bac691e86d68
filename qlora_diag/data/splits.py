"""Splits: split the records, tokenize them with a response-only mask, write and read splits.

A prepared split is a JSON-lines file; each line holds ``id, task, instruction, input, output,
prompt, input_ids, n_prompt, truncated``. The loss is taken on positions ``>= n_prompt`` only
(the response and its eos token), so the adapters learn to answer, not to copy the template.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np

from qlora_diag.core.atomic import atomic_dir
from qlora_diag.core.errors import UserError
from qlora_diag.data.sources import format_prompt, load_examples

SPLITS = ("train", "eval")


def split_examples(examples: list[dict], n_train: int, n_eval: int,
                   seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval): a seeded shuffle, stratified by ``task`` for the eval split.

    The eval split takes examples from the tasks in turn (each task's examples in seeded
    random order), so per-task exact match rests on ~n_eval / n_tasks examples per task rather
    than on whatever a plain shuffle happens to give (5 to 14 of 96 on the probe set); with a
    single task (e.g. Alpaca) this is a plain seeded shuffle. Train = the next ``n_train`` of the
    remaining examples in seeded random order.

    Each example gets ``id`` = its 0-based position in the source (zero-padded), stable as
    long as the source is; the input list is not modified.
    """
    if n_train + n_eval > len(examples):
        raise UserError(f"data.n_train + data.n_eval = {n_train} + {n_eval} = "
                        f"{n_train + n_eval} examples are needed, but data.source provides only "
                        f"{len(examples)}: lower data.n_train or data.n_eval, or use a larger "
                        "data set")
    width = max(6, len(str(len(examples))))
    rng = random.Random(seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    by_task: dict[str, list[int]] = {}
    for i in order:
        by_task.setdefault(examples[i]["task"], []).append(i)
    queues = [by_task[t] for t in sorted(by_task)]
    eval_idx: list[int] = []
    while len(eval_idx) < n_eval:
        for q in queues:
            if q and len(eval_idx) < n_eval:
                eval_idx.append(q.pop(0))
    taken = set(eval_idx)
    train_idx = [i for i in order if i not in taken][:n_train]

    def tag(i: int) -> dict:
        return {"id": f"{i:0{width}d}", **examples[i]}

    return [tag(i) for i in train_idx], [tag(i) for i in eval_idx]


def tokenize_example(example: dict, tokenizer, max_length: int) -> dict | None:
    """``{input_ids, n_prompt, truncated}`` for one example, or None if the prompt alone fills
    ``max_length`` (no response token would remain to learn from).

    Prompt and response are tokenized separately, so the mask boundary ``n_prompt`` is exact
    (no merge across it), with ``add_special_tokens=False``. The SmolLM2 tokenizer adds no BOS
    by itself (``add_bos_token`` is False, checked: ``tok("Hi")`` == ``tok("Hi",
    add_special_tokens=False)``), and the model was trained without one, so none is added here
    either. ``eos_token_id`` (``<|im_end|>``) follows the response so the model learns to stop;
    a truncated response loses it, because it did not end there.
    """
    prompt_ids = tokenizer(format_prompt(example["instruction"], example["input"]),
                           add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(example["output"], add_special_tokens=False)["input_ids"]
    response_ids = response_ids + [tokenizer.eos_token_id]
    room = max_length - len(prompt_ids)
    if room < 1:
        return None
    truncated = len(response_ids) > room
    return {"input_ids": prompt_ids + response_ids[:room], "n_prompt": len(prompt_ids),
            "truncated": truncated}


def _length_stats(values: list[int]) -> dict:
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p95": 0.0, "max": 0}
    arr = np.asarray(values)
    return {"mean": round(float(arr.mean()), 2), "p50": float(np.percentile(arr, 50)),
            "p95": round(float(np.percentile(arr, 95)), 2), "max": int(arr.max())}


def prepare_dataset(source: str, n_train: int, n_eval: int, max_length: int, seed: int,
                    tokenizer, out_dir: str | Path) -> dict:
    """Load, split, tokenize; write ``out_dir/{train,eval}.jsonl`` atomically; return stats.

    Examples whose prompt alone exceeds ``max_length`` are dropped (counted per split);
    responses that do not fit are cut from the right (counted as truncated). Token lengths in
    the stats are after truncation; the response length includes the eos token.
    """
    examples = load_examples(source, n_train + n_eval, seed)
    train, evaluation = split_examples(examples, n_train, n_eval, seed)
    stats: dict = {"source": source, "n_available": len(examples), "max_length": max_length,
                   "splits": {}}
    with atomic_dir(out_dir) as tmp:
        for name, split in zip(SPLITS, (train, evaluation)):
            rows = []
            for ex in split:
                tok = tokenize_example(ex, tokenizer, max_length)
                if tok is not None:
                    rows.append({**ex, "prompt": format_prompt(ex["instruction"], ex["input"]),
                                 **tok})
            if not rows:
                shortest = min(len(tokenizer(format_prompt(ex["instruction"], ex["input"]),
                                             add_special_tokens=False)["input_ids"])
                               for ex in split)
                raise UserError(f"data.max_length = {max_length}: every prompt of the {name} "
                                f"split is at least that long (the shortest has {shortest} "
                                f"tokens), so no response token fits and all {len(split)} "
                                f"examples were dropped; raise data.max_length above {shortest}")
            with open(tmp / f"{name}.jsonl", "w", encoding="utf-8") as fh:
                for row in rows:
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            stats["splits"][name] = _split_stats(rows, n_dropped=len(split) - len(rows))
    return stats


def _split_stats(rows: list[dict], n_dropped: int) -> dict:
    prompt = [r["n_prompt"] for r in rows]
    total = [len(r["input_ids"]) for r in rows]
    return {
        "n": len(rows),
        "n_dropped": n_dropped,
        "n_truncated": sum(r["truncated"] for r in rows),
        "tasks": dict(sorted(Counter(r["task"] for r in rows).items())),
        "tokens": {"prompt": _length_stats(prompt),
                   "response": _length_stats([t - p for t, p in zip(total, prompt)]),
                   "total": _length_stats(total)},
    }


def load_split(path: str | Path) -> list[dict]:
    """Read a prepared split (``data/prepared/train.jsonl`` or ``eval.jsonl``)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"{path}: prepared split not found; run `dvc repro prepare` "
                        "first") from None
    rows = []
    for lineno, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} line {lineno}: corrupt prepared split ({exc.msg}); "
                            "re-create it with `dvc repro -f prepare`") from None
    return rows
