"""Shared prompt prefixes, encoded once per batch.

Instruction data repeats long prompt prefixes: the Alpaca template's preamble is 24–34 of the
~50 prompt tokens of every probe example, a chat template repeats its system turn. Under causal
attention a prefix's keys and values do not depend on what follows it, so a batch can encode each
distinct prefix once and run only the rest of every row on top of that cache:

- each row's prefix is the longest one it shares with another row of the batch, at least one
  token and at most ``limit`` tokens (a row's last prompt token must stay in the suffix, because
  its hidden state predicts the first response token);
- the distinct prefixes run in one left-padded forward pass that returns the KV cache; the cache
  is gathered per row, and the rows' suffixes run on top of it, padding masked out and positions
  counting real tokens only, so every token sees exactly what it sees in the unshared pass.

The result equals the unshared forward pass up to float summation order. In training the
prefix's activations are shared by the rows that share it, so the gradient is the same sum; the
one difference is LoRA dropout, whose mask on prefix positions is then drawn once per distinct
prefix instead of once per row (``train.share_prefix`` turns sharing off in training).
"""
from __future__ import annotations

import dataclasses

import torch


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def shared_prefix_lengths(seqs: list[list[int]], limits: list[int]) -> list[int]:
    """For each sequence, the longest prefix it shares with another one, clipped to
    ``[1, limits[i]]`` (``limits[i] >= 1``). The longest shared prefix of a sequence is the
    one it shares with a neighbour in lexicographic order."""
    order = sorted(range(len(seqs)), key=lambda i: seqs[i])
    out = [0] * len(seqs)
    for pos, i in enumerate(order):
        shared = max([common_prefix_length(seqs[i], seqs[order[j]]) for j in (pos - 1, pos + 1)
                      if 0 <= j < len(order)], default=0)
        out[i] = max(1, min(limits[i], shared))
    return out


def left_padded(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), each row right-aligned."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, s in enumerate(seqs):
        if s:
            ids[row, width - len(s):] = torch.tensor(s)
            mask[row, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def positions(mask: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Position of every real token: ``start`` plus its index among its row's real tokens
    (pads get 0; they are masked out)."""
    return (start[:, None] + mask.cumsum(-1) - 1).clamp(min=0) * mask


@dataclasses.dataclass
class SharedPrefixes:
    """The encoded prefixes of a batch, gathered per row."""

    cache: object            # transformers Cache holding every row's prefix (left-padded)
    mask: torch.Tensor       # (rows, longest prefix) attention mask of the cache
    lengths: list[int]       # prefix length of each row


def encode_shared_prefixes(backbone, seqs: list[list[int]], limits: list[int], pad_id: int,
                           device) -> SharedPrefixes | None:
    """Encode the batch's shared prefixes once (see the module doc). ``backbone`` is the
    decoder without its LM head. None when a row has no room for a prefix (``limit < 1``)."""
    from transformers import DynamicCache

    if not seqs or min(limits) < 1:
        return None
    cut = shared_prefix_lengths(seqs, limits)
    distinct = list(dict.fromkeys(tuple(s[:c]) for s, c in zip(seqs, cut)))
    index = {pre: k for k, pre in enumerate(distinct)}
    ids, mask = left_padded([list(p) for p in distinct], pad_id, device)
    cache = DynamicCache(config=backbone.config)
    backbone(input_ids=ids, attention_mask=mask,
             position_ids=positions(mask, torch.zeros(len(distinct), dtype=torch.long, device=device)),
             past_key_values=cache, use_cache=True)
    rows = torch.tensor([index[tuple(s[:c])] for s, c in zip(seqs, cut)], device=device)
    cache.batch_select_indices(rows)
    return SharedPrefixes(cache=cache, mask=mask[rows], lengths=cut)
