"""Function-level measures of two models: how alike their greedy outputs are (token match,
exact-output agreement) and how alike their next-token distributions and final hidden states
are on the eval split's response positions (KL divergence, cosine), plus the helpers that run
a model for the comparison (an adapter attached for a block, a case's greedy generations).

Every "response position" below is a position whose *next* token is a response token (the
positions the training loss is taken on: the prompt's last token up to the response's last).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from qlora_diag.core.errors import UserError
from qlora_diag.data.batching import IGNORE, collate
from qlora_diag.train.generation import generate_greedy, generation_records
from qlora_diag.train.losses import response_hidden
from qlora_diag.train.trainer import GenerationCfg


def token_match_counts(a: list[int], b: list[int]) -> tuple[int, int]:
    """(positions where ``a`` and ``b`` hold the same token, max(len a, len b)).

    Position-wise: index i counts as a match when both outputs have a token at i and it is the
    same; positions past the shorter output count as mismatches. Two empty outputs give (0, 0).
    """
    return sum(x == y for x, y in zip(a, b)), max(len(a), len(b))


def token_match_rate(outputs_a: list[list[int]], outputs_b: list[list[int]]) -> float:
    """Greedy token match rate of two models' outputs on the same prompts: matching positions
    over all positions, pooled over examples, each example counting up to the longer of its two
    outputs (:func:`token_match_counts`). A token-weighted rate: a long answer counts more than
    a short one. 1.0 for identical outputs (also when all are empty), 0.0 when no position
    agrees. Outputs are eos-free, as :func:`~qlora_diag.train.generation.generate_greedy` returns them,
    so an output that stops earlier loses the positions the other one goes on for."""
    if len(outputs_a) != len(outputs_b):
        raise ValueError(f"token_match_rate: {len(outputs_a)} vs {len(outputs_b)} outputs")
    match = total = 0
    for a, b in zip(outputs_a, outputs_b):
        m, n = token_match_counts(a, b)
        match, total = match + m, total + n
    return match / total if total else 1.0


def exact_output_agreement(outputs_a: list[list[int]], outputs_b: list[list[int]]) -> float:
    """Fraction of prompts on which the two greedy outputs are the same token sequence."""
    if len(outputs_a) != len(outputs_b) or not outputs_a:
        raise ValueError(f"exact_output_agreement: need equally many outputs, got "
                         f"{len(outputs_a)} and {len(outputs_b)}")
    return sum(list(a) == list(b) for a, b in zip(outputs_a, outputs_b)) / len(outputs_a)


def kl_divergence_sum(logits_p: torch.Tensor, logits_q: torch.Tensor) -> float:
    """Σ over rows of KL(P ‖ Q) = Σ_v P(v)·(log P(v) − log Q(v)), in nats, with P = softmax of
    ``logits_p`` and Q = softmax of ``logits_q`` (rows = positions, columns = vocabulary),
    computed in float32 from log-softmax (no log of a rounded probability). 0 for equal logits;
    asymmetric: P is the reference distribution (16-bit LoRA in the comparison)."""
    if logits_p.shape != logits_q.shape:
        raise ValueError(f"kl_divergence_sum: shapes differ, {tuple(logits_p.shape)} vs "
                         f"{tuple(logits_q.shape)}")
    logp = F.log_softmax(logits_p.float(), dim=-1)
    logq = F.log_softmax(logits_q.float(), dim=-1)
    return float(F.kl_div(logq, logp, log_target=True, reduction="sum"))


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def pair_forward_stats(model_a, model_b, records: list[dict], batch_size: int, pad_id: int,
                       desc: str) -> dict[str, float]:
    """One pass of both models over ``records`` (prepared eval rows), on response positions.

    Returns ``loss_a``, ``loss_b`` (token-weighted mean cross-entropy, as
    :func:`~qlora_diag.train.losses.evaluate_loss`), ``kl_mean`` (mean over positions of
    KL(P_a ‖ P_b) of the next-token distributions, nats), ``hidden_cos_sim`` (mean over
    positions of the cosine between the two models' final hidden states, after the last norm)
    and ``n_tokens``; per record (``records``' order) ``nll_a``, ``nll_b`` (summed response
    cross-entropy, nats) and ``n_tokens_per`` (response tokens), the parts of ``loss_a`` and
    ``loss_b``. Only response positions are projected onto the vocabulary, so memory is
    one batch of hidden states plus (response tokens × vocabulary) logits per model.
    """
    for m in (model_a, model_b):
        m.eval()
    head_a, head_b = model_a.get_output_embeddings(), model_b.get_output_embeddings()
    order = sorted(range(len(records)), key=lambda i: len(records[i]["input_ids"]))
    loss_a = loss_b = kl = cos = 0.0
    n = 0
    nll_a, nll_b, n_per = [0.0] * len(records), [0.0] * len(records), [0] * len(records)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        idx = order[start:start + batch_size]
        batch = collate([records[i] for i in idx], pad_id)
        per_row = (batch["labels"][:, 1:] != IGNORE).sum(-1).tolist()
        outs = []
        for model, head in ((model_a, head_a), (model_b, head_b)):
            dev = _device(model)
            inputs = (batch[k].to(dev) for k in ("input_ids", "attention_mask", "labels"))
            h, y = response_hidden(model, *inputs,
                                   share_prefix=True)
            outs.append((h.float().cpu(), head(h).float().cpu()))
        (ha, la), (hb, lb) = outs
        y = y.cpu()
        tok_a = F.cross_entropy(la, y, reduction="none")
        tok_b = F.cross_entropy(lb, y, reduction="none")
        loss_a += float(tok_a.sum())
        loss_b += float(tok_b.sum())
        for i, pa, pb in zip(idx, torch.split(tok_a.double(), per_row),
                             torch.split(tok_b.double(), per_row)):
            nll_a[i], nll_b[i], n_per[i] = float(pa.sum()), float(pb.sum()), int(pa.numel())
        kl += kl_divergence_sum(la, lb)
        cos += float(F.cosine_similarity(ha, hb, dim=-1).sum())
        n += int(y.numel())
    if n == 0:
        raise UserError("the eval split has no response tokens; re-create it with `dvc repro "
                        "prepare` and check data.max_length")
    return {"loss_a": loss_a / n, "loss_b": loss_b / n, "kl_mean": kl / n,
            "hidden_cos_sim": cos / n, "n_tokens": n, "nll_a": nll_a, "nll_b": nll_b,
            "n_tokens_per": n_per}


@contextlib.contextmanager
def attached(model, adapter_dir: Path):
    """``model`` with the PEFT adapter at ``adapter_dir`` (inference mode) for the block; the
    LoRA layers are removed again afterwards (``unload``, the base weights untouched)."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    peft_model.eval()
    try:
        yield peft_model
    finally:
        peft_model.unload()


def generate_case(model, records: list[dict], tokenizer, gen: GenerationCfg) -> list[dict]:
    """Greedy generations on ``records`` exactly as training decodes them (same function, same
    n_generate / max_new_tokens / batch size), as generations.jsonl rows."""
    outputs = generate_greedy(model, [r["input_ids"][: r["n_prompt"]] for r in records],
                              max_new_tokens=gen.max_new_tokens, batch_size=gen.batch_size,
                              pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id)
    return generation_records(records, outputs, tokenizer)

