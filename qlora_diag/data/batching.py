"""Batches for training and evaluation: dynamic padding, response-only labels, a fixed order.

The order of training examples is a pure function of (seed, lengths, batch size, steps), so the
LoRA and QLoRA runs of one seed see the same examples in the same order, and a resumed run sees
exactly the batches it would have seen uninterrupted.
"""
from __future__ import annotations

import numpy as np
import torch

IGNORE = -100  # label of positions that carry no loss (prompt and padding); PyTorch's default


def collate(records: list[dict], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad ``input_ids`` to the longest record of the batch (dynamic padding).

    ``labels`` equal ``input_ids`` on response positions (``>= n_prompt``) and ``IGNORE`` on the
    prompt and the padding, so the loss trains the response only.
    """
    width = max(len(r["input_ids"]) for r in records)
    ids = torch.full((len(records), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(records), width), dtype=torch.long)
    labels = torch.full((len(records), width), IGNORE, dtype=torch.long)
    for i, r in enumerate(records):
        seq = torch.tensor(r["input_ids"], dtype=torch.long)
        n = len(seq)
        span = slice(0, n) if padding_side == "right" else slice(width - n, width)
        ids[i, span] = seq
        mask[i, span] = 1
        lab = seq.clone()
        lab[: r["n_prompt"]] = IGNORE
        labels[i, span] = lab
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def training_order(lengths: list[int], batch_size: int, steps: int, seed: int,
                   group_by_length: bool) -> list[int]:
    """Example indices for ``steps`` batches of ``batch_size`` (epochs repeat with new shuffles).

    With ``group_by_length`` each shuffled epoch is cut into mega-batches of 16 batches, sorted by
    length inside a mega-batch and cut into batches whose order is shuffled again: padding drops
    (less wasted compute on CPU) while every batch still mixes the data randomly.
    """
    rng = np.random.default_rng(seed)
    n = len(lengths)
    out: list[int] = []
    while len(out) < steps * batch_size:
        perm = rng.permutation(n)
        if group_by_length:
            mega = 16 * batch_size
            batches = []
            for start in range(0, n, mega):
                chunk = sorted(perm[start:start + mega], key=lambda i: -lengths[i])
                batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
            full = [b for b in batches if len(b) == batch_size]
            rng.shuffle(full)
            perm = [i for b in full for i in b]
        out += [int(i) for i in perm]
    return out[: steps * batch_size]


class FixedOrderSampler(torch.utils.data.Sampler):
    """Yields a precomputed list of indices (see :func:`training_order`)."""

    def __init__(self, order: list[int]):
        self.order = list(order)

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


class RecordDataset(torch.utils.data.Dataset):
    """A list of prepared records (``input_ids``, ``n_prompt``) as a torch Dataset."""

    def __init__(self, records: list[dict]):
        self.records = [{"input_ids": r["input_ids"], "n_prompt": r["n_prompt"]} for r in records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        return self.records[i]
