"""Trainer callbacks of a training run: step-aligned dvclive curves, periodic eval and step times."""
from __future__ import annotations

import time

from transformers import TrainerCallback
from transformers.integrations import DVCLiveCallback

from qlora_diag.train.losses import EvalResult, evaluate_examples


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
    """Eval loss every ``eval_every`` steps on the whole eval split (logged and printed), the
    wall time of every optimizer step (``step_times``) and the seconds spent evaluating
    (``eval_s``)."""

    def __init__(self, live, model_ref, eval_records, batch_size, pad_id, eval_every, max_steps):
        self.live, self.model_ref, self.eval_records = live, model_ref, eval_records
        self.batch_size, self.pad_id = batch_size, pad_id
        self.eval_every, self.max_steps = eval_every, max_steps
        self.step_times: dict[int, float] = {}
        self.last_eval: EvalResult | None = None  # the evaluation after the final step
        self.eval_s = 0.0
        self._t0 = 0.0
        self._t_start = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_times[state.global_step] = time.perf_counter() - self._t0
        if state.global_step % self.eval_every == 0 or state.global_step == self.max_steps:
            t_eval = time.perf_counter()
            result = evaluate_examples(self.model_ref, self.eval_records, self.batch_size,
                                       self.pad_id)
            self.eval_s += time.perf_counter() - t_eval
            loss = result.loss
            self.last_eval = result if state.global_step == self.max_steps else None
            self.live.step = state.global_step
            self.live.log_metric("eval/loss", loss)
            self.live.make_summary()
            train_loss = next((h["loss"] for h in reversed(state.log_history) if "loss" in h), float("nan"))
            print(f"step {state.global_step}/{self.max_steps}  train_loss {train_loss:.4f}  "
                  f"eval_loss {loss:.4f}  ({time.perf_counter() - self._t_start:.0f} s)", flush=True)
