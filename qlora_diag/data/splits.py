"""Splits: split the records, tokenize them with a response-only mask, write and read splits.

A prepared split is a JSON-lines file; each line holds ``id, task, instruction, input, output,
prompt, input_ids, n_prompt, truncated``. The loss is taken on positions ``>= n_prompt`` only
(the response and its eos token), so the adapters learn to answer, not to copy the template.
Each split holds exactly the number of examples the params ask for: an example whose prompt
fills ``data.max_length`` is replaced before splitting ends, never dropped after it (issue 15).
"""
from __future__ import annotations

import dataclasses
import json
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from qlora_diag.core.atomic import atomic_dir
from qlora_diag.core.errors import UserError
from qlora_diag.data.lengths import covering_length, length_stats
from qlora_diag.data.sources import format_prompt, load_examples

SPLITS = ("train", "eval")
# Any text: bos_prefix compares how the tokenizer encodes it with and without special tokens.
BOS_PROBE_TEXT = "Below"


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
    picked = select_examples(examples, n_train, n_eval, seed, fits=lambda i: True)
    return _tagged(examples, picked.train), _tagged(examples, picked.eval)


@dataclasses.dataclass(frozen=True)
class Selection:
    """Source positions chosen for each split, and how many were drawn but did not fit."""

    train: list[int]
    eval: list[int]
    skipped_train: int
    skipped_eval: int


def select_examples(examples: list[dict], n_train: int, n_eval: int, seed: int,
                    fits: Callable[[int], bool]) -> Selection:
    """The split of :func:`split_examples` with replacement: an example for which
    ``fits(position)`` is False is skipped and the next one in the same seeded order takes its
    place -- for the eval split the next one of the same task, so the stratification holds while
    the task has examples left. When every example fits, this is exactly the split without
    replacement (the same examples in the same order), so data that never needed a replacement
    is prepared as before. ``fits`` is asked only for examples the walk reaches, so a large hub
    data set is not tokenized whole; when too few fit, the walk has asked about every example and
    the splits come back short (the caller names the numbers).
    """
    if n_train + n_eval > len(examples):
        raise UserError(f"data.n_train + data.n_eval = {n_train} + {n_eval} = "
                        f"{n_train + n_eval} examples are needed, but data.source provides only "
                        f"{len(examples)}: lower data.n_train or data.n_eval, or use a larger "
                        "data set")
    rng = random.Random(seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    by_task: dict[str, list[int]] = {}
    for i in order:
        by_task.setdefault(examples[i]["task"], []).append(i)
    queues = [by_task[t] for t in sorted(by_task)]
    eval_idx: list[int] = []
    seen: set[int] = set()
    skipped_eval = 0
    while len(eval_idx) < n_eval and any(queues):
        for q in queues:
            while q and len(eval_idx) < n_eval:
                i = q.pop(0)
                seen.add(i)
                if fits(i):
                    eval_idx.append(i)
                    break
                skipped_eval += 1
    train_idx: list[int] = []
    skipped_train = 0
    for i in order:
        if len(train_idx) == n_train:
            break
        if i in seen:  # in the eval split, or drawn for it and too long
            continue
        if fits(i):
            train_idx.append(i)
        else:
            skipped_train += 1
    return Selection(train_idx, eval_idx, skipped_train, skipped_eval)


def _tagged(examples: list[dict], positions: list[int]) -> list[dict]:
    width = max(6, len(str(len(examples))))
    return [{"id": f"{i:0{width}d}", **examples[i]} for i in positions]


def bos_prefix(tokenizer) -> list[int]:
    """``[bos_token_id]`` when the tokenizer puts a BOS token in front of a text by itself,
    else ``[]``: the tokens every prompt starts with.

    Asked by behaviour, not by attribute: Llama 2 and Mistral say so with ``add_bos_token``,
    Llama 3 only through its post-processor (``add_bos_token`` is False there, yet
    ``tok("x")`` starts with ``<|begin_of_text|>``), and these models were trained with a BOS in
    front of every sequence. SmolLM2 has a ``bos_token`` but adds none (``tok("Hi") ==
    tok("Hi", add_special_tokens=False)``, tested) and was trained without one, so nothing is
    added for it.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    own = tokenizer(BOS_PROBE_TEXT)["input_ids"]
    plain = tokenizer(BOS_PROBE_TEXT, add_special_tokens=False)["input_ids"]
    return [bos] if own[:1] == [bos] and plain[:1] != [bos] else []


def encode_example(example: dict, tokenizer, prefix: list[int]) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids + eos) of one example, untruncated; ``prefix`` is
    :func:`bos_prefix` of the tokenizer.

    Prompt and response are tokenized separately, so the mask boundary is exact (no merge across
    it), each with ``add_special_tokens=False``: the prompt gets ``prefix`` (at most one BOS) in
    front, the response no special token but the ``eos_token_id`` after it, so the model learns to
    stop.
    """
    prompt_ids = tokenizer(format_prompt(example["instruction"], example["input"]),
                           add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(example["output"], add_special_tokens=False)["input_ids"]
    return prefix + prompt_ids, response_ids + [tokenizer.eos_token_id]


def fit_to_length(prompt_ids: list[int], response_ids: list[int], max_length: int) -> dict | None:
    """``{input_ids, n_prompt, truncated}``, or None if the prompt alone fills ``max_length``
    (no response token would remain to learn from). A response that does not fit is cut from
    the right and loses its eos, because it did not end there."""
    room = max_length - len(prompt_ids)
    if room < 1:
        return None
    return {"input_ids": prompt_ids + response_ids[:room], "n_prompt": len(prompt_ids),
            "truncated": len(response_ids) > room}


def tokenize_example(example: dict, tokenizer, max_length: int) -> dict | None:
    """:func:`encode_example` then :func:`fit_to_length`: ``{input_ids, n_prompt, truncated}``
    for one example, or None if its prompt fills ``max_length``."""
    return fit_to_length(*encode_example(example, tokenizer, bos_prefix(tokenizer)), max_length)


def prepare_dataset(source: str, n_train: int, n_eval: int, max_length: int, seed: int,
                    tokenizer, out_dir: str | Path) -> dict:
    """Load, split, tokenize; write ``out_dir/{train,eval}.jsonl`` atomically; return stats.

    Each split gets exactly ``n_train`` / ``n_eval`` examples: one whose prompt alone fills
    ``max_length`` is replaced by the next in the split's seeded order (counted per split as
    ``n_dropped``); if too few examples of the source fit, a :class:`UserError` names the numbers
    and the ``max_length`` that would make enough fit, before anything is written. Responses
    that do not fit are cut from the right (counted as truncated): they still teach the start of
    the answer. Token lengths under ``tokens`` are after truncation, under ``untruncated``
    before; response lengths include the eos token.
    """
    examples = load_examples(source, n_train + n_eval, seed)
    prefix = bos_prefix(tokenizer)
    encoded: dict[int, tuple[list[int], list[int]]] = {}

    def fits(i: int) -> bool:
        if i not in encoded:
            encoded[i] = encode_example(examples[i], tokenizer, prefix)
        return len(encoded[i][0]) < max_length

    picked = select_examples(examples, n_train, n_eval, seed, fits)
    if len(picked.train) < n_train or len(picked.eval) < n_eval:
        raise UserError(_too_few_fit([len(p) for p, _ in encoded.values()], n_train, n_eval,
                                     max_length))
    stats: dict = {"source": source, "n_available": len(examples), "max_length": max_length,
                   "splits": {}}
    with atomic_dir(out_dir) as tmp:
        for name, positions, skipped in zip(SPLITS, (picked.train, picked.eval),
                                            (picked.skipped_train, picked.skipped_eval)):
            rows = [{**ex, "prompt": format_prompt(ex["instruction"], ex["input"]),
                     **fit_to_length(*encoded[i], max_length)}
                    for i, ex in zip(positions, _tagged(examples, positions))]
            with open(tmp / f"{name}.jsonl", "w", encoding="utf-8") as fh:
                for row in rows:
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            stats["splits"][name] = _split_stats(rows, [encoded[i] for i in positions],
                                                 n_dropped=skipped)
    return stats


def _too_few_fit(prompt_lengths: list[int], n_train: int, n_eval: int, max_length: int) -> str:
    """The error when fewer than ``n_train + n_eval`` examples leave room for a response token;
    ``prompt_lengths`` are those of every example of the source (the walk asked about all)."""
    needed = n_train + n_eval
    n_fit = sum(n < max_length for n in prompt_lengths)
    # An example fits when its prompt is shorter than max_length; the needed-th shortest prompt
    # sets the smallest max_length at which `needed` examples fit.
    enough = sorted(prompt_lengths)[needed - 1] + 1
    return (f"data.max_length = {max_length}: only {n_fit} of the {len(prompt_lengths)} examples "
            f"of data.source have a prompt shorter than that (room for at least one response "
            f"token), but data.n_train + data.n_eval = {n_train} + {n_eval} = {needed} are "
            f"needed; an example whose prompt fills data.max_length is replaced by another of "
            f"the source, and too few are left. Raise data.max_length to at least {enough} (then "
            f"{needed} fit), lower data.n_train + data.n_eval to at most {n_fit}, or use a "
            f"source with shorter prompts.")


def _split_stats(rows: list[dict], encoded: list[tuple[list[int], list[int]]],
                 n_dropped: int) -> dict:
    """Counts and token lengths of one split; ``encoded`` are its examples untruncated. Keys
    after ``tokens`` were added in issue 15 (truncation share, lengths before truncation)."""
    prompt = [r["n_prompt"] for r in rows]
    total = [len(r["input_ids"]) for r in rows]
    full_response = [len(resp) for _, resp in encoded]
    full_total = [len(p) + len(resp) for p, resp in encoded]
    n_truncated = sum(r["truncated"] for r in rows)
    return {
        "n": len(rows),
        "n_dropped": n_dropped,
        "n_truncated": n_truncated,
        "tasks": dict(sorted(Counter(r["task"] for r in rows).items())),
        "tokens": {"prompt": length_stats(prompt),
                   "response": length_stats([t - p for t, p in zip(total, prompt)]),
                   "total": length_stats(total)},
        "truncated_share": round(n_truncated / len(rows), 4),
        "untruncated": {"response": length_stats(full_response),
                        "total": length_stats(full_total)},
        # the smallest lengths that 95 % of the examples fit in whole: the suggested
        # data.max_length (total) and compare.max_new_tokens = auto (response, train split)
        "nearest_rank_p95": {"response": covering_length(full_response),
                             "total": covering_length(full_total)},
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
