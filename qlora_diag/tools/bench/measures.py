"""Pure pieces of the benchmark: FLOP count, roofline, paired ratios, goals."""
from __future__ import annotations

import statistics

import torch

# Goals of issue 6: (comparison, target). Step-time and memory ratios and the roofline are
# reported without a goal: they describe the trade-off, they are not targets.
GOALS = {
    "train_throughput_ratio_lora": (">=", 1.0),   # project path not slower than plain PEFT
    "train_throughput_ratio_qlora": (">=", 1.0),
    "generation_speedup": (">=", 5.0),            # batched vs one-at-a-time on 2 CPU cores
    "noop_repro_s": ("<=", 5.0),                  # `make repro` twice: the second is seconds
    "bench_wall_s": ("<=", 600.0),                # `make bench` in under 10 minutes
    "paired_seeds_speedup": (">=", 3.0),          # issue 12: K seeds per process vs one run each
}
# Issue 6's aim for the training ratio, by skipping work the loss does not need (the LM head
# and fp32 cross-entropy on prompt positions); reported next to the goal, not as one.
TRAIN_RATIO_AIM = 1.3


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters of the base's matmul weights: every nn.Linear (bitsandbytes' Linear4bit is
    one; counted logically, out x in, not its packed bytes) and GPT-2 Conv1D, the LM head
    included. LoRA's A and B are not the base and are left out (PEFT's wrapper layers are not
    nn.Linear; their ``base_layer`` is counted once). The input embedding is a lookup (no
    FLOPs); norms and biases are negligible. With SmolLM2's tied embeddings this is ~ all
    parameters."""
    from transformers.pytorch_utils import Conv1D

    n = 0
    for name, module in model.named_modules():
        if not isinstance(module, (torch.nn.Linear, Conv1D)) or ".lora_" in f".{name}":
            continue
        state = getattr(module.weight, "quant_state", None)
        n += int(torch.Size(state.shape).numel()) if state is not None else module.weight.numel()
    return n


def train_flops_per_token(n_matmul_params: int) -> int:
    """FLOPs of one trained token through a *frozen* base of N matmul parameters: 2N forward
    (a multiply and an add per weight) + 2N backward for the gradient w.r.t. the layer inputs;
    the 2N for weight gradients of full fine-tuning (Kaplan et al. 2020's 6N) is not spent
    because the base is frozen. LoRA's own FLOPs (rank r << hidden) and attention scores
    (sequences <= 128 tokens) add a few percent and are not counted: a lower bound, as in MFU."""
    return 4 * n_matmul_params


def roofline_fraction(tokens_per_s: float, flops_per_token: float, gflops: float) -> float:
    """Achieved model FLOP/s as a fraction of the measured matmul rate (1.0 = every cycle spent
    in matmuls at the rate of a large, well-shaped one)."""
    return tokens_per_s * flops_per_token / (gflops * 1e9)


def paired_roofline(tokens: list[int], seconds: list[float], flops_per_token: float,
                    gflops: list[float]) -> float:
    """Median over rounds of :func:`roofline_fraction` with the matmul rate of that round."""
    return statistics.median(roofline_fraction(n / s, flops_per_token, g)
                             for n, s, g in zip(tokens, seconds, gflops, strict=True))


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over pairs of ``numerator[i] / denominator[i]``: each pair was measured in the same
    round, so machine load common to a round cancels, and the median drops rounds where a burst
    hit only one side."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError(f"paired_ratio: need equally many (>= 1) pairs, got {len(numerator)} "
                         f"and {len(denominator)}")
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def median_rate(tokens: list[int], seconds: list[float]) -> float:
    """Median over steps of tokens / seconds (steps differ in length, so rates, not times)."""
    return statistics.median(n / s for n, s in zip(tokens, seconds))


def goal_status(measured: float | None, comparison: str, target: float) -> dict:
    """``{goal, measured, met}``; ``met`` is None when nothing was measured."""
    if measured is None:
        met = None
    elif comparison == ">=":
        met = measured >= target
    elif comparison == "<=":
        met = measured <= target
    else:
        raise ValueError(f"goal_status: unknown comparison {comparison!r}")
    return {"goal": f"{comparison} {target:g}", "measured": measured, "met": met}


def rotated(items: tuple | list, shift: int) -> list:
    """``items`` rotated left by ``shift``: the order of the paths in round ``shift``, so every
    path runs first, second, ... equally often (after a cold or a warm cache alike)."""
    k = shift % len(items)
    return list(items[k:]) + list(items[:k])
