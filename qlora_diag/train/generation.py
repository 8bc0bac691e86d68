"""Greedy decoding of the eval prompts: batched, with the KV cache, shared prompt prefixes
computed once.

Eval prompts share long prefixes (an instruction template's preamble, a chat template's system
turn), so a batch of prompts is decoded in two steps:

1. **prefill**: the batch's prompts run packed as a prefix tree, so the tokens they share are
   computed once (:mod:`qlora_diag.train.prefix_sharing`); the LM head runs on each prompt's last
   token only, and the packed KV cache is gathered into one left-padded row per prompt. When
   packing saves little or would not be exact (a sliding window shorter than the sequences),
   one left-padded pass instead; past a sliding window, each prompt alone;
2. **decoding**: one token per step from ``argmax``, at the position it has after the unpadded
   prompt; a row that has produced eos leaves the batch (its cache rows are dropped), so late
   steps cost only the rows still running.

Batches are runs of the prompts in lexicographic token order (prompts with a common prefix sit
together); outputs are returned in the original order. Greedy decoding is deterministic, so two
runs' outputs can be compared token by token without sampling noise. The result equals
one-prompt-at-a-time ``model.generate`` up to float summation order (``make bench`` reports how
many outputs differ).
"""
from __future__ import annotations

from pathlib import Path

import torch

from qlora_diag.core.config import require_eval_examples
from qlora_diag.data.answers import exact_match
from qlora_diag.train.losses import decoder_parts
from qlora_diag.train.prefix_sharing import (
    attention_window,
    build_prefix_tree,
    packs_exactly,
    tree_forward,
    tree_saves_enough,
)


def _prefill(backbone, head, tree, device):
    """Run the prompts packed as the prefix tree ``tree``; returns each row's first new token,
    its KV cache (rows left-padded to the longest prompt) and the cache's attention mask."""
    from transformers import DynamicCache

    # Full-length layers for the packed pass (a sliding-window layer built from the config
    # would keep only the last nodes of the tree); the per-row cache below follows the config.
    packed = DynamicCache()
    hidden = tree_forward(backbone, tree, device, cache=packed).last_hidden_state[0]
    last = torch.tensor([path[-1] for path in tree.paths], device=device)
    token = head(hidden[last]).float().argmax(-1)
    index, mask = left_padded(tree.paths, 0, device)  # node of each cache slot (pads: masked)
    cache = DynamicCache(config=backbone.config)
    for layer_idx, layer in enumerate(packed.layers):  # (1, heads, nodes, dim) -> (rows, heads, width, dim)
        cache.update(layer.keys[0][:, index].transpose(0, 1), layer.values[0][:, index].transpose(0, 1),
                     layer_idx)
    return token, cache, mask


def _padded_prefill(backbone, head, prompts: list[list[int]], pad_id: int, device):
    """As :func:`_prefill` for attention implementations without tree masks: one left-padded
    pass over every prompt."""
    from transformers import DynamicCache

    ids, mask = left_padded(prompts, pad_id, device)
    cache = DynamicCache(config=backbone.config)
    h = backbone(input_ids=ids, attention_mask=mask, position_ids=real_positions(mask),
                 past_key_values=cache, use_cache=True).last_hidden_state
    return head(h[:, -1]).float().argmax(-1), cache, mask


def _decode_batch(model, prompts: list[list[int]], *, max_new_tokens: int, pad_id: int,
                  eos_id: int, device) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens <= 0:
        return out
    backbone, head = decoder_parts(model)
    window = attention_window(backbone.config)
    longest = max(len(p) for p in prompts) + max_new_tokens
    if window is not None and longest > window and len(prompts) > 1:
        # Past the window a left pad takes one of the window's positions, so a padded row would
        # see fewer real tokens than it does alone: such prompts are decoded one at a time.
        return [_decode_batch(model, [p], max_new_tokens=max_new_tokens, pad_id=pad_id,
                              eos_id=eos_id, device=device)[0] for p in prompts]
    tree = build_prefix_tree(prompts) if packs_exactly(backbone, longest) else None
    if tree is not None and tree_saves_enough(tree):
        token, cache, mask = _prefill(backbone, head, tree, device)
    else:
        token, cache, mask = _padded_prefill(backbone, head, prompts, pad_id, device)
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
        h = backbone(input_ids=token[:, None], attention_mask=mask,
                     position_ids=(lengths + step)[:, None], past_key_values=cache,
                     use_cache=True).last_hidden_state
        token = head(h[:, -1]).float().argmax(-1)
    return out


def left_padded(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), each row right-aligned."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, s in enumerate(seqs):
        ids[row, width - len(s):] = torch.tensor(s)
        mask[row, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def real_positions(mask: torch.Tensor) -> torch.Tensor:
    """Each real token's index among its row's real tokens (pads: 0, masked out anyway)."""
    return (mask.cumsum(-1) - 1).clamp(min=0) * mask


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


def generation_examples(records: list[dict], n: int, *, key: str, path: Path) -> list[dict]:
    """The first ``n`` eval ``records`` (read from ``path``), the examples greedy evaluation
    generates answers for; ``n`` (the value of ``key``) beyond the split is a :class:`UserError`."""
    require_eval_examples(key, n, len(records), path)
    return records[:n]


def prompt_ids(records: list[dict]) -> list[list[int]]:
    """The prompt tokens of each record (its first ``n_prompt`` ids)."""
    return [r["input_ids"][: r["n_prompt"]] for r in records]


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
