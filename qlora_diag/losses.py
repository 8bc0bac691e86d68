"""Response-only causal-LM loss that runs the LM head only where there is a label.

Why: a plain ``model(input_ids, labels=...)`` projects *every* position onto the 49k-word
vocabulary and upcasts those logits to fp32, although only response positions carry loss. On
the probe data ~85 % of positions are prompt, so the LM head (20 % of SmolLM2's parameters) and
the fp32 cross-entropy are mostly wasted work.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from qlora_diag.batching import IGNORE, collate
from qlora_diag.prefix_sharing import encode_shared_prefixes, positions


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
    row-major order, from a right-padded batch (:func:`~qlora_diag.batching.collate`).

    With ``share_prefix`` the prompt prefixes the rows share are encoded once
    (:mod:`qlora_diag.prefix_sharing`); it falls back to the plain pass under gradient
    checkpointing (which drops the cache) or when a row's first response token follows a
    one-token prompt.
    """
    backbone, _ = decoder_parts(model)
    shared = None
    checkpointing = backbone.training and any(getattr(m, "gradient_checkpointing", False)
                                              for m in backbone.modules())
    if share_prefix and not checkpointing:
        lengths = attention_mask.sum(-1).tolist()
        first_label = [int(torch.nonzero(row != IGNORE)[0]) if (row != IGNORE).any() else n
                       for row, n in zip(labels, lengths)]
        seqs = [ids[:n].tolist() for ids, n in zip(input_ids, lengths)]
        shared = encode_shared_prefixes(backbone, seqs, [f - 1 for f in first_label],
                                        pad_id=0, device=input_ids.device)
    if shared is None:
        hidden = hidden_states(model, input_ids, attention_mask)
    else:
        rows = [s[c:] for s, c in zip(seqs, shared.lengths)]
        width = max(len(r) for r in rows)
        input_ids = torch.zeros((len(rows), width), dtype=torch.long, device=input_ids.device)
        attention_mask = torch.zeros_like(input_ids)
        cut_labels = torch.full_like(input_ids, IGNORE)
        for i, (r, c) in enumerate(zip(rows, shared.lengths)):
            input_ids[i, : len(r)] = torch.tensor(r)
            attention_mask[i, : len(r)] = 1
            cut_labels[i, : len(r)] = labels[i, c: c + len(r)]
        labels = cut_labels
        pos = positions(attention_mask, torch.tensor(shared.lengths, device=input_ids.device))
        hidden = backbone(input_ids=input_ids, attention_mask=torch.cat([shared.mask, attention_mask], 1),
                          position_ids=pos, past_key_values=shared.cache,
                          use_cache=True).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE
    return hidden[:, :-1][keep], targets[keep]


def response_loss_sum(model, input_ids, attention_mask, labels, *,
                      share_prefix: bool) -> tuple[torch.Tensor, int]:
    """(sum of token cross-entropies over labelled positions, number of those positions)."""
    hidden, targets = response_hidden(model, input_ids, attention_mask, labels,
                                      share_prefix=share_prefix)
    logits = decoder_parts(model)[1](hidden).float()
    loss = F.cross_entropy(logits, targets, reduction="sum")
    return loss, int(targets.numel())


@torch.no_grad()
def evaluate_loss(model, records: list[dict], batch_size: int, pad_id: int) -> tuple[float, int]:
    """Token-weighted mean response loss over ``records`` (not a mean of batch means)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    order = sorted(range(len(records)), key=lambda i: len(records[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        batch = collate([records[i] for i in order[start:start + batch_size]], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        loss, n = response_loss_sum(model, batch["input_ids"], batch["attention_mask"],
                                    batch["labels"], share_prefix=True)
        total += float(loss)
        count += n
    model.train(was_training)
    return total / max(count, 1), count
