"""What training K adapters in one batch could save on this machine: the ceiling of a K-adapter
path (issue 12, the mLoRA idea: each row of a K-times larger batch routed to its own adapter,
so the frozen base's matmuls run once per step on K x the rows).

Such a path saves only what a larger batch saves per example: the adapters' own work is a few
percent of a step, and every row still needs its own pass through the base (the K seeds see
different batches, and an adapter on the first layer's q/v changes every later activation, so
no row's computation can be shared with another adapter's). So the ceiling is measured
directly: one training step (forward and backward of the response-only loss, one LoRA adapter)
on a batch of ``bench.batch_size`` rows, against the same batch repeated K times, per example.
Repeating the rows keeps the padding of the two shapes identical; prefix sharing is off in both
(with it on, repeated rows would share whole sequences, which K adapters cannot). Rounds
alternate the two shapes in a rotating order; the speedup is the median over rounds of the
per-round ratio, so a burst of load from another process hits one round, not one shape.
"""
from __future__ import annotations

import statistics
import time

import torch

from qlora_diag.core.machine import load_average
from qlora_diag.data.batching import collate
from qlora_diag.models.loading import load_tokenizer
from qlora_diag.train.losses import response_loss_sum
from qlora_diag.train.trainer import METHODS, attach_lora


def _step_s(model, rows: list[dict], pad_id: int, device: torch.device) -> float:
    batch = {k: v.to(device) for k, v in collate(rows, pad_id).items()}
    t0 = time.perf_counter()
    loss, n = response_loss_sum(model, batch["input_ids"], batch["attention_mask"],
                                batch["labels"], share_prefix=False)
    (loss / max(n, 1)).backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return seconds


def bench_batched_rows(setup, k: int, warmup_rounds: int, device: torch.device,
                       log=print) -> dict:
    """Per-example speedup of a K-row-times batch over a single batch, per method (see the
    module doc). ``setup``: a :class:`~qlora_diag.tools.bench.training.TrainSetup`; one round
    per batch of ``setup.batches()``, the first ``warmup_rounds`` untimed."""
    pad_id = load_tokenizer(setup.base_dir).pad_token_id
    load_start = load_average()
    out: dict = {"k": k, "methods": {}}
    for method in METHODS:
        log(f"bench: batched rows, {method}: batch of {setup.train.batch_size} vs {k} x that",
            flush=True)
        model = attach_lora(setup.load(method, device), rank=setup.lora.r,
                            alpha=setup.lora.alpha, dropout=setup.lora.dropout,
                            targets=setup.lora.targets, seed=setup.seed)
        model.train()
        single, repeated, ratios = [], [], []
        for i, rows in enumerate(setup.batches()):
            shapes = (1, k) if i % 2 == 0 else (k, 1)
            t = {times: _step_s(model, rows * times, pad_id, device) / times for times in shapes}
            if i < warmup_rounds:
                continue
            single.append(t[1])
            repeated.append(t[k])
            ratios.append(t[1] / t[k])
        out["methods"][method] = {
            "speedup_per_example": statistics.median(ratios),
            "step_s_per_batch_single": single, "step_s_per_batch_repeated": repeated}
        del model
    out["loadavg_start"], out["loadavg_end"] = load_start, load_average()
    return out
