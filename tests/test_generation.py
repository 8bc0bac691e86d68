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


# --- sliding-window models (issue 15) ----------------------------------------------------------

def tiny_mistral(window: int):
    """A random 2-layer Mistral whose layers attend to the last ``window`` positions only."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=3000, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        sliding_window=window, max_position_embeddings=128, pad_token_id=0,
                        eos_token_id=1, bos_token_id=2, attn_implementation="sdpa")
    return MistralForCausalLM(cfg).eval()


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                         dtype=torch.long), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("window", [4, 64])
def test_sliding_window_model_generates_what_generate_does(window):
    """Window 4, shorter than every prompt: the packed prefill kept only the last nodes in its
    sliding cache and indexed past them (IndexError before the fix); the prompts now decode
    one at a time. Window 64, longer than prompt + answer: the packed path is exact and used."""
    from qlora_diag.train.prefix_sharing import attention_window

    model = tiny_mistral(window)
    assert attention_window(model.config) == window
    prompts = prompts_with_shared_preambles(6, seed=4)
    want = [hf_greedy(model, p, 6) for p in prompts]
    got = generate_greedy(model, prompts, max_new_tokens=6, batch_size=8, pad_id=0, eos_id=1)
    assert got == want


def test_sliding_window_model_loss_is_the_models_own():
    """Training and evaluation pack rows as a tree with full causal attention among ancestors;
    a model with a 4-position window attends to less, so the packed loss was another model's.
    The loss must equal transformers' own loss of the padded batch."""
    from qlora_diag.data.batching import collate
    from qlora_diag.train.losses import response_loss_sum

    model = tiny_mistral(4).float()
    rows = [{"input_ids": p + [7, 8, 9], "n_prompt": len(p)}
            for p in prompts_with_shared_preambles(5, seed=2)]
    batch = collate(rows, pad_id=0)
    ours, n = response_loss_sum(model, batch["input_ids"], batch["attention_mask"],
                                batch["labels"], share_prefix=True)
    torch.testing.assert_close(ours / n, model(**batch).loss, rtol=1e-5, atol=1e-6)


# --- packing fallback (issue 15) ---------------------------------------------------------------

def test_tree_is_used_only_when_it_saves_enough(monkeypatch):
    from qlora_diag.train import prefix_sharing as ps

    shared = ps.build_prefix_tree([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12]])
    assert (shared.n_nodes, shared.n_tokens) == (12, 22) and ps.tree_saves_enough(shared)
    # one shared token of 22: 1/22 < MIN_SAVED_SHARE
    apart = ps.build_prefix_tree([[1] + list(range(20, 30)), [1] + list(range(40, 50))])
    assert (apart.n_nodes, apart.n_tokens) == (21, 22) and not ps.tree_saves_enough(apart)
    monkeypatch.setattr(ps, "MAX_TREE_NODES", 11)  # the shared tree has 12 nodes
    assert not ps.tree_saves_enough(shared)


def test_sliding_window_decides_exact_packing(tiny_model):
    from qlora_diag.train.losses import decoder_parts
    from qlora_diag.train.prefix_sharing import packs_exactly

    assert packs_exactly(decoder_parts(tiny_model)[0], 10_000)  # Llama: no window
    backbone = decoder_parts(tiny_mistral(8))[0]
    assert packs_exactly(backbone, 8) and not packs_exactly(backbone, 9)


@pytest.mark.parametrize("min_saved", [0.0, 1.1])  # always packed, never packed
def test_packed_and_padded_paths_give_the_same_loss(fp32_model, monkeypatch, min_saved):
    from qlora_diag.data.batching import collate
    from qlora_diag.train import prefix_sharing as ps
    from qlora_diag.train.losses import response_loss_sum

    rows = [{"input_ids": p + [7, 8, 9], "n_prompt": len(p)}
            for p in prompts_with_shared_preambles(6, seed=3)]
    batch = collate(rows, pad_id=2)
    monkeypatch.setattr(ps, "MIN_SAVED_SHARE", min_saved)
    calls = []
    monkeypatch.setattr("qlora_diag.train.losses.tree_forward",
                        lambda *a, **k: calls.append(1) or ps.tree_forward(*a, **k))
    ours, n = response_loss_sum(fp32_model, batch["input_ids"], batch["attention_mask"],
                                batch["labels"], share_prefix=True)
    assert len(calls) == (1 if min_saved == 0.0 else 0)
    torch.testing.assert_close(ours / n, fp32_model(**batch).loss, rtol=1e-6, atol=1e-6)
