"""Greedy decoding of the eval prompts: batched, with the KV cache and shared prompt prefixes
encoded once.

Eval prompts share long prefixes (an instruction template's preamble, a chat template's system
turn), so a batch of prompts is decoded in three steps:

1. **prefixes**: each distinct prefix the batch's prompts share is encoded once
   (:mod:`qlora_diag.prefix_sharing`);
2. **suffixes**: the rest of each prompt runs on top of its prefix's cache, left-padded so every
   row's last prompt token is the last column (the LM head runs on that column only);
3. **decoding**: one token per step from ``argmax``; a row that has produced eos leaves the
   batch (its cache rows are dropped), so late steps cost only the rows still running.

Batches are runs of the prompts in lexicographic token order (prompts with a common prefix sit
together); outputs are returned in the original order. Greedy decoding is deterministic, so two
runs' outputs can be compared token by token without sampling noise. The result equals
one-prompt-at-a-time ``model.generate`` up to float summation order (``make bench`` reports how
many outputs differ).
"""
from __future__ import annotations

import torch

from qlora_diag.losses import decoder_parts
from qlora_diag.prefix_sharing import SharedPrefixes, encode_shared_prefixes, left_padded, positions
from qlora_diag.probe import exact_match


def _next_tokens(backbone, head, ids, mask, pos, cache) -> torch.Tensor:
    h = backbone(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                 use_cache=True).last_hidden_state
    return head(h[:, -1]).float().argmax(-1)


def _decode_batch(model, prompts: list[list[int]], *, max_new_tokens: int, pad_id: int,
                  eos_id: int, device) -> list[list[int]]:
    from transformers import DynamicCache

    out: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens <= 0:
        return out
    backbone, head = decoder_parts(model)
    shared = encode_shared_prefixes(backbone, prompts, [len(p) - 1 for p in prompts], pad_id, device)
    if shared is None:  # a one-token prompt leaves no room for a prefix
        shared = SharedPrefixes(DynamicCache(config=backbone.config),
                                torch.zeros((len(prompts), 0), dtype=torch.long, device=device),
                                [0] * len(prompts))
    cache = shared.cache
    ids, smask = left_padded([p[c:] for p, c in zip(prompts, shared.lengths)], pad_id, device)
    mask = torch.cat([shared.mask, smask], dim=1)
    token = _next_tokens(backbone, head, ids, mask,
                         positions(smask, torch.tensor(shared.lengths, device=device)), cache)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    alive = list(range(len(prompts)))  # prompt index of each row still in the batch
    for step in range(max_new_tokens):
        finished = set()
        for row, i in enumerate(alive):
            t = int(token[row])
            if t == eos_id:
                finished.add(row)
            else:
                out[i].append(t)
        if step == max_new_tokens - 1 or len(finished) == len(alive):
            break
        if finished:  # finished rows leave the batch and the cache
            keep = torch.tensor([r for r in range(len(alive)) if r not in finished], device=device)
            cache.batch_select_indices(keep)
            token, mask, lengths = token[keep], mask[keep], lengths[keep]
            alive = [alive[r] for r in keep.tolist()]
        mask = torch.cat([mask, torch.ones((len(alive), 1), dtype=mask.dtype, device=device)], dim=1)
        token = _next_tokens(backbone, head, token[:, None], mask, (lengths + step)[:, None], cache)
    return out


@torch.no_grad()
def generate_greedy(model, prompts: list[list[int]], *, max_new_tokens: int, batch_size: int,
                    pad_id: int, eos_id: int) -> list[list[int]]:
    """New token ids for each prompt, up to ``max_new_tokens`` (eos and anything after it
    removed)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: prompts[i])
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        for i, o in zip(idx, _decode_batch(model, [prompts[i] for i in idx],
                                           max_new_tokens=max_new_tokens, pad_id=pad_id,
                                           eos_id=eos_id, device=device)):
            out[i] = o
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
