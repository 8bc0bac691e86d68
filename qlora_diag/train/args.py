"""The one ``TrainingArguments`` of the project's training path.

The training stage (:func:`qlora_diag.train.trainer.train_adapter`) and the benchmark's project
path (:mod:`qlora_diag.tools.bench.training`) both build their Trainer's arguments here, so the
benchmark times the very step the stage runs; they differ only in where checkpoints go (the
benchmark writes none) and in the progress bar.
"""
from __future__ import annotations

from pathlib import Path

from transformers import TrainingArguments

from qlora_diag.core.config import TrainCfg

# Checkpoints kept on disk: the newest complete one is resumed from; the one before it is still
# there if a kill lands while the newest is being written.
CHECKPOINTS_KEPT = 2


def training_arguments(train: TrainCfg, *, output_dir: Path, seed: int, optim: str,
                       device_type: str, checkpoints: bool, progress_bar: bool) -> TrainingArguments:
    """``TrainingArguments`` for one run of the response-only Trainer, by group:

    - **Optimization** (``train``): batch size, ``max_steps``, learning rate and schedule,
      warm-up, weight decay and gradient clipping are the run's ``train`` section; ``optim`` is
      :func:`~qlora_diag.train.trainer.choose_optimizer`'s choice for the method and device.
    - **Order and seeds** (``seed``): ``seed`` and ``data_seed`` are the run's seed. The batch
      order itself comes from :class:`~qlora_diag.data.batching.FixedOrderSampler`; the seeds
      cover what the Trainer draws itself (dropout).
    - **Logging**: a log entry after every optimizer step, for the per-step dvclive curves;
      ``report_to="none"`` because the dvclive callback is added explicitly (step-aligned), and
      the caller removes the per-step printout.
    - **Checkpoints** (``output_dir``, ``checkpoints``): every ``train.save_every`` steps into
      ``output_dir``, the newest :data:`CHECKPOINTS_KEPT` kept, so a killed run resumes
      (:mod:`qlora_diag.train.checkpoints`); none when ``checkpoints`` is False (the benchmark
      times steps, not saving).
    - **Data**: the records' own fields (``n_prompt``) reach the collator
      (``remove_unused_columns=False``); batches are collated in the training process
      (no dataloader workers: the records are tiny and in memory).
    - **Device and dtype** (``device_type``): CPU when there is no CUDA device; dtypes are
      explicit -- the base is ``base.dtype`` / ``quant.compute_dtype`` and PEFT keeps the adapter
      in fp32; autocast (bf16/fp16) would add casts on CPU without changing what is learned.
    - **Progress bar** (``progress_bar``): the Trainer's tqdm bar, wanted on a terminal only.
    """
    if checkpoints:
        saving = dict(save_strategy="steps", save_steps=train.save_every,
                      save_total_limit=CHECKPOINTS_KEPT)
    else:
        saving = dict(save_strategy="no")
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=train.batch_size, max_steps=train.max_steps,
        learning_rate=train.lr, lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_steps, weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm, optim=optim,
        seed=seed, data_seed=seed,
        logging_steps=1, report_to="none",
        **saving,
        remove_unused_columns=False, dataloader_num_workers=0,
        use_cpu=device_type == "cpu", bf16=False, fp16=False,
        disable_tqdm=not progress_bar)
