"""Response-only causal-LM loss that runs the LM head only where there is a label.

Why: a plain ``model(input_ids, labels=...)`` projects *every* position onto the 49k-word
vocabulary and upcasts those logits to fp32, although only response positions carry loss. On
the probe data ~85 % of positions are prompt, so the LM head (20 % of SmolLM2's parameters) and
the fp32 cross-entropy are mostly wasted work.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from qlora_diag.data.batching import IGNORE, collate
from qlora_diag.train.prefix_sharing import (
    build_prefix_tree,
    packs_exactly,
    tree_forward,
    tree_saves_enough,
)


def _unwrap(model):
    """The transformers model inside a PEFT wrapper (LoRA layers are injected in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_parts(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(decoder without the LM head, LM head) of a causal LM, PEFT-wrapped or not."""
    base = _unwrap(model)
    return getattr(base, base.base_model_prefix), base.get_output_embeddings()


def hidden_states(model, input_ids, attention_mask) -> torch.Tensor:
    """Final hidden states (after the last norm) of the decoder, without the LM head."""
    backbone, _ = decoder_parts(model)
    return backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def response_hidden(model, input_ids, attention_mask, labels, *,
                    share_prefix: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(final hidden states of the positions that predict a labelled token, those labels), in
    row-major order, from a right-padded batch (:func:`~qlora_diag.data.batching.collate`).

    With ``share_prefix`` the batch runs packed as a prefix tree, so tokens the rows share are
    computed once (:mod:`qlora_diag.train.prefix_sharing`); otherwise as a padded batch, and
    also when packing would not be exact (:func:`packs_exactly`: no tree masks, a sliding
    window) or saves little (:func:`tree_saves_enough`).
    """
    backbone, _ = decoder_parts(model)
    targets = labels[:, 1:]
    keep = targets != IGNORE
    lengths = attention_mask.sum(-1).tolist()
    tree = None
    if share_prefix and packs_exactly(backbone, max(lengths)):
        tree = build_prefix_tree([ids[:n].tolist() for ids, n in zip(input_ids, lengths)])
    if tree is None or not tree_saves_enough(tree):
        hidden = hidden_states(model, input_ids, attention_mask)
        return hidden[:, :-1][keep], targets[keep]
    hidden = tree_forward(backbone, tree, input_ids.device).last_hidden_state[0]
    rows, cols = keep.nonzero(as_tuple=True)  # row-major, as boolean indexing orders them
    nodes = [tree.paths[r][c] for r, c in zip(rows.tolist(), cols.tolist())]
    return hidden[torch.tensor(nodes, dtype=torch.long, device=hidden.device)], targets[keep]


def response_loss_sum(model, input_ids, attention_mask, labels, *,
                      share_prefix: bool) -> tuple[torch.Tensor, int]:
    """(sum of token cross-entropies over labelled positions, number of those positions)."""
    hidden, targets = response_hidden(model, input_ids, attention_mask, labels,
                                      share_prefix=share_prefix)
    logits = decoder_parts(model)[1](hidden).float()
    loss = F.cross_entropy(logits, targets, reduction="sum")
    return loss, int(targets.numel())


def response_token_losses(model, input_ids, attention_mask, labels, *,
                          share_prefix: bool) -> tuple[torch.Tensor, list[int]]:
    """(cross-entropy of every labelled position, row-major; number of those positions per
    row): :func:`response_loss_sum` split by example."""
    hidden, targets = response_hidden(model, input_ids, attention_mask, labels,
                                      share_prefix=share_prefix)
    logits = decoder_parts(model)[1](hidden).float()
    per_row = (labels[:, 1:] != IGNORE).sum(-1).tolist()
    return F.cross_entropy(logits, targets, reduction="none"), per_row


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """One evaluation over the eval split: the token-weighted mean loss and its parts per
    example (records' order): ``nll_sums[i]`` = summed response cross-entropy (nats) of record
    i, ``n_tokens_per[i]`` = its response token count."""

    loss: float
    n_tokens: int
    nll_sums: list[float]
    n_tokens_per: list[int]


@torch.no_grad()
def evaluate_examples(model, records: list[dict], batch_size: int, pad_id: int) -> EvalResult:
    """Token-weighted mean response loss over ``records`` (not a mean of batch means), with the
    summed loss and token count of every record (one pass)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    nll_sums, n_per = [0.0] * len(records), [0] * len(records)
    order = sorted(range(len(records)), key=lambda i: len(records[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = collate([records[i] for i in idx], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        tok, per_row = response_token_losses(model, batch["input_ids"], batch["attention_mask"],
                                             batch["labels"], share_prefix=True)
        total += float(tok.sum())
        count += int(tok.numel())
        for i, part in zip(idx, torch.split(tok.double().cpu(), per_row)):
            nll_sums[i], n_per[i] = float(part.sum()), int(part.numel())
    model.train(was_training)
    return EvalResult(total / max(count, 1), count, nll_sums, n_per)


def evaluate_loss(model, records: list[dict], batch_size: int, pad_id: int) -> tuple[float, int]:
    """(token-weighted mean response loss over ``records``, response tokens):
    :func:`evaluate_examples` without the per-example parts."""
    r = evaluate_examples(model, records, batch_size, pad_id)
    return r.loss, r.n_tokens
