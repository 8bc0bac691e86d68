"""Training throughput: the project's path and a plain PEFT reference, LoRA and QLoRA,
interleaved step by step on identical batches."""
from __future__ import annotations

import dataclasses
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
from transformers import TrainerCallback, set_seed

from qlora_diag.core.config import LoraCfg, TrainCfg
from qlora_diag.core.machine import resolve_dtype, torch_dtype
from qlora_diag.data.batching import collate, training_order
from qlora_diag.data.splits import load_split
from qlora_diag.models.loading import load_tokenizer
from qlora_diag.models.targets import resolve_targets
from qlora_diag.tools.bench.matmul import MATMUL_ROUND_REPS, measure_matmul_gflops
from qlora_diag.tools.bench.measures import (
    matmul_params,
    median_rate,
    paired_ratio,
    paired_roofline,
    rotated,
    train_flops_per_token,
)
from qlora_diag.train.args import training_arguments
from qlora_diag.train.callbacks import StepAlignedDVCLive
from qlora_diag.train.trainer import (
    METHODS,
    ResponseOnlyTrainer,
    attach_lora,
    build_trainer,
    choose_optimizer,
    load_training_base,
    set_gradient_checkpointing,
)


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
    def from_json(cls, obj: dict) -> TrainSetup:
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
        """The base ``train_adapter`` trains ``method`` on, before the adapter
        (:func:`~qlora_diag.train.trainer.load_training_base`)."""
        return load_training_base(method, base_dir=Path(self.base_dir),
                                  quant_dir=Path(self.quant_dir), base_dtype=self.base_dtype,
                                  compute_dtype=self.compute_dtype,
                                  kbit_prep=self.train.kbit_prep, device=device)

    def project_model(self, method: str, device: torch.device):
        """:meth:`load` + the project's :func:`~qlora_diag.train.trainer.attach_lora` and
        :func:`~qlora_diag.train.trainer.set_gradient_checkpointing`."""
        model = attach_lora(self.load(method, device), rank=self.lora.r, alpha=self.lora.alpha,
                            dropout=self.lora.dropout, targets=self.lora.targets, seed=self.seed)
        set_gradient_checkpointing(model, self.train.gradient_checkpointing)
        return model


def project_trainer(model, setup: TrainSetup, method: str, device: torch.device, pad_id: int,
                    workdir: Path) -> ResponseOnlyTrainer:
    """The Trainer of :func:`qlora_diag.train.trainer.train_adapter`, with the run's
    :func:`~qlora_diag.train.args.training_arguments` and its per-step dvclive logging;
    periodic evaluation and checkpoints are left out (they are not part of a training step)."""
    from dvclive import Live

    records = load_split(Path(setup.data_dir) / "train.jsonl")
    args = training_arguments(setup.train, output_dir=workdir / "trainer", seed=setup.seed,
                              optim=choose_optimizer(setup.train.optimizer, device.type),
                              device_type=device.type, checkpoints=False, progress_bar=False)
    live = Live(str(workdir / f"live-{method}"), dvcyaml=False, save_dvc_exp=False)
    return build_trainer(model, args, records, pad_id=pad_id, order=setup.order(records),
                         share_prefix=setup.train.share_prefix,
                         callbacks=[StepAlignedDVCLive(live=live)])


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
