"""One training function for any (method, rank, targets, seed): LoRA or QLoRA, same code path.

The only difference between the methods is the base: the 16-bit model of the ``base`` stage for
LoRA, the bitsandbytes 4-bit model of the ``quantize`` stage for QLoRA. For one seed both see the
same batches in the same order and start from identical adapter weights.

Training runs on transformers' ``Trainer`` with PEFT; the loss is response-only and runs the LM
head only on response positions (:mod:`qlora_diag.train.losses`). Checkpoints live in
``models/checkpoints/<run>`` (outside DVC's outs, which DVC deletes before a stage runs), so an
interrupted ``dvc repro`` resumes from the newest *complete* checkpoint; they are removed when
the run completes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.integrations import DVCLiveCallback
from transformers.trainer_callback import PrinterCallback

from qlora_diag.core.atomic import atomic_dir, write_json, write_text
from qlora_diag.core.config import LoraCfg, TrainCfg, require_eval_examples, run_name
from qlora_diag.core.errors import UserError
from qlora_diag.core.machine import choose_device, resolve_dtype
from qlora_diag.data.batching import (
    FixedOrderSampler,
    RecordDataset,
    collate,
    training_order,
)
from qlora_diag.data.splits import load_split
from qlora_diag.models.loading import load_base, load_quantized, load_tokenizer
from qlora_diag.models.targets import min_adapted_dim, resolve_targets
from qlora_diag.train.generation import (
    exact_match_summary,
    generate_greedy,
    generation_records,
)
from qlora_diag.train.losses import evaluate_loss, response_loss_sum
from qlora_diag.train.memory import PeakMemory

METHODS = ("lora", "qlora")
# The first steps pay for allocator growth and lazy initialization; timing starts after them.
TIMING_WARMUP_STEPS = 2
CHECKPOINT_FILES = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Identity of one training run."""

    method: str
    rank: int
    targets: str
    seed: int

    @property
    def name(self) -> str:
        return run_name(self.method, self.rank, self.targets, self.seed)


@dataclasses.dataclass(frozen=True)
class GenerationCfg:
    """Greedy evaluation by generation on the first ``n_generate`` eval examples."""

    n_generate: int
    max_new_tokens: int
    batch_size: int


def choose_optimizer(setting: str, method: str, device_type: str) -> str:
    """``auto``: the QLoRA paper's paged AdamW for QLoRA on CUDA (it pages optimizer state to
    CPU memory under pressure); plain AdamW otherwise (paged optimizers need CUDA)."""
    if setting == "auto":
        return "paged_adamw_32bit" if method == "qlora" and device_type == "cuda" else "adamw_torch"
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


def latest_complete_checkpoint(folder: Path) -> Path | None:
    """Newest ``checkpoint-N`` holding every file and a parseable trainer state; partial ones
    (a kill during saving) are deleted so they are never resumed from."""
    if not folder.is_dir():
        return None
    found = sorted((p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for ckpt in found:
        if checkpoint_step(ckpt) is not None:
            return ckpt
        shutil.rmtree(ckpt, ignore_errors=True)
    return None


def checkpoint_step(ckpt: Path) -> int | None:
    """The step a checkpoint holds, or None unless it is complete: every file written and a
    parseable trainer state past step 0. Reads only, so it may watch a running stage."""
    try:
        if not all((ckpt / f).is_file() for f in CHECKPOINT_FILES):
            return None
        step = json.loads((ckpt / "trainer_state.json").read_text())["global_step"]
    except (json.JSONDecodeError, KeyError, OSError):
        return None
    return step if step > 0 else None


def fingerprint(*parts) -> str:
    """Hash of everything a run's result depends on, to never resume a stale checkpoint."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


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


class StepAlignedDVCLive(DVCLiveCallback):
    """transformers' DVCLive callback, logging at the optimizer step (``x: step`` in plots) so
    that train and eval curves share an axis and a resumed run continues the same axis."""

    CURVES = ("loss", "grad_norm", "learning_rate")  # per-step logs; the end-of-run summary is not a curve

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):
        self.live.step = state.global_step
        for key in self.CURVES:
            if isinstance((logs or {}).get(key), (int, float)):
                self.live.log_metric(f"train/{key}", logs[key])
        self.live.make_summary()

    def on_train_end(self, args, state, control, **kwargs):
        self.live.make_summary()


class EvalAndTimingCallback(TrainerCallback):
    """Eval loss every ``eval_every`` steps on the whole eval split (logged and printed), and the
    wall time of every optimizer step."""

    def __init__(self, live, model_ref, eval_records, batch_size, pad_id, eval_every, max_steps):
        self.live, self.model_ref, self.eval_records = live, model_ref, eval_records
        self.batch_size, self.pad_id = batch_size, pad_id
        self.eval_every, self.max_steps = eval_every, max_steps
        self.step_times: dict[int, float] = {}
        self.last_eval: tuple[float, int] | None = None  # (loss, tokens) after the final step
        self._t0 = 0.0
        self._t_start = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_times[state.global_step] = time.perf_counter() - self._t0
        if state.global_step % self.eval_every == 0 or state.global_step == self.max_steps:
            loss, n_tokens = evaluate_loss(self.model_ref, self.eval_records, self.batch_size, self.pad_id)
            self.last_eval = (loss, n_tokens) if state.global_step == self.max_steps else None
            self.live.step = state.global_step
            self.live.log_metric("eval/loss", loss)
            self.live.make_summary()
            train_loss = next((h["loss"] for h in reversed(state.log_history) if "loss" in h), float("nan"))
            print(f"step {state.global_step}/{self.max_steps}  train_loss {train_loss:.4f}  "
                  f"eval_loss {loss:.4f}  ({time.perf_counter() - self._t_start:.0f} s)", flush=True)


def restore_live_dir(live_dir: Path, step: int) -> None:
    """Make a run's dvclive directory consistent with the checkpoint at ``step`` before resuming.

    A SIGKILL can land between the checkpoint and the kill (rows of later steps) or in the middle
    of one of dvclive's plain, non-atomic writes: a curve's last row half-written, the summary
    ``metrics.json`` or ``params.yaml`` truncated. Each curve keeps its header and its complete,
    well-formed rows up to ``step`` (each step once); the summary is rebuilt from those rows;
    an unreadable ``params.yaml`` is dropped (the resumed run logs its params again). Every
    rewrite is atomic, so a second kill during the repair leaves a consistent directory too.
    """
    import yaml

    metrics_root = live_dir / "plots" / "metrics"
    summary: dict = {}
    for tsv in sorted(metrics_root.glob("**/*.tsv")):
        head, rows = _complete_rows(tsv.read_text(encoding="utf-8", errors="replace"), step)
        if head is None:
            tsv.unlink()
            continue
        write_text(tsv, "".join(f"{line}\n" for line in [head, *rows]))
        if rows:
            node = summary
            *parents, leaf = tsv.relative_to(metrics_root).with_suffix("").parts
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = float(rows[-1].split("\t")[head.split("\t").index(leaf)])
    summary["step"] = step
    write_json(live_dir / "metrics.json", summary)
    params = live_dir / "params.yaml"
    if params.exists():
        try:
            ok = isinstance(yaml.safe_load(params.read_text(encoding="utf-8")), dict)
        except (yaml.YAMLError, UnicodeDecodeError):
            ok = False
        if not ok:
            params.unlink()


def _complete_rows(text: str, step: int) -> tuple[str | None, list[str]]:
    """Header and the well-formed rows of a dvclive curve with ``step`` <= ``step``, each step
    once (the first occurrence); a last line without its newline was cut by a kill and is
    dropped. ``(None, [])`` when not even the header is complete."""
    lines = text.split("\n")[:-1]  # whatever follows the last newline is a torn row
    if not lines or "step" not in lines[0].split("\t"):
        return None, []
    head, cols = lines[0], lines[0].split("\t")
    rows, seen = [], set()
    for line in lines[1:]:
        fields = line.split("\t")
        if len(fields) != len(cols):
            continue
        try:
            row_step = int(fields[cols.index("step")])
            for value in fields:
                float(value)  # a number cut short by the kill fails here
        except ValueError:
            continue
        if row_step <= step and row_step not in seen:
            seen.add(row_step)
            rows.append(line)
    return head, rows


def train_adapter(spec: RunSpec, *, base_dir: Path, quant_dir: Path, data_dir: Path,
                  base_dtype: str, compute_dtype: str, lora: LoraCfg, train: TrainCfg,
                  gen: GenerationCfg, adapter_out: Path, report_dir: Path,
                  checkpoint_root: Path) -> dict:
    """Train one adapter, evaluate it, and write the adapter and its report directory.

    Returns the run's metrics (also written to ``report_dir/run.json``).
    """
    from dvclive import Live

    t_start = time.perf_counter()
    device = choose_device()
    optim = choose_optimizer(train.optimizer, spec.method, device.type)
    tokenizer = load_tokenizer(base_dir)
    train_records = load_split(data_dir / "train.jsonl")
    eval_records = load_split(data_dir / "eval.jsonl")
    require_eval_examples("compare.n_generate", gen.n_generate, len(eval_records),
                          data_dir / "eval.jsonl")
    model = load_method_base(spec.method, base_dir=base_dir, quant_dir=quant_dir,
                             base_dtype=base_dtype, compute_dtype=compute_dtype, device=device)
    if spec.method == "qlora" and train.kbit_prep:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = attach_lora(model, rank=spec.rank, alpha=lora.alpha, dropout=lora.dropout,
                        targets=spec.targets, seed=spec.seed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    order = training_order([len(r["input_ids"]) for r in train_records], train.batch_size,
                           train.max_steps, spec.seed, train.group_by_length)

    ckpt_dir = checkpoint_root / spec.name
    fp = fingerprint(dataclasses.asdict(spec), dataclasses.asdict(lora), dataclasses.asdict(train),
                     _file_digest(data_dir / "train.jsonl"), _dir_digest(quant_dir if spec.method == "qlora" else base_dir))
    fp_file = ckpt_dir / "fingerprint.txt"
    if ckpt_dir.exists() and (not fp_file.is_file() or fp_file.read_text() != fp):
        shutil.rmtree(ckpt_dir)  # checkpoints of other params or data: never resume them
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    fp_file.write_text(fp)
    resume = latest_complete_checkpoint(ckpt_dir)
    live_dir = ckpt_dir / "live"
    if resume is not None:
        step = json.loads((resume / "trainer_state.json").read_text())["global_step"]
        restore_live_dir(live_dir, step)
        print(f"{spec.name}: resuming from {resume.name} (step {step}/{train.max_steps})", flush=True)
    live = Live(str(live_dir), resume=resume is not None, dvcyaml=False, save_dvc_exp=False)

    args = TrainingArguments(
        output_dir=str(ckpt_dir), per_device_train_batch_size=train.batch_size,
        max_steps=train.max_steps, learning_rate=train.lr, lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_steps, weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm, optim=optim, logging_steps=1,
        save_strategy="steps", save_steps=train.save_every, save_total_limit=2,
        report_to="none", seed=spec.seed, data_seed=spec.seed, remove_unused_columns=False,
        dataloader_num_workers=0, use_cpu=device.type == "cpu",
        # dtypes are explicit: the base is base.dtype / quant.compute_dtype and PEFT keeps the
        # adapter in fp32; autocast would add casts on CPU without changing what is learned.
        bf16=False, fp16=False, disable_tqdm=not os.isatty(2))
    evals = EvalAndTimingCallback(live, model, eval_records, train.batch_size * 2,
                                  tokenizer.pad_token_id, train.eval_every, train.max_steps)
    trainer = ResponseOnlyTrainer(
        model=model, args=args, train_dataset=RecordDataset(train_records),
        data_collator=lambda rs: collate(rs, tokenizer.pad_token_id), order=order,
        share_prefix=train.share_prefix, callbacks=[StepAlignedDVCLive(live=live), evals])
    trainer.remove_callback(PrinterCallback)  # one line per eval instead of a dict per step
    live.log_params({"run": spec.name, **dataclasses.asdict(spec), "optimizer": optim,
                     "device": device.type, "base_dtype": resolve_dtype(base_dtype),
                     "compute_dtype": resolve_dtype(compute_dtype), "kbit_prep": train.kbit_prep, "trainable_params": trainable,
                     "memory_measure": PeakMemory(device).description})

    with PeakMemory(device) as mem:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    model.eval()

    # The curve's last point was evaluated after the final step; an interrupted-and-resumed run
    # whose last step completed before the kill has none, so it is computed then.
    eval_loss, eval_tokens = evals.last_eval if evals.last_eval else evaluate_loss(
        model, eval_records, train.batch_size * 2, tokenizer.pad_token_id)
    gen_records = eval_records[: gen.n_generate]
    t_gen = time.perf_counter()
    outputs = generate_greedy(model, [r["input_ids"][: r["n_prompt"]] for r in gen_records],
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
        "train_loss_final": next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None),
        **exact_match_summary(rows),
        "weights_mb": model.get_memory_footprint() / 2**20,
        "peak_mem_mb": mem.peak_mb, "peak_mem_growth_mb": mem.growth_mb,
        "memory_measure": mem.description,
        "step_time_median_s": statistics.median(step_s) if step_s else None,
        "tokens_per_s": sum(tokens) / sum(step_s) if step_s else None,
        "timed_steps": len(step_s), "resumed_from_step": _step_of(resume),
        "generation_s": gen_s, "wall_s": time.perf_counter() - t_start,
    }
    for key in ("eval_loss", "eval_perplexity", "exact_match", "weights_mb", "peak_mem_mb",
                "step_time_median_s", "tokens_per_s"):
        live.summary[f"final/{key}"] = metrics[key]
    live.make_summary()

    with atomic_dir(adapter_out) as tmp:
        save_adapter(model, tmp)
    with atomic_dir(report_dir) as tmp:
        shutil.copytree(live_dir, tmp, dirs_exist_ok=True)
        write_json(tmp / "run.json", metrics)
        with open(tmp / "generations.jsonl", "w") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return metrics


def save_adapter(model, out_dir: Path) -> None:
    """``save_pretrained``, with the config's set-valued fields (``target_modules``) as sorted
    lists: PEFT writes ``list(set)``, whose order follows the per-process string-hash seed, so
    identical runs would write different bytes and DVC would see a changed output and rerun
    every stage downstream."""
    model.save_pretrained(out_dir)
    config = model.peft_config["default"]
    path = Path(out_dir) / "adapter_config.json"
    saved = json.loads(path.read_text())
    for key, value in vars(config).items():
        if isinstance(value, (set, frozenset)) and key in saved:
            saved[key] = sorted(value)
    path.write_text(json.dumps(saved, indent=2, sort_keys=True))


def run_summary(m: dict) -> str:
    """The stage's closing line. Speed is n/a when no step was timed (a run resumed from its
    last checkpoint, or one with no steps after the timing warm-up)."""
    speed = "n/a" if m["tokens_per_s"] is None else f"{m['tokens_per_s']:.0f}"
    return (f"{m['run']}: eval_loss {m['eval_loss']:.4f}  exact_match {m['exact_match']:.3f}  "
            f"{speed} tok/s  peak {m['peak_mem_mb']:.0f} MB  {m['wall_s']:.0f} s")


def _step_of(ckpt: Path | None) -> int:
    return int(ckpt.name.split("-")[-1]) if ckpt else 0


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _dir_digest(folder: Path) -> str:
    """Cheap identity of a model directory: names, sizes and mtimes of its files."""
    items = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in folder.iterdir() if p.is_file())
    return fingerprint(items)
