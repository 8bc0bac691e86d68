"""Performance benchmark (issue 6): the project's training and generation paths against plain
references, QLoRA against LoRA, and the cost of a no-op ``dvc repro`` -- ``reports/bench.json``.

What is measured, and how the numbers are made trustworthy on a shared, noisy machine:

- **Training throughput.** Four training paths run in one process on identical batches (same
  records, :func:`~qlora_diag.data.batching.training_order`, :func:`~qlora_diag.data.batching.collate`):
  the project's path (:func:`~qlora_diag.train.trainer.attach_lora` + the real
  :class:`~qlora_diag.train.trainer.ResponseOnlyTrainer` with the run's TrainingArguments) and a
  plain reference written here (PEFT ``get_peft_model`` + ``model(**batch).loss`` + a
  hand-written ``torch.optim.AdamW`` loop), each for LoRA and QLoRA. The Trainer runs in a
  thread that a callback pauses after every optimizer step, so the benchmark can *interleave*
  the paths step by step (:class:`SteppedTrainer`): every round runs one step of each path on the
  same batch, in an order that rotates between rounds. A ratio is the median over rounds of the
  per-round ratio (:func:`paired_ratio`): a burst of load from another process hits one round,
  not one path.
- **Memory.** Peak memory of two methods cannot be measured in one process (the second inherits
  the first's heap), so each method's training is re-run in a fresh subprocess
  (:func:`memory_in_subprocess`) under
  :class:`~qlora_diag.train.memory.PeakMemory`.
- **Roofline.** Tokens/s x FLOPs per token / this machine's matmul rate in the compute dtype
  (:func:`train_flops_per_token`, :func:`measure_matmul_gflops`), the rate measured in every
  round next to the training steps and the fraction taken per round (:func:`paired_roofline`).
- **Generation.** :func:`~qlora_diag.train.generation.generate_greedy` (batched, left-padded, KV
  cache) against one-prompt-at-a-time ``model.generate``, timed batched / one-at-a-time /
  batched so that drift in machine load cancels; the outputs are compared token by token.
- **No-op repro.** ``dvc repro`` timed in the repository, only if ``dvc status`` says the
  workspace is up to date.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback

from qlora_diag.core.atomic import write_json
from qlora_diag.core.config import BenchCfg, LoraCfg, TrainCfg, require_eval_examples
from qlora_diag.core.errors import UserError
from qlora_diag.core.machine import (
    choose_device,
    configure_threads,
    cpu_flags,
    cpu_model,
    resolve_dtype,
    torch_dtype,
)
from qlora_diag.data.batching import RecordDataset, collate, training_order
from qlora_diag.data.splits import load_split
from qlora_diag.models.loading import load_tokenizer
from qlora_diag.models.targets import resolve_targets
from qlora_diag.train.generation import generate_greedy, left_padded
from qlora_diag.train.memory import PeakMemory
from qlora_diag.train.trainer import (
    METHODS,
    GenerationCfg,
    ResponseOnlyTrainer,
    StepAlignedDVCLive,
    attach_lora,
    choose_optimizer,
    load_method_base,
)

# Goals of issue 6: (comparison, target). Step-time and memory ratios and the roofline are
# reported without a goal: they describe the trade-off, they are not targets.
GOALS = {
    "train_throughput_ratio_lora": (">=", 1.0),   # project path not slower than plain PEFT
    "train_throughput_ratio_qlora": (">=", 1.0),
    "generation_speedup": (">=", 5.0),            # batched vs one-at-a-time on 2 CPU cores
    "noop_repro_s": ("<=", 5.0),                  # `make repro` twice: the second is seconds
    "bench_wall_s": ("<=", 600.0),                # `make bench` in under 10 minutes
}
# Issue 6's aim for the training ratio, by skipping work the loss does not need (the LM head
# and fp32 cross-entropy on prompt positions); reported next to the goal, not as one.
TRAIN_RATIO_AIM = 1.3
# Matmul shape of the rate measurement: tokens x in x out of SmolLM2's MLP up-projection in a
# benchmark step (8 examples x ~64 tokens, hidden 576, intermediate 1536) -- the kind of matmul
# that dominates a training step; the shape core.machine.has_fast_bf16 was measured with.
MATMUL_SHAPE = (512, 576, 1536)
# Time spent per dtype measuring the machine's matmul rate; the best repetition is taken (load
# from other processes only ever slows a repetition down, so the fastest is the machine's rate).
MATMUL_SECONDS = 0.5
MATMUL_MIN_REPS = 3
# Repetitions of the matmul measured in every training round: the roofline divides a round's
# throughput by the rate the machine gave in that same round (paired, like the ratios).
MATMUL_ROUND_REPS = 3
# No-op `dvc status` / `dvc repro` may not hang the benchmark.
DVC_TIMEOUT_S = 300
PATHS = ("project", "reference")
MB = 2**20


# ---------------------------------------------------------------------------------------------
# Pure pieces: FLOP count, roofline, paired ratios, goals
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# Machine
# ---------------------------------------------------------------------------------------------

def measure_matmul_gflops(dtype: torch.dtype, device: torch.device, *, seconds: float,
                          min_reps: int, shape: tuple[int, int, int] = MATMUL_SHAPE) -> float:
    """Best rate (GFLOP/s) over ``min_reps`` repetitions and at least ``seconds`` of
    ``F.linear(x, w)``, x: m x k, w: n x k -- nn.Linear's op and weight layout. (The layout
    matters for emulated bf16: on an AVX2 CPU a plain ``x @ w`` with w: k x n ran ~6x slower
    than ``F.linear`` in bf16, not in fp32.)"""
    m, k, n = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    w = torch.randn(n, k, generator=gen).to(device, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    F.linear(x, w)  # first call pays for kernel selection and thread-pool start
    sync()
    best, spent, reps = float("inf"), 0.0, 0
    while spent < seconds or reps < min_reps:
        t0 = time.perf_counter()
        F.linear(x, w)
        sync()
        dt = time.perf_counter() - t0
        best, spent, reps = min(best, dt), spent + dt, reps + 1
    return 2 * m * k * n / best / 1e9


def machine_facts(device: torch.device, base_dtype: str, compute_dtype: str) -> dict:
    """What the numbers were measured on, including this machine's matmul rates."""
    import bitsandbytes
    import peft
    import transformers

    flags = cpu_flags()
    facts = {
        "cpu_model": cpu_model(), "cpu_cores": os.cpu_count(),
        "cpu_bf16_flags": sorted({"avx512_bf16", "amx_bf16"} & flags),
        "cpu_avx2": "avx2" in flags, "cpu_avx512f": "avx512f" in flags,
        "torch_threads": torch.get_num_threads(), "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "dtype_lora": resolve_dtype(base_dtype),
        "dtype_qlora_compute": resolve_dtype(compute_dtype),
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "matmul_shape": list(MATMUL_SHAPE),
    }
    for name in ("float32", "bfloat16"):
        facts[f"matmul_gflops_{name}"] = measure_matmul_gflops(
            torch_dtype(name), device, seconds=MATMUL_SECONDS, min_reps=MATMUL_MIN_REPS)
    return facts


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------
# Training paths
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """Everything a benchmark training run depends on (JSON-able: it is passed to the memory
    subprocesses). ``lora.r`` and ``train.batch_size``/``max_steps`` are already the bench's."""

    base_dir: str
    quant_dir: str
    data_dir: str
    base_dtype: str
    compute_dtype: str
    lora: LoraCfg
    train: TrainCfg
    seed: int

    @classmethod
    def from_json(cls, obj: dict) -> "TrainSetup":
        return cls(**{**obj, "lora": LoraCfg(**obj["lora"]), "train": TrainCfg(**obj["train"])})

    def batches(self) -> list[list[dict]]:
        """The records of every step, in order: the same for every path and method."""
        records = load_split(Path(self.data_dir) / "train.jsonl")
        order = self.order(records)
        b = self.train.batch_size
        return [[records[i] for i in order[k:k + b]] for k in range(0, len(order), b)]

    def order(self, records: list[dict]) -> list[int]:
        return training_order([len(r["input_ids"]) for r in records], self.train.batch_size,
                              self.train.max_steps, self.seed, self.train.group_by_length)

    def load(self, method: str, device: torch.device):
        """The base ``train_adapter`` trains ``method`` on, before the adapter: the 16-bit or
        4-bit model, for QLoRA passed through ``prepare_model_for_kbit_training`` when
        ``train.kbit_prep`` (keep in step with ``train_adapter``)."""
        model = load_method_base(method, base_dir=Path(self.base_dir),
                                 quant_dir=Path(self.quant_dir), base_dtype=self.base_dtype,
                                 compute_dtype=self.compute_dtype, device=device)
        if method == "qlora" and self.train.kbit_prep:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        return model

    def project_model(self, method: str, device: torch.device):
        """:meth:`load` + the project's :func:`~qlora_diag.train.trainer.attach_lora`."""
        return attach_lora(self.load(method, device), rank=self.lora.r, alpha=self.lora.alpha,
                           dropout=self.lora.dropout, targets=self.lora.targets, seed=self.seed)


def project_trainer(model, setup: TrainSetup, method: str, device: torch.device, pad_id: int,
                    workdir: Path) -> ResponseOnlyTrainer:
    """The Trainer of :func:`qlora_diag.train.trainer.train_adapter` with the run's arguments and its
    per-step dvclive logging; periodic evaluation and checkpoints are left out (they are not
    part of a training step). Keep in step with ``train_adapter``'s TrainingArguments."""
    from dvclive import Live

    train = setup.train
    records = load_split(Path(setup.data_dir) / "train.jsonl")
    args = TrainingArguments(
        output_dir=str(workdir / "trainer"), per_device_train_batch_size=train.batch_size,
        max_steps=train.max_steps, learning_rate=train.lr, lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_steps, weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        optim=choose_optimizer(train.optimizer, method, device.type),
        logging_steps=1, save_strategy="no", report_to="none", seed=setup.seed,
        data_seed=setup.seed, remove_unused_columns=False, dataloader_num_workers=0,
        use_cpu=device.type == "cpu", bf16=False, fp16=False, disable_tqdm=True)
    live = Live(str(workdir / f"live-{method}"), dvcyaml=False, save_dvc_exp=False)
    trainer = ResponseOnlyTrainer(
        model=model, args=args, train_dataset=RecordDataset(records),
        data_collator=lambda rs: collate(rs, pad_id), order=setup.order(records),
        share_prefix=setup.train.share_prefix, callbacks=[StepAlignedDVCLive(live=live)])
    trainer.remove_callback(PrinterCallback)  # as train_adapter: no dict printed per step
    return trainer


class _Aborted(Exception):
    """Raised inside the paused Trainer when the benchmark stops early (an error elsewhere)."""


class _StepGate(TrainerCallback):
    """Holds the Trainer before its first step and after every optimizer step until released."""

    def __init__(self):
        self.go = threading.Semaphore(0)
        self.done = threading.Semaphore(0)
        self.abort = False

    def _wait(self):
        self.go.acquire()
        if self.abort:
            raise _Aborted

    def on_train_begin(self, args, state, control, **kwargs):
        self._wait()

    def on_step_end(self, args, state, control, **kwargs):
        self.done.release()
        self._wait()


class SteppedTrainer:
    """``trainer.train()`` in a thread, run one optimizer step per :meth:`step` call.

    A step's time runs from the release of the paused Trainer to its next ``on_step_end``, so
    it holds everything the Trainer does per step: the logging of the previous step, batch
    collation, forward, backward, clipping, the optimizer and the scheduler. Only one thread
    computes at a time; the other waits on a semaphore.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.gate = _StepGate()
        trainer.add_callback(self.gate)
        self.error: BaseException | None = None
        self.threads = torch.get_num_threads()
        self.thread = threading.Thread(target=self._run, name="bench-trainer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        torch.set_num_threads(self.threads)  # intra-op threads of this thread: as configured
        try:
            self.trainer.train()
        except BaseException as exc:  # re-raised in the benchmark's thread
            self.error = exc
        finally:
            self.gate.done.release()

    def step(self) -> float:
        t0 = time.perf_counter()
        self.gate.go.release()
        self.gate.done.acquire()
        dt = time.perf_counter() - t0
        if self.error is not None:
            raise self.error
        if not self.thread.is_alive():
            raise RuntimeError("the benchmark Trainer stopped before its last step")
        return dt

    def finish(self, abort: bool = False) -> None:
        """Let the Trainer end (after its last step), or stop it where it waits (``abort``)."""
        self.gate.abort = abort
        self.gate.go.release()
        self.thread.join()
        if self.error is not None and not isinstance(self.error, _Aborted):
            raise self.error

    @property
    def first_loss(self) -> float | None:
        return next((h["loss"] for h in self.trainer.state.log_history if "loss" in h), None)


class ReferenceLoop:
    """The plain PEFT script the project is compared with: ``get_peft_model``, the model's own
    loss (``model(**batch)`` with ``labels``: LM head and fp32 cross-entropy on every position),
    a hand-written ``torch.optim.AdamW`` loop. Same lr, weight decay and gradient clipping as
    the Trainer, so the two paths compute the same update."""

    def __init__(self, model, *, rank: int, lora: LoraCfg, train: TrainCfg, seed: int, pad_id: int):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=resolve_targets(model, lora.targets), bias="none",
                            task_type="CAUSAL_LM")
        set_seed(seed)  # the same adapter init as attach_lora
        self.model = get_peft_model(model, config)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=train.lr, weight_decay=train.weight_decay)
        self.max_grad_norm = train.max_grad_norm
        self.pad_id = pad_id
        self.device = next(self.model.parameters()).device
        self.losses: list[float] = []

    def step(self, records: list[dict]) -> float:
        t0 = time.perf_counter()
        batch = {k: v.to(self.device) for k, v in collate(records, self.pad_id).items()}
        loss = self.model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad()
        self.losses.append(float(loss.detach()))
        return time.perf_counter() - t0


def bench_training(setup: TrainSetup, warmup_steps: int, device: torch.device, log=print) -> dict:
    """Interleaved throughput of the four paths (LoRA/QLoRA x project/reference).

    Returns per method the per-step times and tokens of both paths, medians, paired ratios,
    the roofline fraction against the matmul rate measured in each round (in the method's compute
    dtype), and the first-step loss of both paths (equal: same batch, and B = 0 at init makes the
    adapter an identity, so a difference would mean the two paths do not train the same thing).
    """
    tokenizer = load_tokenizer(setup.base_dir)
    pad_id = tokenizer.pad_token_id
    batches = setup.batches()
    tokens = [int(collate(b, pad_id)["attention_mask"].sum()) for b in batches]
    runners, n_params = {}, {}
    with tempfile.TemporaryDirectory(prefix="qlora-bench-") as tmp:
        for method in METHODS:
            model = setup.project_model(method, device)
            n_params[method] = matmul_params(model)
            trainer = project_trainer(model, setup, method, device, pad_id, Path(tmp))
            runners[(method, "project")] = SteppedTrainer(trainer)
            runners[(method, "reference")] = ReferenceLoop(
                setup.load(method, device), rank=setup.lora.r, lora=setup.lora,
                train=setup.train, seed=setup.seed, pad_id=pad_id)
        keys = list(runners)
        times: dict = {k: [] for k in keys}
        dtypes = {m: resolve_dtype(setup.base_dtype if m == "lora" else setup.compute_dtype)
                  for m in METHODS}
        gflops: dict = {d: [] for d in sorted(set(dtypes.values()))}
        completed = False
        try:
            for i, records in enumerate(batches):
                for dtype, rates in gflops.items():
                    rates.append(measure_matmul_gflops(torch_dtype(dtype), device, seconds=0.0,
                                                       min_reps=MATMUL_ROUND_REPS))
                for key in rotated(keys, i):
                    run = runners[key]
                    times[key].append(run.step() if key[1] == "project" else run.step(records))
                tag = "warm-up" if i < warmup_steps else "timed"
                log(f"bench train step {i + 1}/{len(batches)} ({tag}, {tokens[i]} tokens): " +
                    "  ".join(f"{m}/{p} {times[(m, p)][-1]:.2f}s" for m, p in keys), flush=True)
            completed = True
        finally:
            for key in keys:
                if key[1] == "project":
                    runners[key].finish(abort=not completed)
        # the Trainer counted the tokens of its own batches: a check that the batches are the same
        seen = [runners[(m, "project")].trainer.tokens_per_step for m in METHODS]
        identical = all([s.get(i + 1) for i in range(len(batches))] == tokens for s in seen)
    timed = slice(warmup_steps, None)
    tok = tokens[timed]
    out: dict = {"steps_total": len(batches), "warmup_steps": warmup_steps,
                 "tokens_per_step": tok, "batches_identical": identical,
                 "matmul_gflops_per_step": {d: r[timed] for d, r in gflops.items()}}
    for method in METHODS:
        proj, ref = times[(method, "project")][timed], times[(method, "reference")][timed]
        flops, rates = train_flops_per_token(n_params[method]), gflops[dtypes[method]][timed]
        out[method] = {
            "matmul_params": n_params[method], "flops_per_token": flops,
            "compute_dtype": dtypes[method],
            "roofline_fraction_project": paired_roofline(tok, proj, flops, rates),
            "roofline_fraction_reference": paired_roofline(tok, ref, flops, rates),
            "step_s_project": proj, "step_s_reference": ref,
            "step_s_median_project": statistics.median(proj),
            "step_s_median_reference": statistics.median(ref),
            "tokens_per_s_project": median_rate(tok, proj),
            "tokens_per_s_reference": median_rate(tok, ref),
            "throughput_ratio": paired_ratio(ref, proj),  # same tokens: t_ref / t_proj
            "throughput_ratio_per_step": [r / p for r, p in zip(ref, proj)],
            "first_step_loss_project": runners[(method, "project")].first_loss,
            "first_step_loss_reference": runners[(method, "reference")].losses[0],
        }
    out["qlora_lora_step_time_ratio"] = paired_ratio(times[("qlora", "project")][timed],
                                                     times[("lora", "project")][timed])
    out["qlora_lora_step_time_ratio_reference"] = paired_ratio(
        times[("qlora", "reference")][timed], times[("lora", "reference")][timed])
    return out


def measure_training_memory(setup: TrainSetup, method: str, device: torch.device) -> dict:
    """Peak memory of the project's training path for ``method`` -- run in a fresh process.

    ``rss_baseline_mb`` is the process after imports, ``rss_loaded_mb`` after loading the model,
    ``start_mb`` after paging its weights in and building the Trainer, ``peak_mb`` the peak
    during training (process peak RSS on CPU, peak allocated tensor memory on CUDA; see
    PeakMemory.description), ``weights_mb`` the model's parameters and buffers
    (``get_memory_footprint``; bitsandbytes' quantization constants are not parameters and are
    not counted in it).

    Weights loaded from safetensors on CPU are memory-mapped and become resident only when
    first read -- in the first training step, where they would be counted as growth (seen:
    +87 MB RSS after loading SmolLM2's 515 MB). Reading every tensor once before the
    measurement puts them in ``start_mb``, so ``peak_growth_mb`` is what training adds.
    """
    import psutil

    rss = lambda: psutil.Process().memory_info().rss / MB  # noqa: E731
    baseline = rss()
    pad_id = load_tokenizer(setup.base_dir).pad_token_id
    model = setup.project_model(method, device)
    loaded = rss()
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.sum()  # reads every page of the tensor
    with tempfile.TemporaryDirectory(prefix="qlora-bench-mem-") as tmp:
        trainer = project_trainer(model, setup, method, device, pad_id, Path(tmp))
        with PeakMemory(device) as mem:
            trainer.train()
    return {"method": method, "measure": mem.description, "backend": mem.backend,
            "rss_baseline_mb": baseline, "rss_loaded_mb": loaded, "start_mb": mem.start_mb,
            "peak_mb": mem.peak_mb,
            "peak_growth_mb": mem.growth_mb, "weights_mb": model.get_memory_footprint() / MB,
            "steps": setup.train.max_steps}


def memory_in_subprocess(setup: TrainSetup, method: str) -> dict:
    """:func:`measure_training_memory` in a fresh Python process (nothing inherited). The
    methods run one after the other, never side by side: two processes of 2 torch threads each
    on 2 cores make OpenMP threads wait for each other and a run takes many times longer."""
    with tempfile.TemporaryDirectory(prefix="qlora-bench-mem-") as tmp:
        spec, out = Path(tmp) / "setup.json", Path(tmp) / "memory.json"
        spec.write_text(json.dumps(dataclasses.asdict(setup)))
        proc = subprocess.run([sys.executable, "-c", _WORKER, method, str(spec), str(out),
                               str(torch.get_num_threads())], capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"memory benchmark of {method} failed (exit {proc.returncode}):\n"
                               f"{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def generate_hf_batched(model, prompts: list[list[int]], *, max_new_tokens: int, pad_id: int,
                        eos_id: int, batch_size: int) -> list[list[int]]:
    """transformers' own greedy ``generate`` on left-padded batches (a batch of one has no
    padding); batched, it is the control that tells a dtype effect (HF's batches differ from its
    own one-at-a-time runs too) from a bug."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(prompts), batch_size):
        ids, mask = left_padded(prompts[i:i + batch_size], pad_id, device)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, use_cache=True, pad_token_id=pad_id,
                             eos_token_id=eos_id)
        for row in gen[:, ids.shape[1]:].tolist():
            out.append(row[: row.index(eos_id)] if eos_id in row else row)
    return out


def generate_one_at_a_time(model, prompts: list[list[int]], *, max_new_tokens: int, pad_id: int,
                           eos_id: int) -> list[list[int]]:
    """The naive evaluation loop: ``model.generate`` per prompt (KV cache, no padding)."""
    return generate_hf_batched(model, prompts, max_new_tokens=max_new_tokens, pad_id=pad_id,
                               eos_id=eos_id, batch_size=1)


def bench_generation(setup: TrainSetup, gen: GenerationCfg, device: torch.device) -> dict:
    """Batched :func:`generate_greedy` vs one-at-a-time ``generate`` on the first
    ``gen.n_generate`` eval prompts, with the LoRA model as evaluation sees it (PEFT-wrapped).

    Timed batched -> one-at-a-time -> batched; the speedup uses the mean of the two batched
    runs, so a load change during the long one-at-a-time pass is shared by both sides.
    """
    records = load_split(Path(setup.data_dir) / "eval.jsonl")
    require_eval_examples("bench.gen_examples", gen.n_generate, len(records),
                          Path(setup.data_dir) / "eval.jsonl")
    prompts = [r["input_ids"][: r["n_prompt"]] for r in records[: gen.n_generate]]
    tok = load_tokenizer(setup.base_dir)
    model = setup.project_model("lora", device)
    kw = dict(max_new_tokens=gen.max_new_tokens, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
    generate_greedy(model, prompts[:1], batch_size=1, **{**kw, "max_new_tokens": 2})  # warm-up

    def timed(fn, **extra):
        t0 = time.perf_counter()
        outputs = fn(model, prompts, **kw, **extra)
        return outputs, time.perf_counter() - t0

    batched, t_b1 = timed(generate_greedy, batch_size=gen.batch_size)
    single, t_single = timed(generate_one_at_a_time)
    _, t_b2 = timed(generate_greedy, batch_size=gen.batch_size)
    t_batched = (t_b1 + t_b2) / 2
    hf_batched = generate_hf_batched(model, prompts, batch_size=gen.batch_size, **kw)
    mismatches = sum(a != b for a, b in zip(batched, single))
    hf_mismatches = sum(a != b for a, b in zip(hf_batched, single))
    return {"examples": len(prompts), "max_new_tokens": gen.max_new_tokens,
            "batch_size": gen.batch_size, "dtype": str(next(model.parameters()).dtype),
            "batched_s": [t_b1, t_b2], "one_at_a_time_s": t_single,
            "new_tokens": sum(len(o) for o in single),
            "speedup": t_single / t_batched,
            "outputs_identical": mismatches == 0, "outputs_mismatched": mismatches,
            "hf_batched_outputs_mismatched": hf_mismatches,
            "outputs_note": (
                "outputs_mismatched counts prompts whose greedy answer from the batched path "
                "differs from one-at-a-time generate; hf_batched_outputs_mismatched is the same "
                "count for transformers' own batched generate (left padding), the control. In "
                "float32 both are 0 (tests/test_generation.py); in bfloat16 the rounding of a "
                "matmul depends on the batch's shape, and near-ties between two next tokens of "
                "a briefly trained model flip, so both can be non-zero without a bug.")}


# ---------------------------------------------------------------------------------------------
# No-op dvc repro
# ---------------------------------------------------------------------------------------------

def time_noop_repro(repo_dir: Path) -> dict:
    """Wall time of ``dvc repro`` in ``repo_dir`` if ``dvc status`` says all is up to date;
    otherwise ``None`` and the reason (timing a repro that does work would measure that work)."""
    dvc = Path(sys.executable).with_name("dvc")
    if not dvc.is_file():
        return {"noop_repro_s": None, "reason": f"no dvc next to {sys.executable}"}

    def run(*args):
        return subprocess.run([str(dvc), *args], cwd=repo_dir, capture_output=True, text=True,
                              timeout=DVC_TIMEOUT_S)

    try:
        status = run("status", "--json")
        if status.returncode != 0:
            err = (status.stderr.strip().splitlines() or ["?"])[-1]
            return {"noop_repro_s": None, "reason": f"`dvc status` failed: {err}"}
        changed = sorted(json.loads(status.stdout or "{}"))
        if changed:
            return {"noop_repro_s": None,
                    "reason": f"workspace not up to date ({len(changed)} stage(s) changed, e.g. "
                              f"{', '.join(changed[:3])}); run `dvc repro` first"}
        t0 = time.perf_counter()
        repro = run("repro")
        elapsed = time.perf_counter() - t0
    except subprocess.TimeoutExpired as exc:
        return {"noop_repro_s": None,
                "reason": f"`{' '.join(exc.cmd[1:])}` took over {DVC_TIMEOUT_S} s"}
    if repro.returncode != 0:
        err = (repro.stderr.strip().splitlines() or ["?"])[-1]
        return {"noop_repro_s": None, "reason": f"`dvc repro` failed: {err}"}
    return {"noop_repro_s": elapsed, "reason": "dvc status: up to date"}


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------

def check_inputs(base_dir: Path, quant_dir: Path, data_dir: Path) -> None:
    """The benchmark runs on the pipeline's own base, 4-bit model and prepared data."""
    need = [base_dir / "config.json", quant_dir / "config.json", data_dir / "train.jsonl",
            data_dir / "eval.jsonl"]
    missing = [str(p) for p in need if not p.is_file()]
    if missing:
        raise UserError(f"the benchmark needs the pipeline's models and data, and "
                        f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing: "
                        "run `dvc repro quantize prepare` first")


def run_bench(*, base_dir: Path, quant_dir: Path, data_dir: Path, base_dtype: str,
              compute_dtype: str, lora: LoraCfg, train: TrainCfg, bench: BenchCfg,
              gen_max_new_tokens: int, gen_batch_size: int, seed: int, repo_dir: Path,
              out_path: Path, log=print) -> dict:
    """Run every measurement, write ``out_path`` (JSON, atomically) and return it.

    The rank is ``bench.rank``, the batch ``bench.batch_size`` and each path trains
    ``bench.warmup_steps + bench.steps`` steps; everything else of the training path (lr,
    scheduler, clipping, optimizer, targets, dropout, length grouping) is the run's ``lora`` and
    ``train``. Generation uses ``bench.gen_examples`` eval prompts and the run's decoding knobs.
    """
    t_start = time.perf_counter()
    check_inputs(base_dir, quant_dir, data_dir)
    device = choose_device()
    load_start = _loadavg()
    setup = TrainSetup(
        base_dir=str(base_dir), quant_dir=str(quant_dir), data_dir=str(data_dir),
        base_dtype=base_dtype, compute_dtype=compute_dtype,
        lora=dataclasses.replace(lora, r=bench.rank),
        train=dataclasses.replace(train, batch_size=bench.batch_size,
                                  max_steps=bench.warmup_steps + bench.steps),
        seed=seed)

    log("bench: machine facts and matmul rates", flush=True)
    machine = machine_facts(device, base_dtype, compute_dtype)
    memory = {}
    for method in METHODS:
        log(f"bench: peak memory of {method} training (a fresh process)", flush=True)
        memory[method] = memory_in_subprocess(setup, method)
    log("bench: training throughput, 4 paths interleaved step by step", flush=True)
    training = bench_training(setup, bench.warmup_steps, device, log=log)
    log("bench: generation, batched vs one at a time", flush=True)
    generation = bench_generation(setup, GenerationCfg(n_generate=bench.gen_examples,
                                                       max_new_tokens=gen_max_new_tokens,
                                                       batch_size=gen_batch_size), device)
    log("bench: no-op dvc repro", flush=True)
    noop = time_noop_repro(repo_dir)

    result = {
        "train_throughput_ratio_lora": training["lora"]["throughput_ratio"],
        "train_throughput_ratio_qlora": training["qlora"]["throughput_ratio"],
        "qlora_lora_step_time_ratio": training["qlora_lora_step_time_ratio"],
        "qlora_lora_peak_mem_ratio": memory["qlora"]["peak_mb"] / memory["lora"]["peak_mb"],
        "qlora_lora_peak_growth_ratio":
            memory["qlora"]["peak_growth_mb"] / memory["lora"]["peak_growth_mb"],
        "qlora_lora_weights_ratio": memory["qlora"]["weights_mb"] / memory["lora"]["weights_mb"],
        "generation_speedup": generation["speedup"],
        "generation_outputs_identical": generation["outputs_identical"],
        "noop_repro_s": noop["noop_repro_s"],
        **{f"train_roofline_fraction_{m}": training[m]["roofline_fraction_project"]
           for m in METHODS},
        **{f"train_roofline_fraction_{m}_reference": training[m]["roofline_fraction_reference"]
           for m in METHODS},
        **{f"tokens_per_s_{m}_{p}": training[m][f"tokens_per_s_{p}"]
           for m in METHODS for p in PATHS},
        **{f"peak_mem_mb_{m}": memory[m]["peak_mb"] for m in METHODS},
        **{f"peak_mem_growth_mb_{m}": memory[m]["peak_growth_mb"] for m in METHODS},
        **{f"weights_mb_{m}": memory[m]["weights_mb"] for m in METHODS},
        "memory_measure": memory["lora"]["measure"],
        "memory_notes": {
            "peak_mem_mb": "whole-process peak during training: " + memory["lora"]["measure"] +
                           "; includes the Python/torch runtime (rss_baseline_mb), the weights, "
                           "activations, gradients, optimizer state and allocator caches",
            "peak_mem_growth_mb": "peak_mem_mb minus memory when training started (model loaded "
                                  "and its memory-mapped weights paged in, Trainer built): "
                                  "activations, adapter gradients, optimizer state, temporary "
                                  "dequantized weights, allocator caches",
            "weights_mb": "model parameters and buffers as held in memory "
                          "(get_memory_footprint); bitsandbytes' absmax constants are not "
                          "parameters and are not included",
        },
        "roofline_notes": (
            "tokens/s x flops_per_token (4 x matmul parameters N of the frozen base: 2N forward "
            "+ 2N input gradients, no weight gradients) / the rate of an nn.Linear matmul of "
            f"shape {MATMUL_SHAPE[0]}x{MATMUL_SHAPE[1]}x{MATMUL_SHAPE[2]} in the method's compute "
            "dtype, measured in every training round (median over rounds of the per-round "
            "fraction; training.matmul_gflops_per_step). The project path skips the LM head on "
            "prompt positions, so it executes less than 4N per token: its fraction is model "
            "FLOPs utilization, not executed FLOPs."),
        "goals": {},
        "config": {"bench": dataclasses.asdict(bench), "lora": dataclasses.asdict(setup.lora),
                   "train": dataclasses.asdict(setup.train), "seed": seed,
                   "base_dir": str(base_dir), "quant_dir": str(quant_dir),
                   "data_dir": str(data_dir)},
        "machine": {**machine, "loadavg_start": load_start},
        "training": training, "memory": memory, "generation": generation, "noop_repro": noop,
    }
    result["machine"]["loadavg_end"] = _loadavg()
    result["bench_wall_s"] = time.perf_counter() - t_start
    result["goals"] = {name: goal_status(result[name], *GOALS[name]) for name in GOALS}
    for m in METHODS:
        result["goals"][f"train_throughput_ratio_{m}"]["aim"] = TRAIN_RATIO_AIM
    write_json(out_path, result)
    return result


def format_table(result: dict) -> str:
    """The short stdout summary of a :func:`run_bench` result."""
    tr, mem, mach = result["training"], result["memory"], result["machine"]

    def num(v, fmt=".2f"):
        return "n/a" if v is None else format(v, fmt)

    lines = [
        f"machine: {mach['cpu_model']}, {mach['cpu_cores']} cores, {mach['torch_threads']} torch "
        f"threads, {mach['device']}, LoRA {mach['dtype_lora']} / QLoRA compute "
        f"{mach['dtype_qlora_compute']}; matmul fp32 {mach['matmul_gflops_float32']:.0f} GFLOP/s, "
        f"bf16 {mach['matmul_gflops_bfloat16']:.0f} GFLOP/s; load avg {mach['loadavg_start']} -> "
        f"{mach['loadavg_end']}",
        f"{'':8}{'project tok/s':>14}{'reference tok/s':>17}{'ratio':>8}{'roofline':>10}"
        f"{'peak MB':>9}{'growth MB':>11}{'weights MB':>12}",
    ]
    for m in METHODS:
        t, mm = tr[m], mem[m]
        lines.append(f"{m:8}{t['tokens_per_s_project']:>14.0f}{t['tokens_per_s_reference']:>17.0f}"
                     f"{t['throughput_ratio']:>8.2f}{t['roofline_fraction_project']:>10.3f}"
                     f"{mm['peak_mb']:>9.0f}{mm['peak_growth_mb']:>11.0f}{mm['weights_mb']:>12.0f}")
    lines.append(f"QLoRA/LoRA: step time x{result['qlora_lora_step_time_ratio']:.2f}, peak memory "
                 f"x{result['qlora_lora_peak_mem_ratio']:.2f} ({result['memory_measure']})")
    g = result["generation"]
    lines.append(f"generation: batched {statistics.mean(g['batched_s']):.1f} s vs one at a time "
                 f"{g['one_at_a_time_s']:.1f} s = x{g['speedup']:.1f}; answers that differ from "
                 f"one-at-a-time: {g['outputs_mismatched']}/{g['examples']} "
                 f"(transformers' batched generate: {g['hf_batched_outputs_mismatched']}/"
                 f"{g['examples']}; {g['dtype'].removeprefix('torch.')})")
    noop = result["noop_repro"]
    lines.append(f"no-op dvc repro: {num(noop['noop_repro_s'])} s ({noop['reason']})")
    verdict = {True: "met", False: "NOT met", None: "n/a"}
    lines.append("goals: " + "; ".join(f"{k} {num(v['measured'])} {v['goal']}: {verdict[v['met']]}"
                                       for k, v in result["goals"].items()))
    return "\n".join(lines)


def _memory_worker(argv: list[str]) -> None:
    """Entry point of a memory subprocess: ``<method> <setup.json> <out.json> <threads>``."""
    method, spec, out, threads = argv
    configure_threads(int(threads))
    setup = TrainSetup.from_json(json.loads(Path(spec).read_text()))
    write_json(out, measure_training_memory(setup, method, choose_device()))


# The subprocess imports this very copy of qlora_diag (its parent directory first on sys.path),
# not whatever `qlora_diag` the working directory would shadow it with.
_WORKER = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r}); "
           "from qlora_diag.tools.bench import _memory_worker; _memory_worker(sys.argv[1:])")
