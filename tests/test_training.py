"""Training: apples-to-apples init and order, response-only loss, resume, determinism."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from qlora_diag.core.config import LoraCfg, TrainCfg
from qlora_diag.core.errors import UserError
from qlora_diag.core.examples import mean_loss, read_examples
from qlora_diag.data.batching import IGNORE, collate, training_order
from qlora_diag.train.checkpoints import latest_complete_checkpoint
from qlora_diag.train.losses import evaluate_examples, response_loss_sum
from qlora_diag.train.memory import choose_backend
from qlora_diag.train.trainer import (
    GenerationCfg,
    RunSpec,
    attach_lora,
    choose_optimizer,
    train_adapter,
)

LORA = LoraCfg(r=4, alpha=8.0, dropout=0.0, targets="qv")


def train_cfg(**over) -> TrainCfg:
    base = dict(max_steps=6, batch_size=4, lr=1e-3, lr_scheduler="constant", warmup_steps=0,
                weight_decay=0.0, max_grad_norm=1.0, optimizer="auto", group_by_length=True,
                share_prefix=True, kbit_prep=False, gradient_checkpointing=False,
                eval_every=3, save_every=2, threads=1)
    base.update(over)
    return TrainCfg(**base)


GEN = GenerationCfg(n_generate=4, max_new_tokens=4, batch_size=4)


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory, tiny_base_dir):
    """A prepared tiny data set and a quantized tiny model, as the stages would leave them."""
    from qlora_diag.data.splits import prepare_dataset
    from qlora_diag.models.loading import load_tokenizer
    from qlora_diag.models.quantization.save import quantize_and_save

    root = tmp_path_factory.mktemp("pipe")
    tok = load_tokenizer(tiny_base_dir)
    prepare_dataset(source="embedded:probe", n_train=24, n_eval=8, max_length=96, seed=0,
                    tokenizer=tok, out_dir=root / "data")
    quantize_and_save(tiny_base_dir, root / "quantized", quant_type="nf4", double_quant=True,
                      compute_dtype="bfloat16")
    return root


def run(tiny_base_dir, root, out, spec, train=None):
    return train_adapter(spec, base_dir=tiny_base_dir, quant_dir=root / "quantized",
                         data_dir=root / "data", base_dtype="bfloat16", compute_dtype="bfloat16",
                         lora=LORA, train=train or train_cfg(), gen=GEN,
                         adapter_out=out / "adapter", report_dir=out / "report",
                         checkpoint_root=out / "ckpt")


def test_collate_masks_prompt_and_padding():
    batch = collate([{"input_ids": [5, 6, 7, 8], "n_prompt": 2},
                     {"input_ids": [5, 6, 9], "n_prompt": 1}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [5, 6, 9, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, 7, 8], [IGNORE, 6, 9, IGNORE]]


def test_training_order_is_a_function_of_seed_and_groups_lengths():
    lengths = [i % 13 + 5 for i in range(100)]
    a = training_order(lengths, 4, 30, seed=1, group_by_length=True)
    assert a == training_order(lengths, 4, 30, seed=1, group_by_length=True)
    assert a != training_order(lengths, 4, 30, seed=2, group_by_length=True)
    assert len(a) == 120 and set(a) <= set(range(100))

    def spread(o: list[int]) -> int:
        return sum(max(lengths[i] for i in o[k:k + 4]) - min(lengths[i] for i in o[k:k + 4])
                   for k in range(0, len(o), 4))

    assert spread(a) < spread(training_order(lengths, 4, 30, seed=1, group_by_length=False))


# Rows sharing prompt prefixes of several lengths (the whole prompt but its last token, in one
# pair), and a row sharing nothing.
SHARED_PREFIX_ROWS = [
    {"input_ids": list(range(10, 30)), "n_prompt": 12},
    {"input_ids": list(range(10, 18)) + [900, 901, 902, 903, 904], "n_prompt": 10},
    {"input_ids": list(range(10, 22)) + [77, 78], "n_prompt": 13},
    {"input_ids": list(range(40, 52)), "n_prompt": 5},
    {"input_ids": list(range(40, 44)) + [5, 6, 7], "n_prompt": 5},
]


@pytest.mark.parametrize("share_prefix", [False, True])
def test_response_loss_equals_hf_loss(tiny_model, share_prefix):
    """Running the LM head only on labelled positions, and encoding shared prompt prefixes
    once, must not change the loss."""
    batch = collate(SHARED_PREFIX_ROWS, pad_id=2)
    tiny_model.float()
    ours, n = response_loss_sum(tiny_model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                share_prefix=share_prefix)
    hf = tiny_model(**batch).loss
    assert n == sum(len(r["input_ids"]) - r["n_prompt"] for r in SHARED_PREFIX_ROWS)
    torch.testing.assert_close(ours / n, hf, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_shared_prefix_gives_the_same_gradient(tiny_base_dir, tmp_path, method):
    """Without dropout, sharing prefixes changes neither the loss nor the adapter's gradient
    (the shared activations collect the gradient of every row that uses them)."""
    from qlora_diag.models.loading import load_base, load_quantized
    from qlora_diag.models.quantization.save import quantize_and_save

    if method == "qlora":
        quantize_and_save(tiny_base_dir, tmp_path / "q", quant_type="nf4", double_quant=True,
                          compute_dtype="float32")
        base = load_quantized(tmp_path / "q", "float32")
    else:
        base = load_base(tiny_base_dir, "float32")
    model = attach_lora(base, rank=4, alpha=8.0, dropout=0.0, targets="qv", seed=3)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B = 0 at init would make every A gradient zero
            torch.nn.init.normal_(p, std=0.05)
    model.train()
    batch = collate(SHARED_PREFIX_ROWS, pad_id=2)
    grads, losses = [], []
    for share in (False, True):
        model.zero_grad()
        loss, _ = response_loss_sum(model, batch["input_ids"], batch["attention_mask"],
                                    batch["labels"], share_prefix=share)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    if method == "qlora":  # the packed tree needs no KV cache, so it also runs under checkpointing
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.zero_grad()
        loss, _ = response_loss_sum(model, batch["input_ids"], batch["attention_mask"],
                                    batch["labels"], share_prefix=True)
        loss.backward()
        torch.testing.assert_close(loss.detach(), losses[0], rtol=1e-5, atol=1e-5)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_gradient_checkpointing_applies_to_both_methods_alike(tiny_base_dir, tmp_path, method):
    """train.gradient_checkpointing: on for the LoRA and the QLoRA model alike (issue 15: only
    train.kbit_prep turned it on, for QLoRA alone), seen as the recomputation of every decoder
    layer in the backward pass, with the loss and gradients of the off setting (fp32, dropout
    on: the recomputation replays the same masks). kbit_prep alone leaves it off."""
    from qlora_diag.models.quantization.save import quantize_and_save
    from qlora_diag.train.trainer import load_training_base, set_gradient_checkpointing

    if method == "qlora":
        quantize_and_save(tiny_base_dir, tmp_path / "q", quant_type="nf4", double_quant=True,
                          compute_dtype="float32")
    batch = collate(SHARED_PREFIX_ROWS, pad_id=2)
    results = {}
    for on in (False, True):
        base = load_training_base(method, base_dir=tiny_base_dir, quant_dir=tmp_path / "q",
                                  base_dtype="float32", compute_dtype="float32", kbit_prep=True,
                                  device=torch.device("cpu"))
        model = attach_lora(base, rank=4, alpha=8.0, dropout=0.2, targets="qv", seed=3)
        set_gradient_checkpointing(model, on)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B = 0 at init would make every A gradient zero
                torch.nn.init.normal_(p, generator=torch.Generator().manual_seed(7), std=0.05)
        layers = model.get_base_model().model.layers
        calls: list[str] = []

        def count(module, *_, calls=calls):
            calls.append(module)

        for layer in layers:  # the attention inside each checkpointed layer runs again
            layer.self_attn.register_forward_hook(count)
        model.train()
        torch.manual_seed(11)  # the dropout masks
        loss, _ = response_loss_sum(model, batch["input_ids"], batch["attention_mask"],
                                    batch["labels"], share_prefix=True)
        loss.backward()
        results[on] = (loss.detach(), len(calls),
                       {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    (loss_off, calls_off, grads_off), (loss_on, calls_on, grads_on) = results[False], results[True]
    assert calls_off == len(layers)       # one forward per layer
    assert calls_on == 2 * len(layers)    # and once more in the backward pass
    assert all(layer.gradient_checkpointing for layer in layers)
    torch.testing.assert_close(loss_on, loss_off, rtol=0, atol=0)
    for name in grads_off:
        torch.testing.assert_close(grads_on[name], grads_off[name], rtol=1e-5, atol=1e-7,
                                   msg=name)


def test_qlora_gradient_is_unchanged_by_an_evaluation_in_between(tiny_base_dir, tmp_path):
    """bitsandbytes repacks a Linear4bit's weights for a bf16 CPU inference kernel the first time
    it runs in eval mode on a CPU with AVX512-BF16, and that kernel has no backward: training
    after an evaluation would then get wrong gradients through the base layers. Our loader keeps
    every Linear4bit on the differentiable path, so an evaluation must not change the gradient."""
    from qlora_diag.models.loading import load_quantized
    from qlora_diag.models.quantization.save import quantize_and_save

    quantize_and_save(tiny_base_dir, tmp_path / "q", quant_type="nf4", double_quant=True,
                      compute_dtype="bfloat16")
    base = load_quantized(tmp_path / "q", "bfloat16")
    assert not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in base.modules())
    model = attach_lora(base, rank=4, alpha=8.0, dropout=0.0, targets="qv", seed=3)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    batch = collate(SHARED_PREFIX_ROWS, pad_id=2)

    def grads():
        model.train()
        model.zero_grad()
        loss, _ = response_loss_sum(model, batch["input_ids"], batch["attention_mask"],
                                    batch["labels"], share_prefix=False)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = grads()
    model.eval()
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    after = grads()
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0, msg=name)


def test_optimizer_choice_by_device():
    assert choose_optimizer("auto", "cuda") == "paged_adamw_32bit"
    assert choose_optimizer("auto", "cpu") == "adamw_torch"
    assert choose_optimizer("adamw_torch", "cuda") == "adamw_torch"
    with pytest.raises(UserError, match="train.optimizer.*CUDA"):
        choose_optimizer("paged_adamw_32bit", "cpu")


def test_both_methods_get_one_optimizer_on_a_cuda_host(monkeypatch):
    """Issue 15: under auto, QLoRA got paged AdamW and LoRA plain AdamW on CUDA. The device is
    the one the training stage chooses (torch.cuda patched to one visible GPU); the method is
    not an input of the choice, and the memory measure then says what it leaves out."""
    from qlora_diag.core.machine import choose_device
    from qlora_diag.train.memory import memory_measure

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    device = choose_device()
    assert device.type == "cuda"
    optim = choose_optimizer("auto", device.type)
    assert optim == "paged_adamw_32bit"
    assert "paged optimizer state" in memory_measure("CUDA peak allocated tensor memory", optim)
    assert memory_measure("x", "adamw_torch") == "x"


def test_memory_backend_choice():
    assert choose_backend("cuda", True) == "cuda"
    assert choose_backend("cpu", True) == "rss_hwm"
    assert choose_backend("cpu", False) == "rss_sampler"


def test_lora_and_qlora_start_from_identical_adapters(tiny_pipeline, tiny_base_dir):
    from qlora_diag.models.loading import load_base, load_quantized

    lora = attach_lora(load_base(tiny_base_dir, "bfloat16"), rank=4, alpha=8, dropout=0.0,
                       targets="qv", seed=7)
    qlora = attach_lora(load_quantized(tiny_pipeline / "quantized", "bfloat16"), rank=4, alpha=8,
                        dropout=0.0, targets="qv", seed=7)
    la = {k: v for k, v in lora.named_parameters() if "lora_" in k}
    qa = {k: v for k, v in qlora.named_parameters() if "lora_" in k}
    assert la.keys() == qa.keys() and len(la) == 8
    for k in la:
        torch.testing.assert_close(la[k], qa[k], rtol=0, atol=0)
    other = attach_lora(load_base(tiny_base_dir, "bfloat16"), rank=4, alpha=8, dropout=0.0,
                        targets="qv", seed=8)
    assert not torch.equal(dict(other.named_parameters())[next(iter(la))], next(iter(la.values())))


def test_rank_larger_than_module_is_rejected(tiny_model):
    with pytest.raises(UserError, match="larger than the smallest adapted dimension"):
        attach_lora(tiny_model, rank=999, alpha=8, dropout=0.0, targets="qv", seed=0)


def test_latest_complete_checkpoint_skips_and_removes_partial(tmp_path):
    good = tmp_path / "checkpoint-2"
    bad = tmp_path / "checkpoint-4"
    for d in (good, bad):
        d.mkdir()
        for f in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt"):
            (d / f).write_text("x")
    (good / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    (bad / "trainer_state.json").write_text('{"global_st')  # killed while writing
    assert latest_complete_checkpoint(tmp_path) == good
    assert not bad.exists()


@pytest.mark.slow
def test_train_writes_adapter_metrics_and_is_deterministic(tiny_pipeline, tiny_base_dir, tmp_path):
    from peft import PeftModel

    from qlora_diag.data.splits import load_split
    from qlora_diag.models.loading import load_base, load_tokenizer

    spec = RunSpec("lora", 4, "qv", 3)
    m1 = run(tiny_base_dir, tiny_pipeline, tmp_path / "a", spec)
    m2 = run(tiny_base_dir, tiny_pipeline, tmp_path / "b", spec)
    # Same machine, same params: bit-identical on CPU; 1e-6 leaves room for BLAS thread changes.
    assert abs(m1["eval_loss"] - m2["eval_loss"]) < 1e-6
    assert (tmp_path / "a/adapter/adapter_model.safetensors").is_file()
    report = tmp_path / "a/report"
    assert json.loads((report / "run.json").read_text())["eval_loss"] == m1["eval_loss"]
    assert len((report / "generations.jsonl").read_text().splitlines()) == GEN.n_generate
    assert (report / "plots/metrics/train/loss.tsv").is_file()
    assert not (report / "plots/metrics/loss.tsv").exists()
    assert (report / "plots/metrics/eval/loss.tsv").is_file()
    assert not (tmp_path / "a/ckpt" / spec.name).exists(), "checkpoints are removed when done"
    # Identical runs on one base write the same bytes, so DVC sees an unchanged output: weights,
    # config (sorted sets, the recorded base) and model card.
    a, b = tmp_path / "a/adapter", tmp_path / "b/adapter"
    assert sorted(f.name for f in a.iterdir()) == sorted(f.name for f in b.iterdir())
    for f in a.iterdir():
        assert f.read_bytes() == (b / f.name).read_bytes(), f.name
    # The saved adapter reproduces the logged eval loss on a fresh base.
    tok = load_tokenizer(tiny_base_dir)
    model = PeftModel.from_pretrained(load_base(tiny_base_dir, "bfloat16"), tmp_path / "a/adapter")
    eval_records = load_split(tiny_pipeline / "data/eval.jsonl")
    fresh = evaluate_examples(model, eval_records, 8, tok.pad_token_id)
    assert abs(fresh.loss - m1["eval_loss"]) < 1e-5
    # examples.jsonl: one row per eval example in eval order, summing to run.json's eval loss,
    # exact match and output for the generated examples only, and reproduced by the adapter.
    ex = read_examples(report / "examples.jsonl")
    assert [r["id"] for r in ex] == [r["id"] for r in eval_records]
    assert [r["family"] for r in ex] == [r["task"] for r in eval_records]
    assert sum(r["n_tokens"] for r in ex) == m1["eval_tokens"]
    assert mean_loss(ex) == pytest.approx(m1["eval_loss"], rel=1e-6)
    gens = [json.loads(line) for line in (report / "generations.jsonl").read_text().splitlines()]
    assert [r["exact_match"] for r in ex] == ([int(g["exact_match"]) for g in gens]
                                              + [None] * (len(ex) - GEN.n_generate))
    assert [r["output"] for r in ex[:GEN.n_generate]] == [g["output"] for g in gens]
    assert [r["output"] for r in ex[GEN.n_generate:]] == [None] * (len(ex) - GEN.n_generate)
    np.testing.assert_allclose([r["nll_sum"] for r in ex], fresh.nll_sums, rtol=1e-4)


@pytest.mark.slow
def test_same_init_control_shares_the_init_and_not_the_batches(tiny_pipeline, tiny_base_dir,
                                                               tmp_path):
    """``data_seed`` moves the batch order and nothing of the init. With lr = 0 the adapter
    stays at its init and B = 0 leaves the model the base, so each step's train loss is a
    function of its batch only: the control (init 3, data 4) keeps run 3's A and B and has the
    losses of run (init 5, data 4), not those of run 3."""
    from safetensors.torch import load_file

    cfg = train_cfg(max_steps=3, lr=0.0, eval_every=3, save_every=3)
    specs = {"seed": RunSpec("lora", 4, "qv", 3), "control": RunSpec("lora", 4, "qv", 3, 4),
             "other": RunSpec("lora", 4, "qv", 5, 4)}
    assert specs["control"].name == "lora-r4-qv-s3-d4"
    assert RunSpec("lora", 4, "qv", 3, 3) == specs["seed"] and specs["seed"].data_seed == 3
    out = {}
    for key, spec in specs.items():
        m = run(tiny_base_dir, tiny_pipeline, tmp_path / key, spec, cfg)
        assert (m["seed"], m["data_seed"]) == (spec.seed, spec.data_seed)
        loss = (tmp_path / key / "report/plots/metrics/train/loss.tsv").read_text().splitlines()
        out[key] = (load_file(tmp_path / key / "adapter/adapter_model.safetensors"),
                    [float(line.split("\t")[-1]) for line in loss[1:]])
    (w_seed, loss_seed), (w_control, loss_control), (w_other, loss_other) = out.values()
    assert w_seed.keys() == w_control.keys() and len(w_seed) == 8
    for k in w_seed:
        assert torch.equal(w_seed[k], w_control[k]), k
    a = next(k for k in w_seed if "lora_A" in k)
    assert not torch.equal(w_seed[a], w_other[a])
    assert len(loss_seed) == len(loss_control) == 3
    assert loss_control == loss_other
    assert loss_control != loss_seed


@pytest.mark.slow
def test_killed_run_resumes_and_matches_uninterrupted(tiny_pipeline, tiny_base_dir, tmp_path):
    """Kill a training process after its step-4 checkpoint; the rerun resumes from it and ends
    with the eval loss of an uninterrupted run (to 1e-4, the issue's CPU tolerance)."""
    spec = RunSpec("qlora", 4, "qv", 5)
    cfg = train_cfg(max_steps=8, save_every=2)
    reference = run(tiny_base_dir, tiny_pipeline, tmp_path / "ref", spec, cfg)

    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        import transformers
        from qlora_diag.core.config import LoraCfg, TrainCfg
        from qlora_diag.train.trainer import GenerationCfg, RunSpec, train_adapter
        orig = transformers.Trainer._save_checkpoint
        def save_then_die(self, *a, **k):
            orig(self, *a, **k)
            if self.state.global_step == 4:
                os.kill(os.getpid(), signal.SIGKILL)
        transformers.Trainer._save_checkpoint = save_then_die
        train_adapter(RunSpec("qlora", 4, "qv", 5), base_dir=Path({str(tiny_base_dir)!r}),
            quant_dir=Path({str(tiny_pipeline / 'quantized')!r}),
            data_dir=Path({str(tiny_pipeline / 'data')!r}),
            base_dtype="bfloat16", compute_dtype="bfloat16", lora={LORA!r}, train={cfg!r},
            gen={GEN!r}, adapter_out=Path({str(tmp_path / 'int/adapter')!r}),
            report_dir=Path({str(tmp_path / 'int/report')!r}),
            checkpoint_root=Path({str(tmp_path / 'int/ckpt')!r}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (tmp_path / "int/adapter").exists(), "a killed run leaves no finished-looking adapter"
    assert (tmp_path / "int/ckpt" / spec.name / "checkpoint-4").is_dir()

    resumed = run(tiny_base_dir, tiny_pipeline, tmp_path / "int", spec, cfg)
    assert resumed["resumed_from_step"] == 4
    assert abs(resumed["eval_loss"] - reference["eval_loss"]) < 1e-4
    steps = [int(line.split("\t")[0]) for line in
             (tmp_path / "int/report/plots/metrics/train/loss.tsv").read_text().splitlines()[1:]]
    assert steps == sorted(set(steps)) and steps[-1] == 8, "each step logged once after resume"


def test_run_summary_reports_speed_as_na_without_timed_steps():
    """A run resumed from its last checkpoint trains no step, so nothing is timed: the closing
    line says n/a instead of crashing on None (run.json keeps None)."""
    from qlora_diag.train.trainer import run_summary

    m = {"run": "qlora-r4-qv-s5", "eval_loss": 2.5, "exact_match": 0.25, "tokens_per_s": None,
         "peak_mem_mb": 812.4, "wall_s": 3.2}
    assert run_summary(m) == ("qlora-r4-qv-s5: eval_loss 2.5000  exact_match 0.250  n/a tok/s  "
                              "peak 812 MB  3 s")
    assert "1234 tok/s" in run_summary({**m, "tokens_per_s": 1234.4})


def test_save_adapter_writes_set_valued_config_fields_sorted(tiny_model, tmp_path):
    """PEFT keeps target_modules as a set and writes list(set), whose order follows the
    process's string-hash seed: identical runs would give adapters with different bytes (and
    DVC hashes). Seven modules: an unsorted order survives by chance with p = 1/5040."""
    from qlora_diag.train.outputs import save_adapter

    model = attach_lora(tiny_model, rank=2, alpha=4, dropout=0.0, targets="attn_mlp", seed=0)
    save_adapter(model, tmp_path / "a", str(tmp_path / "base"))
    saved = json.loads((tmp_path / "a/adapter_config.json").read_text())
    assert saved["target_modules"] == sorted(model.peft_config["default"].target_modules)
    assert len(saved["target_modules"]) == 7
    assert (tmp_path / "a/adapter_model.safetensors").is_file()


def _live_dir(root, steps_logged):
    """A dvclive directory as a run killed after logging ``steps_logged`` leaves it."""
    from dvclive import Live

    live = Live(str(root), dvcyaml=False, save_dvc_exp=False)
    live.log_params({"run": "x", "rank": 4})
    for step in range(1, steps_logged + 1):
        live.step = step
        live.log_metric("train/loss", 3.0 - step / 10)
        if step % 2 == 0:
            live.log_metric("eval/loss", 3.5 - step / 10)
        live.make_summary()
    return root


def _rows(tsv):
    return [line.split("\t") for line in tsv.read_text().splitlines()[1:]]


def _steps(tsv):
    col = tsv.read_text().splitlines()[0].split("\t").index("step")
    return [r[col] for r in _rows(tsv)]


def test_restore_live_dir_keeps_rows_up_to_the_checkpoint(tmp_path):
    from dvclive import Live

    from qlora_diag.train.checkpoints import restore_live_dir

    live_dir = _live_dir(tmp_path / "live", 5)
    restore_live_dir(live_dir, 4)
    assert _steps(live_dir / "plots/metrics/train/loss.tsv") == ["1", "2", "3", "4"]
    assert _steps(live_dir / "plots/metrics/eval/loss.tsv") == ["2", "4"]
    summary = json.loads((live_dir / "metrics.json").read_text())
    assert summary == {"train": {"loss": pytest.approx(2.6)}, "eval": {"loss": pytest.approx(3.1)},
                       "step": 4}
    resumed = Live(str(live_dir), resume=True, dvcyaml=False, save_dvc_exp=False)
    assert resumed.step == 5 and resumed.summary["train"]["loss"] == pytest.approx(2.6)


def test_restore_live_dir_repairs_files_torn_by_a_kill(tmp_path):
    """SIGKILL in the middle of dvclive's plain writes: a curve's last row cut short, the
    summary and params files truncated. The resumed Live must start, with each step once."""
    from dvclive import Live

    from qlora_diag.train.checkpoints import restore_live_dir

    live_dir = _live_dir(tmp_path / "live", 4)
    train_tsv = live_dir / "plots/metrics/train/loss.tsv"
    eval_tsv = live_dir / "plots/metrics/eval/loss.tsv"
    train_tsv.write_text(train_tsv.read_text()[:-4])        # last row lost its end
    eval_tsv.write_text(eval_tsv.read_text() + "6\t3.")      # a new row cut mid-number
    (live_dir / "metrics.json").write_text('{\n    "train": {\n        "lo')
    (live_dir / "params.yaml").write_text("run: x\nrank: [4\n")
    from dvclive.serialize import YAMLFileCorruptedError

    with pytest.raises((json.JSONDecodeError, YAMLFileCorruptedError)):  # a resume unrepaired
        Live(str(live_dir), resume=True, dvcyaml=False, save_dvc_exp=False)

    restore_live_dir(live_dir, 4)
    assert _steps(train_tsv) == ["1", "2", "3"]
    assert _steps(eval_tsv) == ["2", "4"]
    assert json.loads((live_dir / "metrics.json").read_text())["step"] == 4
    assert not (live_dir / "params.yaml").exists()
    resumed = Live(str(live_dir), resume=True, dvcyaml=False, save_dvc_exp=False)
    resumed.step = 4
    resumed.log_metric("train/loss", 2.6)
    resumed.make_summary()
    assert _steps(train_tsv) == ["1", "2", "3", "4"]
    assert all(len(r) == 2 for r in _rows(train_tsv))
