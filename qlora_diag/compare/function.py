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
    return float(_kl_sum(logits_p, logits_q))


def _kl_sum(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    if logits_p.shape != logits_q.shape:
        raise ValueError(f"kl_divergence_sum: shapes differ, {tuple(logits_p.shape)} vs "
                         f"{tuple(logits_q.shape)}")
    logp = F.log_softmax(logits_p.float(), dim=-1)
    logq = F.log_softmax(logits_q.float(), dim=-1)
    return F.kl_div(logq, logp, log_target=True, reduction="sum")


# Response positions projected onto the vocabulary at once, per model: the fp32 logits of a
# chunk are chunk x vocabulary (1024 x 128k = 0.5 GB at Llama 3's vocabulary) whatever the
# batch's response length (issue 15: all of a batch's positions at once, on the CPU).
LOGIT_CHUNK = 1024


def response_pair_sums(head_a, head_b, hidden_a: torch.Tensor, hidden_b: torch.Tensor,
                       labels: torch.Tensor, chunk: int = LOGIT_CHUNK) -> dict:
    """Sums over response positions of both models' cross-entropy, KL(P_a ‖ P_b) and the cosine
    of the final hidden states, in chunks of ``chunk`` positions, on ``hidden_a``'s device;
    plus ``ce_a_per_position`` / ``ce_b_per_position``: each position's cross-entropy (float64,
    CPU), for the per-example records.

    Each model's LM head runs on its own device (``hidden_b`` stays with ``head_b``); its
    logits and hidden states are then moved to ``hidden_a``'s device, explicitly, so the two
    models may live on different devices (issue 15)."""
    dev = hidden_a.device
    labels = labels.to(dev)
    sums = torch.zeros(2, dtype=torch.float64, device=dev)
    ce_a, ce_b = [], []
    for start in range(0, len(labels), chunk):
        part = slice(start, start + chunk)
        la = head_a(hidden_a[part]).float()
        lb = head_b(hidden_b[part]).float().to(dev)
        y = labels[part]
        ce_a.append(F.cross_entropy(la, y, reduction="none").double())
        ce_b.append(F.cross_entropy(lb, y, reduction="none").double())
        sums += torch.stack([
            _kl_sum(la, lb),
            F.cosine_similarity(hidden_a[part].float(), hidden_b[part].float().to(dev),
                                dim=-1).sum()]).to(torch.float64)
    ce_a_all = torch.cat(ce_a).cpu() if ce_a else torch.zeros(0, dtype=torch.float64)
    ce_b_all = torch.cat(ce_b).cpu() if ce_b else torch.zeros(0, dtype=torch.float64)
    kl, cos = sums.tolist()
    return {"ce_a": float(ce_a_all.sum()), "ce_b": float(ce_b_all.sum()), "kl": kl, "cos": cos,
            "ce_a_per_position": ce_a_all, "ce_b_per_position": ce_b_all}


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
    ``loss_b``. Only response positions are projected onto the vocabulary, in chunks on
    ``model_a``'s device (:func:`response_pair_sums`), so memory is one batch of hidden states
    plus (:data:`LOGIT_CHUNK` × vocabulary) logits per model.
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
        for model in (model_a, model_b):
            dev = _device(model)
            inputs = (batch[k].to(dev) for k in ("input_ids", "attention_mask", "labels"))
            outs.append(response_hidden(model, *inputs, share_prefix=True))
        (ha, y), (hb, _) = outs
        sums = response_pair_sums(head_a, head_b, ha, hb, y)
        loss_a += sums["ce_a"]
        loss_b += sums["ce_b"]
        kl += sums["kl"]
        cos += sums["cos"]
        for i, pa, pb in zip(idx, torch.split(sums["ce_a_per_position"], per_row),
                             torch.split(sums["ce_b_per_position"], per_row)):
            nll_a[i], nll_b[i], n_per[i] = float(pa.sum()), float(pb.sum()), int(pa.numel())
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

