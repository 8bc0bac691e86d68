"""Batched greedy decoding with shared prefixes equals one-prompt-at-a-time `generate`."""
from __future__ import annotations

import random

import pytest
import torch

from qlora_diag.bench import generate_one_at_a_time
from qlora_diag.generation import generate_greedy
from qlora_diag.prefix_sharing import shared_prefix_lengths

PREAMBLES = ([5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 12, 13], [40])


def prompts_with_shared_preambles(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [list(rng.choice(PREAMBLES)) + [rng.randrange(100, 3000) for _ in range(rng.randint(1, 9))]
            for _ in range(n)]


@pytest.fixture()
def fp32_model(tiny_base_dir):
    from qlora_diag.models import load_base

    torch.manual_seed(0)
    return load_base(tiny_base_dir, "float32")


def test_shared_prefix_lengths():
    prompts = [[1, 2, 7], [8, 8], [1, 2, 3, 4], [1, 2, 3, 9, 9]]
    limits = [len(p) - 1 for p in prompts]
    # each prompt's longest prefix shared with another one, at least 1, at most its limit
    assert shared_prefix_lengths(prompts, limits) == [2, 1, 3, 3]
    assert shared_prefix_lengths(prompts, [1, 1, 2, 9]) == [1, 1, 2, 3]
    assert shared_prefix_lengths([[4, 4, 4]], [2]) == [1]
    assert shared_prefix_lengths([[1, 2], [1, 2]], [1, 1]) == [1, 1]


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_batched_equals_one_at_a_time(fp32_model, batch_size):
    prompts = prompts_with_shared_preambles(11, seed=batch_size)
    # an eos the model does produce, so rows finish at different steps and leave the batch
    free = generate_one_at_a_time(fp32_model, prompts, max_new_tokens=6, pad_id=0, eos_id=-1)
    eos = free[0][2]
    single = generate_one_at_a_time(fp32_model, prompts, max_new_tokens=6, pad_id=0, eos_id=eos)
    batched = generate_greedy(fp32_model, prompts, max_new_tokens=6, batch_size=batch_size,
                              pad_id=0, eos_id=eos)
    assert batched == single
    assert len({len(o) for o in single}) > 1  # the test exercised rows finishing early


def test_one_token_prompts_and_zero_new_tokens(fp32_model):
    prompts = [[7], [7, 8, 9], [300, 301]]
    single = generate_one_at_a_time(fp32_model, prompts, max_new_tokens=4, pad_id=0, eos_id=-1)
    assert generate_greedy(fp32_model, prompts, max_new_tokens=4, batch_size=8, pad_id=0,
                           eos_id=-1) == single
    assert generate_greedy(fp32_model, prompts, max_new_tokens=0, batch_size=8, pad_id=0,
                           eos_id=-1) == [[], [], []]


def test_restores_training_mode(fp32_model):
    fp32_model.train()
    generate_greedy(fp32_model, [[1, 2, 3]], max_new_tokens=2, batch_size=1, pad_id=0, eos_id=-1)
    assert fp32_model.training
