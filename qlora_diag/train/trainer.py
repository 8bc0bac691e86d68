"""One training function for any (method, rank, targets, seed): LoRA or QLoRA, same code path.

The only difference between the methods is the base: the 16-bit model of the ``base`` stage for
LoRA, the bitsandbytes 4-bit model of the ``quantize`` stage for QLoRA. For one seed both see the
same batches in the same order and start from identical adapter weights.

Training runs on transformers' ``Trainer`` with PEFT (arguments: :mod:`qlora_diag.train.args`,
callbacks: :mod:`qlora_diag.train.callbacks`); the loss is response-only and runs the LM head
only on response positions (:mod:`qlora_diag.train.losses`). An interrupted run resumes from
its newest complete checkpoint (:mod:`qlora_diag.train.checkpoints`); the checkpoints are
removed when the run completes. The adapter and the report directory are written by
:mod:`qlora_diag.train.outputs`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import torch
from transformers import Trainer, set_seed
from transformers.trainer_callback import PrinterCallback

from qlora_diag.core.config import LoraCfg, TrainCfg, run_name
from qlora_diag.core.errors import UserError
from qlora_diag.core.examples import example_rows
from qlora_diag.core.machine import choose_device, resolve_dtype
from qlora_diag.data.batching import (
    FixedOrderSampler,
    RecordDataset,
    collate,
    training_order,
)
from qlora_diag.data.overlap import reference_chrf
from qlora_diag.data.splits import load_split
from qlora_diag.models.loading import (
    base_model_reference,
    load_base,
    load_quantized,
    load_tokenizer,
)
from qlora_diag.models.targets import min_adapted_dim, resolve_targets
from qlora_diag.train.args import training_arguments
from qlora_diag.train.callbacks import EvalAndTimingCallback, StepAlignedDVCLive
from qlora_diag.train.checkpoints import (
    dir_digest,
    file_digest,
    fingerprint,
    open_checkpoint_dir,
    restore_live_dir,
    step_of,
)
from qlora_diag.train.generation import (
    exact_match_summary,
    generate_greedy,
    generation_examples,
    generation_records,
    prompt_ids,
)
from qlora_diag.train.losses import evaluate_examples, response_loss_sum
from qlora_diag.train.memory import PeakMemory, memory_measure
from qlora_diag.train.outputs import write_adapter, write_run_report

METHODS = ("lora", "qlora")
# The first steps pay for allocator growth and lazy initialization; timing starts after them.
TIMING_WARMUP_STEPS = 2


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Identity of one training run. ``seed`` draws the adapter init; ``data_seed`` the batch
    order and the dropout masks (default: ``seed``). A ``data_seed`` other than ``seed`` makes
    the same-init control: the same initial A and B as the run of ``seed``, other batches."""

    method: str
    rank: int
    targets: str
    seed: int
    data_seed: int | None = None

    def __post_init__(self):
        if self.data_seed is None:
            object.__setattr__(self, "data_seed", self.seed)

    @property
    def name(self) -> str:
        return run_name(self.method, self.rank, self.targets, self.seed, self.data_seed)


@dataclasses.dataclass(frozen=True)
class GenerationCfg:
    """Greedy evaluation by generation on the first ``n_generate`` eval examples."""

    n_generate: int
    max_new_tokens: int
    batch_size: int


def choose_optimizer(setting: str, device_type: str) -> str:
    """``auto``: the QLoRA paper's paged AdamW on CUDA (it pages optimizer state to CPU memory
    under pressure), plain AdamW elsewhere (paged optimizers need CUDA). The choice does not
    depend on the method: LoRA and QLoRA get the same optimizer, so they differ in the base
    only (issue 15: paged AdamW for QLoRA alone was a second difference)."""
    if setting == "auto":
        return "paged_adamw_32bit" if device_type == "cuda" else "adamw_torch"
    if setting.startswith("paged") and device_type != "cuda":
        raise UserError(f"train.optimizer = {setting!r}: paged optimizers need a CUDA device and "
                        f"this run is on {device_type}; use auto or adamw_torch")
    return setting


def load_method_base(method: str, *, base_dir: Path, quant_dir: Path, base_dtype: str,
                     compute_dtype: str, device: torch.device):
    """LoRA trains on the 16-bit base, QLoRA on the 4-bit one; nothing else differs."""
    if method == "lora":
        return load_base(base_dir, base_dtype).to(device)
    if method == "qlora":
        return load_quantized(quant_dir, compute_dtype)
    raise UserError(f"method {method!r}: must be one of {', '.join(METHODS)}")


def load_training_base(method: str, *, base_dir: Path, quant_dir: Path, base_dtype: str,
                       compute_dtype: str, kbit_prep: bool, device: torch.device):
    """:func:`load_method_base`, for QLoRA passed through PEFT's
    ``prepare_model_for_kbit_training`` when ``train.kbit_prep`` is set: the model the adapter
    is attached to. Its gradient checkpointing stays off: that is ``train.gradient_checkpointing``,
    applied to both methods by :func:`set_gradient_checkpointing` (issue 15: kbit_prep turned it
    on for QLoRA alone)."""
    model = load_method_base(method, base_dir=base_dir, quant_dir=quant_dir,
                             base_dtype=base_dtype, compute_dtype=compute_dtype, device=device)
    if method == "qlora" and kbit_prep:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def set_gradient_checkpointing(model, on: bool) -> None:
    """Turn activation checkpointing of every decoder layer on (or leave it off) for a PEFT
    model, the same call for both methods. Non-reentrant checkpointing: the frozen base's inputs
    need no ``requires_grad``, and the recomputation replays the RNG state, so LoRA dropout draws
    the same masks and the gradients equal those without checkpointing. It acts in training
    mode only; evaluation and generation run as before."""
    if on:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})


def attach_lora(model, *, rank: int, alpha: float, dropout: float, targets: str, seed: int):
    """Wrap ``model`` in a PEFT LoRA adapter whose initial A and B depend only on ``seed``."""
    from peft import LoraConfig, get_peft_model

    names = resolve_targets(model, targets)
    limit = min_adapted_dim(model, names)
    if rank > limit:
        raise UserError(f"rank {rank} (lora.r / sweep.ranks) is larger than the smallest adapted "
                        f"dimension ({limit}) of {targets!r}; a LoRA rank above it adds nothing")
    for p in model.parameters():
        p.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=names,
                        bias="none", task_type="CAUSAL_LM")
    set_seed(seed)  # adapter init (kaiming A, zero B) draws from this seed only
    return get_peft_model(model, config)


class ResponseOnlyTrainer(Trainer):
    """Trainer with the response-only loss and a fixed, seed-determined batch order."""

    def __init__(self, *args, order: list[int], share_prefix: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.order = order
        self.share_prefix = share_prefix
        self.tokens_per_step: dict[int, int] = {}

    def _get_train_sampler(self, train_dataset=None):
        return FixedOrderSampler(self.order)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, n = response_loss_sum(model, inputs["input_ids"], inputs["attention_mask"],
                                    inputs["labels"], share_prefix=self.share_prefix)
        self.tokens_per_step[self.state.global_step + 1] = int(inputs["attention_mask"].sum())
        return loss / max(n, 1)


def build_trainer(model, args, records: list[dict], *, pad_id: int, order: list[int],
                  share_prefix: bool, callbacks: list) -> ResponseOnlyTrainer:
    """The project's Trainer over ``records`` in ``order``; progress is reported by
    ``callbacks`` (one line per eval) instead of a dict printed per step."""
    trainer = ResponseOnlyTrainer(
        model=model, args=args, train_dataset=RecordDataset(records),
        data_collator=lambda rs: collate(rs, pad_id), order=order,
        share_prefix=share_prefix, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)
    return trainer


@dataclasses.dataclass(frozen=True)
class RunInputs:
    """What every run of one process reads alike: the tokenizer and the data splits."""

    tokenizer: object
    train_records: list
    eval_records: list
    gen_records: list
    train_digest: str


def load_run_inputs(*, base_dir: Path, data_dir: Path, gen: GenerationCfg) -> RunInputs:
    tokenizer = load_tokenizer(base_dir)
    eval_records = load_split(data_dir / "eval.jsonl")
    return RunInputs(
        tokenizer=tokenizer, train_records=load_split(data_dir / "train.jsonl"),
        eval_records=eval_records,
        gen_records=generation_examples(eval_records, gen.n_generate, key="compare.n_generate",
                                        path=data_dir / "eval.jsonl"),
        train_digest=file_digest(data_dir / "train.jsonl"))


def run_fingerprint(spec: RunSpec, lora: LoraCfg, train: TrainCfg, inputs: RunInputs,
                    trained_on: Path) -> str:
    """Everything a run's training depends on: a checkpoint under another fingerprint is stale."""
    return fingerprint(dataclasses.asdict(spec), dataclasses.asdict(lora),
                       dataclasses.asdict(train), inputs.train_digest, dir_digest(trained_on))


def train_adapter(spec: RunSpec, *, base_dir: Path, quant_dir: Path, data_dir: Path,
                  base_dtype: str, compute_dtype: str, lora: LoraCfg, train: TrainCfg,
                  gen: GenerationCfg, adapter_out: Path, report_dir: Path,
                  checkpoint_root: Path) -> dict:
    """Train one adapter, evaluate it, and write the adapter and its report directory.

    Returns the run's metrics (also written to ``report_dir/run.json``). Several runs over one
    loaded base: :mod:`qlora_diag.train.multi_run`.
    """
    t_start = time.perf_counter()
    device = choose_device()
    inputs = load_run_inputs(base_dir=base_dir, data_dir=data_dir, gen=gen)
    model = load_training_base(spec.method, base_dir=base_dir, quant_dir=quant_dir,
                               base_dtype=base_dtype, compute_dtype=compute_dtype,
                               kbit_prep=train.kbit_prep, device=device)
    trained_on = quant_dir if spec.method == "qlora" else base_dir
    metrics, _ = train_on_base(spec, model, inputs, trained_on=trained_on, device=device,
                               base_dtype=base_dtype, compute_dtype=compute_dtype, lora=lora,
                               train=train, gen=gen, adapter_out=adapter_out,
                               report_dir=report_dir, checkpoint_root=checkpoint_root,
                               t_start=t_start)
    shutil.rmtree(checkpoint_root / spec.name, ignore_errors=True)
    return metrics


def train_on_base(spec: RunSpec, model, inputs: RunInputs, *, trained_on: Path,
                  device: torch.device, base_dtype: str, compute_dtype: str, lora: LoraCfg,
                  train: TrainCfg, gen: GenerationCfg, adapter_out: Path, report_dir: Path,
                  checkpoint_root: Path, t_start: float):
    """Attach a fresh adapter to the loaded ``model`` (the base from ``trained_on``), train,
    evaluate and write it; resumes from ``checkpoint_root/<run>`` and leaves that directory for
    the caller to remove. Returns (metrics, the PEFT model); ``peft_model.unload()`` gives the
    base back without the adapter."""
    from dvclive import Live

    optim = choose_optimizer(train.optimizer, device.type)
    tokenizer = inputs.tokenizer
    train_records, eval_records, gen_records = (inputs.train_records, inputs.eval_records,
                                                inputs.gen_records)
    model = attach_lora(model, rank=spec.rank, alpha=lora.alpha, dropout=lora.dropout,
                        targets=spec.targets, seed=spec.seed)
    set_gradient_checkpointing(model, train.gradient_checkpointing)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    order = training_order([len(r["input_ids"]) for r in train_records], train.batch_size,
                           train.max_steps, spec.data_seed, train.group_by_length)

    ckpt_dir = checkpoint_root / spec.name
    resume = open_checkpoint_dir(ckpt_dir, run_fingerprint(spec, lora, train, inputs, trained_on))
    live_dir = ckpt_dir / "live"
    if resume is not None:
        step = json.loads((resume / "trainer_state.json").read_text())["global_step"]
        restore_live_dir(live_dir, step)
        print(f"{spec.name}: resuming from {resume.name} (step {step}/{train.max_steps})", flush=True)
    live = Live(str(live_dir), resume=resume is not None, dvcyaml=False, save_dvc_exp=False)

    args = training_arguments(train, output_dir=ckpt_dir, seed=spec.data_seed, optim=optim,
                              device_type=device.type, checkpoints=True,
                              progress_bar=os.isatty(2))
    evals = EvalAndTimingCallback(live, model, eval_records, train.batch_size * 2,
                                  tokenizer.pad_token_id, train.eval_every, train.max_steps)
    trainer = build_trainer(model, args, train_records, pad_id=tokenizer.pad_token_id,
                            order=order, share_prefix=train.share_prefix,
                            callbacks=[StepAlignedDVCLive(live=live), evals])
    live.log_params({"run": spec.name, **dataclasses.asdict(spec), "optimizer": optim,
                     "device": device.type, "base_dtype": resolve_dtype(base_dtype),
                     "compute_dtype": resolve_dtype(compute_dtype), "kbit_prep": train.kbit_prep,
                     "trainable_params": trainable,
                     "memory_measure": memory_measure(PeakMemory(device).description, optim)})

    with PeakMemory(device) as mem:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    model.eval()

    # The curve's last point was evaluated after the final step; an interrupted-and-resumed run
    # whose last step completed before the kill has none, so it is computed then.
    t_eval = time.perf_counter()
    final = evals.last_eval or evaluate_examples(model, eval_records, train.batch_size * 2,
                                                 tokenizer.pad_token_id)
    eval_s = evals.eval_s + time.perf_counter() - t_eval
    eval_loss, eval_tokens = final.loss, final.n_tokens
    t_gen = time.perf_counter()
    outputs = generate_greedy(model, prompt_ids(gen_records),
                              max_new_tokens=gen.max_new_tokens, batch_size=gen.batch_size,
                              pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id)
    gen_s = time.perf_counter() - t_gen
    rows = generation_records(gen_records, outputs, tokenizer)

    timed = [s for s in sorted(evals.step_times) if s > TIMING_WARMUP_STEPS]
    step_s = [evals.step_times[s] for s in timed]
    tokens = [trainer.tokens_per_step.get(s, 0) for s in timed]
    metrics = {
        "run": spec.name, **dataclasses.asdict(spec), "optimizer": optim, "device": device.type,
        "dtype": resolve_dtype(base_dtype if spec.method == "lora" else compute_dtype),
        "kbit_prep": spec.method == "qlora" and train.kbit_prep,
        "trainable_params": trainable,
        "eval_loss": eval_loss, "eval_perplexity": float(torch.exp(torch.tensor(eval_loss))),
        "eval_tokens": eval_tokens,
        "train_loss_final": next((h["loss"] for h in reversed(trainer.state.log_history)
                                  if "loss" in h), None),
        **exact_match_summary(rows),
        "chrf": reference_chrf(rows),  # the quality measure of free-form answers (data/overlap)
        "weights_mb": model.get_memory_footprint() / 2**20,
        "peak_mem_mb": mem.peak_mb, "peak_mem_growth_mb": mem.growth_mb,
        "memory_measure": memory_measure(mem.description, optim),
        "step_time_median_s": statistics.median(step_s) if step_s else None,
        "tokens_per_s": sum(tokens) / sum(step_s) if step_s else None,
        "timed_steps": len(step_s), "resumed_from_step": step_of(resume),
        # where the run's time went: its optimizer steps (all of this process's, warm-up
        # included), its evaluations (the curve's and the final one), its greedy decoding;
        # wall_s adds the model load (first run of a process), set-up and saving
        "train_steps_s": sum(evals.step_times.values()), "eval_s": eval_s,
        "generation_s": gen_s, "wall_s": time.perf_counter() - t_start,
    }
    for key in ("eval_loss", "eval_perplexity", "exact_match", "weights_mb", "peak_mem_mb",
                "step_time_median_s", "tokens_per_s"):
        live.summary[f"final/{key}"] = metrics[key]
    live.make_summary()

    write_adapter(model, adapter_out, base_model_reference(trained_on))
    write_run_report(report_dir, live_dir, metrics, rows,
                     example_rows(eval_records, final.nll_sums, final.n_tokens_per, rows))
    return metrics, model


def run_summary(m: dict) -> str:
    """The stage's closing line. Speed is n/a when no step was timed (a run resumed from its
    last checkpoint, or one with no steps after the timing warm-up)."""
    speed = "n/a" if m["tokens_per_s"] is None else f"{m['tokens_per_s']:.0f}"
    return (f"{m['run']}: eval_loss {m['eval_loss']:.4f}  exact_match {m['exact_match']:.3f}  "
            f"{speed} tok/s  peak {m['peak_mem_mb']:.0f} MB  {m['wall_s']:.0f} s")
