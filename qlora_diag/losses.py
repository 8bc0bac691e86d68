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


def _unwrap(model):
    """The transformers model inside a PEFT wrapper (LoRA layers are injected in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def hidden_states(model, input_ids, attention_mask) -> torch.Tensor:
    """Final hidden states (after the last norm) of the decoder, without the LM head."""
    base = _unwrap(model)
    backbone = getattr(base, base.base_model_prefix)
    return backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def response_loss_sum(model, input_ids, attention_mask, labels) -> tuple[torch.Tensor, int]:
    """(sum of token cross-entropies over labelled positions, number of those positions)."""
    hidden = hidden_states(model, input_ids, attention_mask)
    targets = labels[:, 1:]
    keep = targets != IGNORE
    logits = _unwrap(model).get_output_embeddings()(hidden[:, :-1][keep]).float()
    loss = F.cross_entropy(logits, targets[keep], reduction="sum")
    return loss, int(keep.sum())


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
        loss, n = response_loss_sum(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        total += float(loss)
        count += n
    model.train(was_training)
    return total / max(count, 1), count
