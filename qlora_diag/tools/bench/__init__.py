"""Performance benchmark (issue 6): the project's training and generation paths against plain
references, QLoRA against LoRA, and the cost of a no-op ``dvc repro`` -- ``reports/bench.json``
(``make bench``, :func:`qlora_diag.tools.bench.run.run_bench`).

What is measured, and how the numbers are made trustworthy on a shared, noisy machine:

- **Training throughput** (:mod:`.training`). Four training paths run in one process on
  identical batches (same records, :func:`~qlora_diag.data.batching.training_order`,
  :func:`~qlora_diag.data.batching.collate`): the project's path
  (:func:`~qlora_diag.train.trainer.attach_lora` + the real
  :class:`~qlora_diag.train.trainer.ResponseOnlyTrainer` with the run's TrainingArguments) and a
  plain reference (PEFT ``get_peft_model`` + ``model(**batch).loss`` + a hand-written
  ``torch.optim.AdamW`` loop), each for LoRA and QLoRA. The Trainer runs in a thread that a
  callback pauses after every optimizer step, so the benchmark can *interleave* the paths step
  by step (:class:`~.training.SteppedTrainer`): every round runs one step of each path on the
  same batch, in an order that rotates between rounds. A ratio is the median over rounds of the
  per-round ratio (:func:`~.measures.paired_ratio`): a burst of load from another process hits
  one round, not one path.
- **Memory** (:mod:`.memory`). Peak memory of two methods cannot be measured in one process (the
  second inherits the first's heap), so each method's training is re-run in a fresh subprocess
  under :class:`~qlora_diag.train.memory.PeakMemory`.
- **Roofline** (:mod:`.measures`, :mod:`.matmul`). Tokens/s x FLOPs per token / this machine's
  matmul rate in the compute dtype, the rate measured in every round next to the training steps
  and the fraction taken per round (:func:`~.measures.paired_roofline`).
- **Generation** (:mod:`.generation`). :func:`~qlora_diag.train.generation.generate_greedy`
  (batched, left-padded, KV cache) against one-prompt-at-a-time ``model.generate``, timed
  batched / one-at-a-time / batched so that drift in machine load cancels; the outputs are
  compared token by token.
- **No-op repro** (:mod:`.repro`). ``dvc repro`` timed in the repository, only if
  ``dvc status`` says the workspace is up to date.
"""
