"""Greedy decoding of the eval prompts: batched, left-padded, with the KV cache.

Batches are formed from prompts of similar length (less padding), and outputs are returned in
the original order. Greedy decoding is deterministic, so two runs' outputs can be compared token
by token without sampling noise.
"""
from __future__ import annotations

import torch

from qlora_diag.probe import exact_match


@torch.no_grad()
def generate_greedy(model, prompts: list[list[int]], *, max_new_tokens: int, batch_size: int,
                    pad_id: int, eos_id: int) -> list[list[int]]:
    """New token ids for each prompt (eos and anything after it removed)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(idx):
            ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                             pad_token_id=pad_id, eos_token_id=eos_id)
        for row, i in enumerate(idx):
            new = gen[row, width:].tolist()
            out[i] = new[: new.index(eos_id)] if eos_id in new else new
    model.train(was_training)
    return out


def generation_records(records: list[dict], outputs: list[list[int]], tokenizer) -> list[dict]:
    """One JSON-able row per example: prompt, reference, output text and ids, exact match."""
    rows = []
    for rec, ids in zip(records, outputs):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        rows.append({"id": rec["id"], "task": rec["task"], "prompt": rec["prompt"],
                     "reference": rec["output"], "output": text, "output_ids": ids,
                     "exact_match": exact_match(text, rec["output"])})
    return rows


def exact_match_summary(rows: list[dict]) -> dict:
    """Overall and per-task exact-match accuracy of :func:`generation_records` rows."""
    tasks = sorted({r["task"] for r in rows})
    per_task = {t: sum(r["exact_match"] for r in rows if r["task"] == t) /
                max(1, sum(1 for r in rows if r["task"] == t)) for t in tasks}
    return {"exact_match": sum(r["exact_match"] for r in rows) / max(1, len(rows)),
            "exact_match_per_task": per_task}
