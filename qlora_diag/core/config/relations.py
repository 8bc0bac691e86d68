"""Checks between keys of ``params.yaml``: each rule is defined once, here.

A relation runs only when all its keys passed their own checks, so a bad value is reported
once (``lora.r = 0`` as a bad rank, not again as "not in sweep.ranks"). Code that applies a rule
to what it finds on disk (generation needs that many eval examples in the prepared eval split,
which may come from other params than the current ones) calls the rule's function here rather
than restating it.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from qlora_diag.core.config.checks import show
from qlora_diag.core.errors import UserError

Relation = Callable[..., "str | None"]

# (keys, rule): the rule gets the keys' values in this order and returns the problem or None.
RELATIONS: list[tuple[tuple[str, ...], Relation]] = []


def relation(*keys: str) -> Callable[[Relation], Relation]:
    """Register a rule between the dotted ``keys``."""
    def register(fn: Relation) -> Relation:
        RELATIONS.append((keys, fn))
        return fn
    return register


def relation_problems(good: dict[str, Any]) -> list[str]:
    """The problems of every relation whose keys are all in ``good`` (the individually valid
    values by dotted key), in the order the relations are defined."""
    problems = []
    for keys, fn in RELATIONS:
        if all(k in good for k in keys):
            why = fn(*(good[k] for k in keys))
            if why:
                problems.append(why)
    return problems


@relation("lora.r", "sweep.ranks")
def rank_in_sweep(r, ranks):
    if r not in ranks:
        return (f"lora.r = {show(r)} is not in sweep.ranks {show(ranks)}: the headline "
                "comparison uses the rank-sweep runs at lora.r, so add it to sweep.ranks")


@relation("seed", "sweep.seeds")
def seed_not_in_seeds(seed, seeds):
    if seed in seeds:
        return (f"sweep.seeds {show(seeds)} contains the main seed {show(seed)}: list only the "
                "extra seeds of the noise-floor runs")


@relation("seed", "sweep.setting_seeds")
def seed_not_in_setting_seeds(seed, setting_seeds):
    if seed in setting_seeds:
        return (f"sweep.setting_seeds {show(setting_seeds)} contains the main seed {show(seed)}: "
                "list only the extra seeds of every setting")


@relation("sweep.setting_seeds", "sweep.seeds")
def setting_seeds_apart(setting_seeds, seeds):
    both = [s for s in seeds if s in setting_seeds]
    if both:
        return (f"sweep.seeds {show(seeds)} and sweep.setting_seeds {show(setting_seeds)} share "
                f"{show(both)}: the headline setting trains the setting seeds already; list only "
                "the seeds beyond them in sweep.seeds")


@relation("lora.targets", "sweep.targets")
def targets_not_in_sweep(targets, sweep_targets):
    if targets in sweep_targets:
        return (f"sweep.targets {show(sweep_targets)} contains lora.targets ({show(targets)}): "
                "that run is already trained by the rank sweep at lora.r; list only the other "
                "presets")


def exceeds_eval(key: str, n: int, n_eval: int, eval_split: str) -> str | None:
    """The rule behind ``compare.n_generate <= data.n_eval``: generation decodes the *first*
    ``n`` eval examples, so the eval split must hold at least ``n``. ``eval_split`` describes
    the split for the message (the params key, or the prepared file and its size)."""
    if n > n_eval:
        return f"{key} = {show(n)} is larger than {eval_split}"
    return None


@relation("compare.n_generate", "data.n_eval")
def generate_within_eval(n_generate, n_eval):
    return exceeds_eval("compare.n_generate", n_generate, n_eval,
                        f"data.n_eval = {show(n_eval)}: generation uses the first n_generate "
                        "eval examples")


def require_eval_examples(key: str, n: int, n_available: int, eval_path: str | Path) -> None:
    """:func:`exceeds_eval` against the prepared eval split (``n_available`` records in
    ``eval_path``): raise :class:`UserError` if it is too small. prepare writes exactly
    ``data.n_eval`` examples (issue 15: it replaces those whose prompt fills
    ``data.max_length``, or fails), so this guards a prepared split made from other params, and
    ``bench.gen_examples``, which no params rule ties to ``data.n_eval``. ``key`` names the
    knob (``compare.n_generate``; ``bench.gen_examples`` for the benchmark)."""
    why = exceeds_eval(key, n, n_available,
                       f"the eval split ({n_available} examples in {eval_path})")
    if why:
        raise UserError(why)


@relation("compare.subspace_k", "sweep.ranks")
def k_within_ranks(k, ranks):
    if k > min(ranks):
        return (f"compare.subspace_k = {show(k)} is larger than the smallest rank in sweep.ranks "
                f"({show(min(ranks))}): the subspace similarity compares the top-k singular "
                "directions, k <= r")


@relation("train.warmup_steps", "train.max_steps")
def warmup_within_training(warmup, max_steps):
    if warmup >= max_steps:
        return (f"train.warmup_steps = {show(warmup)}: must be smaller than train.max_steps "
                f"({show(max_steps)})")


@relation("bench.warmup_steps", "bench.steps")
def bench_warmup_within_steps(warmup, steps):
    if warmup >= steps:
        return (f"bench.warmup_steps = {show(warmup)} must be smaller than bench.steps = "
                f"{show(steps)}")
