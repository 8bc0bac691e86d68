"""Shared prompt prefixes computed once: a batch packed as a prefix tree.

Instruction data repeats long prompt prefixes: the Alpaca template's preamble is 24–34 of the
~50 prompt tokens of every probe example, a chat template repeats its system turn. Under causal
attention a token's hidden state depends only on the tokens before it, so rows that start with
the same tokens have the same hidden states there. A batch is therefore packed as a trie of its
rows: one node per distinct (prefix, token), in a single sequence. Each node attends to its
ancestors and itself (a tree-shaped attention mask) at its depth as position, so every node
computes exactly the hidden state it has in each row that contains it, and each row's positions
are read back from the nodes on its path.

One forward pass over the nodes replaces a padded pass over every row's tokens: on the probe
data about a third fewer tokens, and no padding. In training, gradients from every row that
uses a node collect in it, so loss and gradient are those of the unshared batch (up to float
summation order); the one difference is LoRA dropout, whose mask on a shared node is drawn once
instead of once per row (``train.share_prefix: false`` turns sharing off in training).

Works with attention implementations that take an arbitrary additive mask (``sdpa``, ``eager``);
others (e.g. flash attention) fall back to the unshared pass (:func:`supports_tree_mask`).
"""
from __future__ import annotations

import dataclasses

import torch

TREE_MASK_ATTENTION = ("sdpa", "eager")


@dataclasses.dataclass
class PrefixTree:
    """A batch of token sequences packed as a trie (nodes in creation order)."""

    tokens: list[int]        # token of each node
    parents: list[int]       # parent node of each node (-1 for a first token)
    depths: list[int]        # position of each node in its sequences
    paths: list[list[int]]   # the node of each position of each sequence

    @property
    def n_nodes(self) -> int:
        return len(self.tokens)

    def input_ids(self, device) -> torch.Tensor:
        return torch.tensor([self.tokens], dtype=torch.long, device=device)

    def position_ids(self, device) -> torch.Tensor:
        return torch.tensor([self.depths], dtype=torch.long, device=device)

    @property
    def n_tokens(self) -> int:
        """Tokens of the unpacked sequences (what a padded batch computes, pads aside)."""
        return sum(len(p) for p in self.paths)

    def attention_mask(self, dtype: torch.dtype, device) -> torch.Tensor:
        """(1, 1, nodes, nodes) additive mask: 0 where a node may attend (its ancestors and
        itself), the dtype's minimum elsewhere. Built on ``device``, one step per sequence:
        the nodes on a sequence's path see each other causally (issue 15: a Python loop per
        node on the CPU, then a copy)."""
        n = self.n_nodes
        visible = torch.zeros((n, n), dtype=torch.bool, device=device)
        for path in self.paths:
            idx = torch.tensor(path, dtype=torch.long, device=device)
            causal = torch.ones((len(path), len(path)), dtype=torch.bool, device=device).tril()
            visible[idx[:, None], idx[None, :]] |= causal
        mask = torch.zeros((n, n), dtype=dtype, device=device)
        return mask.masked_fill_(~visible, torch.finfo(dtype).min)[None, None]


def build_prefix_tree(seqs: list[list[int]]) -> PrefixTree:
    tokens, parents, depths, paths = [], [], [], []
    children: dict[tuple[int, int], int] = {}
    for seq in seqs:
        node, path = -1, []
        for depth, tok in enumerate(seq):
            key = (node, tok)
            if key not in children:
                children[key] = len(tokens)
                tokens.append(tok)
                parents.append(node)
                depths.append(depth)
            node = children[key]
            path.append(node)
        paths.append(path)
    return PrefixTree(tokens, parents, depths, paths)


def supports_tree_mask(backbone) -> bool:
    return getattr(backbone.config, "_attn_implementation", None) in TREE_MASK_ATTENTION


# Packing pays when the rows share enough: below this share of tokens saved, a padded batch
# (which SDPA can run with its fused kernels, no dense mask) is used instead.
MIN_SAVED_SHARE = 0.1
# The mask is dense, nodes x nodes: 4096 nodes are 16.8 M entries (34 MB in bf16) per forward
# and attention over all of them; larger packs go padded.
MAX_TREE_NODES = 4096


def tree_saves_enough(tree: PrefixTree) -> bool:
    """Whether packing ``tree`` is worth its dense mask: at most :data:`MAX_TREE_NODES` nodes,
    and at least :data:`MIN_SAVED_SHARE` of the batch's tokens computed once instead of per row
    (issue 15: on Alpaca-like data prompts share little)."""
    if tree.n_nodes > MAX_TREE_NODES:
        return False
    return 1 - tree.n_nodes / tree.n_tokens >= MIN_SAVED_SHARE


def packs_exactly(backbone, longest: int) -> bool:
    """Whether a tree-packed pass equals the padded one for ``backbone``: the attention
    implementation takes an arbitrary mask, and no sequence (``longest`` positions) reaches
    past a sliding window (:func:`attention_window`)."""
    window = attention_window(backbone.config)
    return supports_tree_mask(backbone) and (window is None or longest <= window)


def attention_window(config) -> int | None:
    """The fewest past positions any layer attends to: the ``sliding_window`` (or attention
    chunk) of models with sliding-window layers (Mistral, Phi-3, Gemma 2/3), None when every
    layer attends to the whole sequence. Read the way transformers' own caches read it.

    A tree mask is the full causal mask restricted to a row's ancestors, so packing is exact
    for such a model only while every sequence fits in the window; beyond it the model attends
    to fewer positions than the tree shows (issue 15)."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    _, per_layer = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    windows = [kw["sliding_window"] for kw in per_layer if kw.get("sliding_window")]
    return min(windows) if windows else None


def compute_dtype(backbone) -> torch.dtype:
    """The dtype hidden states are computed in (the input embeddings' dtype)."""
    return backbone.get_input_embeddings().weight.dtype


def tree_forward(backbone, tree: PrefixTree, device, *, cache=None):
    """The decoder's output for every node of ``tree`` (batch of one packed sequence)."""
    return backbone(input_ids=tree.input_ids(device),
                    attention_mask=tree.attention_mask(compute_dtype(backbone), device),
                    position_ids=tree.position_ids(device), past_key_values=cache,
                    use_cache=cache is not None)
