"""Batched greedy decoding with shared prefixes equals one-prompt-at-a-time `generate`."""
from __future__ import annotations

import random

import pytest
import torch

from qlora_diag.tools.bench.generation import generate_one_at_a_time
from qlora_diag.train.generation import generate_greedy
from qlora_diag.train.prefix_sharing import build_prefix_tree

PREAMBLES = ([5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 12, 13], [40])


def prompts_with_shared_preambles(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [list(rng.choice(PREAMBLES)) + [rng.randrange(100, 3000) for _ in range(rng.randint(1, 9))]
            for _ in range(n)]


@pytest.fixture()
def fp32_model(tiny_base_dir):
    from qlora_diag.models.loading import load_base

    torch.manual_seed(0)
    return load_base(tiny_base_dir, "float32")


def test_prefix_tree_shares_common_prefixes():
    seqs = [[1, 2, 3, 4], [1, 2, 3, 9, 9], [1, 2, 7], [8, 8], [1, 2, 3, 4]]
    tree = build_prefix_tree(seqs)
    # nodes: 1 2 3 4 | 9 9 | 7 | 8 8 -- the duplicate row adds nothing
    assert tree.n_nodes == 4 + 2 + 1 + 2
    assert [[tree.tokens[n] for n in path] for path in tree.paths] == seqs
    assert all(tree.depths[n] == d for path in tree.paths for d, n in enumerate(path))
    assert tree.paths[0][:3] == tree.paths[1][:3] == tree.paths[4][:3]
    mask = tree.attention_mask(torch.float32, "cpu")[0, 0]
    visible = (mask == 0).int()
    for path in tree.paths:  # each node sees exactly its ancestors and itself
        for d, node in enumerate(path):
            assert visible[node].nonzero().flatten().tolist() == sorted(path[: d + 1])


def test_eager_attention_and_padded_fallback_agree(tiny_base_dir):
    """The tree mask also works with eager attention; an implementation without it (simulated
    here) takes the left-padded prefill, with the same outputs."""
    from qlora_diag.models.loading import load_base
    from qlora_diag.train import prefix_sharing

    prompts = prompts_with_shared_preambles(7, seed=5)
    outs = []
    for impl in ("sdpa", "eager", "flash_attention_2"):
        model = load_base(tiny_base_dir, "float32")
        model.config._attn_implementation = impl if impl != "flash_attention_2" else "eager"
        if impl == "flash_attention_2":
            prefix_sharing.TREE_MASK_ATTENTION, saved = (), prefix_sharing.TREE_MASK_ATTENTION
        try:
            outs.append(generate_greedy(model, prompts, max_new_tokens=5, batch_size=4, pad_id=0,
                                        eos_id=-1))
        finally:
            if impl == "flash_attention_2":
                prefix_sharing.TREE_MASK_ATTENTION = saved
    assert outs[0] == outs[1] == outs[2]


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
