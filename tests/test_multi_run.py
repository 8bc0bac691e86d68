"""Several runs over one loaded base (qlora_diag.train.multi_run) give each run's adapter alone."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from qlora_diag.core.config import LoraCfg, TrainCfg
from qlora_diag.train.multi_run import FINISHED_SUFFIX, train_group
from qlora_diag.train.trainer import GenerationCfg, RunSpec, train_adapter

# dropout > 0: the runs' dropout masks must come from their own seeds too
LORA = LoraCfg(r=4, alpha=8.0, dropout=0.1, targets="qv")
TRAIN = TrainCfg(max_steps=4, batch_size=4, lr=1e-3, lr_scheduler="linear", warmup_steps=1,
                 weight_decay=0.0, max_grad_norm=1.0, optimizer="auto", group_by_length=True,
                 share_prefix=True, kbit_prep=False, gradient_checkpointing=False, eval_every=2,
                 save_every=2, threads=1)
GEN = GenerationCfg(n_generate=4, max_new_tokens=4, batch_size=4)


def _common(tiny_base_dir, root):
    return dict(base_dir=tiny_base_dir, quant_dir=root / "quantized", data_dir=root / "data",
                base_dtype="float32", compute_dtype="float32", lora=LORA, train=TRAIN, gen=GEN)


def _assert_same_adapter(a, b):
    wa, wb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert sorted(wa) == sorted(wb)
    for key in wa:
        scale = wa[key].abs().max().clamp_min(1e-12)
        assert (wa[key] - wb[key]).abs().max() / scale <= 1e-5, key


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_group_gives_each_runs_adapter_alone(tiny_pipeline, tiny_base_dir, tmp_path, method):
    specs = [RunSpec(method, 4, "qv", s) for s in (3, 7, 11)]
    kw = _common(tiny_base_dir, tiny_pipeline)
    group = train_group(specs, **kw, adapters_root=tmp_path / "g/adapters",
                        reports_root=tmp_path / "g/reports", checkpoint_root=tmp_path / "g/ckpt")
    assert [m["run"] for m in group] == [s.name for s in specs]
    for spec, m in zip(specs[1:], group[1:]):  # the 2nd and 3rd ran on a base used before
        alone = train_adapter(spec, **kw, adapter_out=tmp_path / "a" / spec.name,
                              report_dir=tmp_path / "ar" / spec.name,
                              checkpoint_root=tmp_path / "a/ckpt")
        _assert_same_adapter(tmp_path / "g/adapters" / spec.name, tmp_path / "a" / spec.name)
        assert abs(alone["eval_loss"] - m["eval_loss"]) <= 1e-5 * abs(alone["eval_loss"])
        assert (tmp_path / "g/reports" / spec.name / "generations.jsonl").read_text() == \
            (tmp_path / "ar" / spec.name / "generations.jsonl").read_text()
    # seeds differ, so do the adapters (the test above could not pass by training nothing)
    w3 = load_file(tmp_path / "g/adapters" / specs[0].name / "adapter_model.safetensors")
    w7 = load_file(tmp_path / "g/adapters" / specs[1].name / "adapter_model.safetensors")
    assert any(not torch.equal(w3[k], w7[k]) for k in w3)
    assert not list((tmp_path / "g/ckpt").iterdir()), "checkpoints and finished copies removed"


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_group_in_bf16_gives_each_runs_eval_loss_alone(tiny_pipeline, tiny_base_dir, tmp_path,
                                                      method):
    """In bf16 (what `auto` picks on CPUs with AVX512-BF16 or AMX and on Ampere+ GPUs) rounding
    may differ between two processes, so the group's run is held to the run-to-run difference of
    the same run trained alone twice, measured here: on a CPU that difference is 0 (same shapes,
    same threads, same bits), so the 2nd run of a group, on a base used before, must give the
    eval loss of the run alone exactly."""
    kw = {**_common(tiny_base_dir, tiny_pipeline), "base_dtype": "bfloat16",
          "compute_dtype": "bfloat16"}
    specs = [RunSpec(method, 4, "qv", s) for s in (3, 7)]
    group = train_group(specs, **kw, adapters_root=tmp_path / "g/adapters",
                        reports_root=tmp_path / "g/reports", checkpoint_root=tmp_path / "g/ckpt")
    alone = [train_adapter(specs[1], **kw, adapter_out=tmp_path / f"a{i}" / specs[1].name,
                           report_dir=tmp_path / f"ar{i}" / specs[1].name,
                           checkpoint_root=tmp_path / f"a{i}/ckpt")["eval_loss"]
             for i in range(2)]
    run_to_run = abs(alone[0] - alone[1])
    assert abs(group[1]["eval_loss"] - alone[0]) <= run_to_run, (group[1]["eval_loss"], alone)
    assert group[0]["eval_loss"] != group[1]["eval_loss"], "the seeds differ, so do the runs"


def test_group_refuses_mixed_methods():
    with pytest.raises(ValueError, match="one method"):
        train_group([RunSpec("lora", 4, "qv", 1), RunSpec("qlora", 4, "qv", 1)],
                    base_dir=None, quant_dir=None, data_dir=None, base_dtype="float32",
                    compute_dtype="float32", lora=LORA, train=TRAIN, gen=GEN,
                    adapters_root=None, reports_root=None, checkpoint_root=None)


@pytest.mark.slow
def test_killed_group_keeps_finished_runs_and_resumes(tiny_pipeline, tiny_base_dir, tmp_path):
    """A kill during the 2nd run of a group (after its step-2 checkpoint), with the outputs
    deleted as DVC does before rerunning a stage: the rerun restores the 1st run without
    training it, resumes the 2nd from step 2, and every adapter equals an uninterrupted group's."""
    specs = [RunSpec("lora", 4, "qv", s) for s in (3, 7)]
    kw = _common(tiny_base_dir, tiny_pipeline)
    train_group(specs, **kw, adapters_root=tmp_path / "ref/adapters",
                reports_root=tmp_path / "ref/reports", checkpoint_root=tmp_path / "ref/ckpt")
    out = tmp_path / "int"
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        import transformers
        from qlora_diag.core.config import LoraCfg, TrainCfg
        from qlora_diag.train.multi_run import train_group
        from qlora_diag.train.trainer import GenerationCfg, RunSpec
        orig = transformers.Trainer._save_checkpoint
        calls = []
        def save_then_die(self, *a, **k):
            orig(self, *a, **k)
            calls.append(self.state.global_step)
            if len(calls) == 3:  # run 1 saved at steps 2 and 4; run 2 at step 2
                os.kill(os.getpid(), signal.SIGKILL)
        transformers.Trainer._save_checkpoint = save_then_die
        train_group({specs!r}, base_dir=Path({str(tiny_base_dir)!r}),
            quant_dir=Path({str(tiny_pipeline / 'quantized')!r}),
            data_dir=Path({str(tiny_pipeline / 'data')!r}), base_dtype="float32",
            compute_dtype="float32", lora={LORA!r}, train={TRAIN!r}, gen={GEN!r},
            adapters_root=Path({str(out / 'adapters')!r}),
            reports_root=Path({str(out / 'reports')!r}), checkpoint_root=Path({str(out / 'ckpt')!r}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (out / "ckpt" / f"{specs[0].name}{FINISHED_SUFFIX}").is_dir()
    assert (out / "ckpt" / specs[1].name / "checkpoint-2").is_dir()
    import shutil
    shutil.rmtree(out / "adapters")  # what DVC does to a stage's outputs before rerunning it
    shutil.rmtree(out / "reports")
    trained = train_group(specs, **kw, adapters_root=out / "adapters",
                          reports_root=out / "reports", checkpoint_root=out / "ckpt")
    assert [m["run"] for m in trained] == [specs[1].name], "the finished run is not retrained"
    assert trained[0]["resumed_from_step"] == 2
    for spec in specs:
        _assert_same_adapter(out / "adapters" / spec.name, tmp_path / "ref/adapters" / spec.name)
        assert (out / "reports" / spec.name / "run.json").is_file()
    assert not list((out / "ckpt").iterdir())


def test_a_finished_copy_is_restored_only_under_its_fingerprint(tmp_path):
    """Other params or data (another fingerprint): the copy is deleted, the run trains again."""
    from qlora_diag.train.multi_run import _restore, _stash

    adapter, report = tmp_path / "out/adapter", tmp_path / "out/report"
    for d, text in ((adapter, "weights"), (report, "metrics")):
        d.mkdir(parents=True)
        (d / "f").write_text(text)
    finished = tmp_path / "ckpt/run.finished"
    finished.parent.mkdir()
    _stash(finished, "fp-a", adapter, report)
    new_adapter, new_report = tmp_path / "new/adapter", tmp_path / "new/report"
    assert _restore(finished, "fp-a", new_adapter, new_report)
    assert (new_adapter / "f").read_text() == "weights" and (new_report / "f").read_text() == "metrics"
    assert not _restore(finished, "fp-b", tmp_path / "x/adapter", tmp_path / "x/report")
    assert not finished.exists() and not (tmp_path / "x").exists()
