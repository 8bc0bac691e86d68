"""The typed parameters: one frozen dataclass per section of ``params.yaml``.

Every field is required (the values and the comments on what each knob trades live in
``params.yaml``; nothing is defaulted here) and carries its value checks (:mod:`.checks`); the
docstring under each field says what the value means. :func:`~.load.load_params` builds a
:class:`Params` from the file.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

from qlora_diag.core.config.checks import (
    base_model_problem,
    checked,
    data_source_problem,
    each,
    exactly,
    no_duplicates,
    non_negative,
    not_empty,
    one_of,
    positive,
    positive_or_auto,
    preset_problem,
    seed_range,
    targets_problem,
)
from qlora_diag.core.config.choices import (
    DTYPES,
    OPTIMIZERS,
    QUANT_TYPES,
    SCHEDULERS,
    SETTING_SEED_SLOTS,
)


@dataclasses.dataclass(frozen=True)
class BaseCfg:
    """``base``: the 16-bit base model both methods start from."""

    model: str = checked(base_model_problem)
    """``embedded:smollm2-135m-instruct``, ``embedded:tiny-llama`` (random, for tests), a Hugging
    Face causal-LM id or a local model directory."""
    dtype: str = checked(one_of(*DTYPES))
    """dtype of LoRA's base weights; ``auto`` = bfloat16 where bf16 matmuls are native, else
    float32."""


@dataclasses.dataclass(frozen=True)
class DataCfg:
    """``data``: the instruction data set and its split."""

    source: str = checked(data_source_problem)
    """``embedded:probe``, a Hugging Face data set id or a local Alpaca ``.json``/``.jsonl``."""
    n_train: int = checked(positive)
    """Examples in the train split."""
    n_eval: int = checked(positive)
    """Examples in the eval split (stratified by task)."""
    max_length: int = checked(lambda v: None if v >= 16 else "must be at least 16 tokens")
    """Tokens per example (prompt + response); longer responses are truncated, examples whose
    prompt alone fills it are replaced by others of the source."""
    max_truncated_share: float = checked(lambda v: None if 0 <= v <= 1 else
                                         "must be in [0, 1] (a share of a split's examples)")
    """prepare warns when more than this share of a split's responses is cut at
    ``max_length``, naming the length that holds 95 % of the examples whole."""


@dataclasses.dataclass(frozen=True)
class QuantCfg:
    """``quant``: the 4-bit base of QLoRA (bitsandbytes)."""

    type: str = checked(one_of(*QUANT_TYPES))
    """4-bit data type, ``nf4`` or ``fp4``."""
    double_quant: bool = checked()
    """Quantize the absmax constants too (fewer bits per parameter)."""
    compute_dtype: str = checked(one_of(*DTYPES))
    """dtype the 4-bit weights are dequantized to per matmul; ``auto`` resolves like
    ``base.dtype``."""


@dataclasses.dataclass(frozen=True)
class LoraCfg:
    """``lora``: the adapter of the headline comparison."""

    r: int = checked(lambda v: None if v >= 1 else "the rank must be a positive integer")
    """Rank of the headline comparison and of the module sweep; must be in ``sweep.ranks``."""
    alpha: float = checked(lambda v: None if v > 0 else
                           "must be > 0 (the update is scaled by alpha/r)")
    """The update is scaled by alpha/r; alpha stays fixed across the rank sweep."""
    dropout: float = checked(lambda v: None if 0 <= v < 1 else "must be in [0, 1)")
    """Dropout on the LoRA input."""
    targets: str = checked(targets_problem, comma_list=True)
    """A preset (see :data:`~.choices.PRESETS`) or comma-separated module names."""


@dataclasses.dataclass(frozen=True)
class TrainCfg:
    """``train``: the optimizer and the training loop of every run."""

    max_steps: int = checked(positive)
    """Optimizer steps per run."""
    batch_size: int = checked(positive)
    """Examples per step (dynamic padding)."""
    lr: float = checked(lambda v: None if 0 < v < 1 else
                        "must be in (0, 1); LoRA typically uses 1e-4..1e-3")
    """Peak learning rate."""
    lr_scheduler: str = checked(one_of(*SCHEDULERS))
    """Learning-rate schedule after warm-up."""
    warmup_steps: int = checked(non_negative)
    """Linear warm-up steps; fewer than ``max_steps``."""
    weight_decay: float = checked(non_negative)
    """AdamW's decoupled weight decay on the adapter weights."""
    max_grad_norm: float = checked(lambda v: None if v > 0 else "must be > 0")
    """Gradient clipping norm."""
    optimizer: str = checked(one_of(*OPTIMIZERS))
    """``auto`` = paged_adamw_32bit on CUDA for both methods, adamw_torch otherwise."""
    group_by_length: bool = checked()
    """Batch examples of similar length (less padding)."""
    share_prefix: bool = checked()
    """Encode a prompt prefix that rows of a batch share once per step."""
    kbit_prep: bool = checked()
    """QLoRA only: run ``peft.prepare_model_for_kbit_training`` (without its checkpointing)."""
    gradient_checkpointing: bool = checked()
    """Recompute decoder-layer activations in the backward pass, for both methods alike."""
    eval_every: int = checked(positive)
    """Steps between eval-loss evaluations."""
    save_every: int = checked(positive)
    """Steps between resume checkpoints."""
    threads: int = checked(lambda v: None if v >= 0 else "must be >= 0 (0 = all cores)")
    """torch CPU threads; 0 = all cores."""


@dataclasses.dataclass(frozen=True)
class SweepCfg:
    """``sweep``: the runs beyond the headline pair."""

    ranks: list[int] = checked(not_empty("list at least one rank, e.g. [2, 4, 8, 16]"),
                               no_duplicates, each(positive))
    """Rank-threshold sweep: LoRA and QLoRA at each rank, targets ``lora.targets``."""
    seeds: list[int] = checked(not_empty("the noise floor needs at least one extra seed, e.g. [1]"),
                               no_duplicates, each(seed_range))
    """Extra seeds of LoRA and QLoRA at the headline setting (rank ``lora.r``, ``lora.targets``)
    beyond ``seed`` and ``setting_seeds``: with them, the noise floor and the headline interval's
    paired seeds. The first is also the data-order seed of the same-init control runs
    (``control_*``)."""
    setting_seeds: list[int] = checked(exactly(SETTING_SEED_SLOTS, "dvc.yaml's train_*/modules_* "
                                               "stages name one output per seed slot; to change the count, "
                                               "edit their cmd and outs and SETTING_SEED_SLOTS"),
                                       no_duplicates, each(seed_range))
    """Extra seeds of every setting (each rank of ``ranks``, each preset of ``targets``, and
    the headline), trained with ``seed`` in one process per setting; exactly
    ``SETTING_SEED_SLOTS`` of them (dvc.yaml names their outputs slot by slot)."""
    targets: list[str] = checked(no_duplicates, each(preset_problem))
    """Module-sensitivity sweep at rank ``lora.r``: presets other than ``lora.targets``."""


@dataclasses.dataclass(frozen=True)
class CompareCfg:
    """``compare``: the LoRA-vs-QLoRA measures."""

    cos_threshold: float = checked(lambda v: None if 0 < v <= 1 else "must be in (0, 1]")
    """Updates with a cosine above this count as nearly identical."""
    n_generate: int = checked(positive)
    """The first n eval examples are decoded greedily per run; at most ``data.n_eval``."""
    max_new_tokens: int | Literal["auto"] = checked(positive_or_auto)
    """Longest generated answer, in tokens (eos included); ``auto`` = the length that 95 % of
    the train split's responses fit in, resolved by prepare (:mod:`qlora_diag.data.resolved`)."""
    gen_batch_size: int = checked(positive)
    """Batch size of generation and of the no-grad forward passes."""
    subspace_k: int = checked(positive)
    """Top-k singular directions of the subspace similarity; at most the smallest rank."""
    margin: float = checked(lambda v: None if v > 0 else
                            "must be > 0 (an equivalence margin in nats/token, e.g. 0.05)")
    """Equivalence margin δ for the paired eval-loss gap QLoRA − LoRA, in nats/token: the
    verdict is *equivalent* when the 90 % interval of the gap lies inside ±δ, *QLoRA worse /
    better* when the 95 % interval excludes 0 and the estimate is beyond δ (RESEARCH.md)."""
    margin_exact_match: float = checked(lambda v: None if v > 0 else
                                        "must be > 0 (an equivalence margin in exact-match "
                                        "points, e.g. 5)")
    """Equivalence margin for the paired exact-match gap, in percentage points."""
    n_boot: int = checked(lambda v: None if v >= 200 else
                          "must be an integer >= 200 (bootstrap replicates; 2000 is usual)")
    """Replicates of the hierarchical bootstrap (seeds, then eval examples within a seed)."""


@dataclasses.dataclass(frozen=True)
class BenchCfg:
    """``bench``: the speed and memory benchmark (``make bench``)."""

    steps: int = checked(positive)
    """Timed training steps per method and path."""
    warmup_steps: int = checked(non_negative)
    """Steps before timing starts; fewer than ``steps``."""
    batch_size: int = checked(positive)
    """Examples per benchmark step."""
    rank: int = checked(positive)
    """LoRA rank in the benchmark."""
    gen_examples: int = checked(positive)
    """Eval examples of the batched vs one-at-a-time generation benchmark."""
    paired_seeds: int = checked(positive)
    """Paired seeds (the first of the headline seeds) timed both ways, one run per process and
    all seeds of a method in one process, at the headline setting with the run's recipe."""


@dataclasses.dataclass(frozen=True)
class Params:
    """All of ``params.yaml``."""

    seed: int = checked(seed_range)
    """Main seed: probe generation, data split, adapter init and data order."""
    base: BaseCfg = checked()
    data: DataCfg = checked()
    quant: QuantCfg = checked()
    lora: LoraCfg = checked()
    train: TrainCfg = checked()
    sweep: SweepCfg = checked()
    compare: CompareCfg = checked()
    bench: BenchCfg = checked()


def setting_seeds(p: Params) -> list[int]:
    """The paired seeds of every setting of the sweeps: ``seed``, then ``sweep.setting_seeds``."""
    return [p.seed, *p.sweep.setting_seeds]


def headline_seeds(p: Params) -> list[int]:
    """The paired seeds of the headline setting (rank ``lora.r``, ``lora.targets``): the
    setting seeds, then ``sweep.seeds``."""
    return [*setting_seeds(p), *p.sweep.seeds]
