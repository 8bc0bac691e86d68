"""Generation: the project's batched greedy decoding against one-prompt-at-a-time ``generate``."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from qlora_diag.data.splits import load_split
from qlora_diag.models.loading import load_tokenizer
from qlora_diag.tools.bench.training import TrainSetup
from qlora_diag.train.generation import (
    generate_greedy,
    generation_examples,
    left_padded,
    prompt_ids,
)
from qlora_diag.train.trainer import GenerationCfg


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
    path = Path(setup.data_dir) / "eval.jsonl"
    prompts = prompt_ids(generation_examples(load_split(path), gen.n_generate,
                                             key="bench.gen_examples", path=path))
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
