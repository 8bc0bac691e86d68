"""A saved adapter names a base that loads from anywhere: ``AutoPeftModelForCausalLM`` works on it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from qlora_diag.core.config import LoraCfg, TrainCfg
from qlora_diag.models.loading import BASE_INFO, base_model_reference
from qlora_diag.train.trainer import GenerationCfg, RunSpec, train_adapter


def base_dir_from(tmp_path: Path, source: str | None) -> Path:
    """A model directory whose base_info.json (if any) names ``source`` as base.model."""
    folder = tmp_path / "models/base"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    if source is not None:
        (folder / BASE_INFO).write_text(json.dumps({"source": source, "n_params": 1}))
    return folder


def test_hub_base_is_recorded_by_its_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = base_dir_from(tmp_path, "openai-community/gpt2-medium")
    assert base_model_reference(Path("models/base")) == "openai-community/gpt2-medium"
    assert base_model_reference(folder) == "openai-community/gpt2-medium"


@pytest.mark.parametrize("source", ["embedded:tiny-llama", None, "./my-model", "my-model"])
def test_other_bases_are_recorded_by_absolute_path(tmp_path, monkeypatch, source):
    """Embedded models, directories without base_info.json (the 4-bit model of the quantize
    stage, whose config carries the quantization) and local sources: the directory itself, as
    an absolute path, whatever the working directory. ``my-model`` exists here, so it was a
    local directory, not a hub id, when the base stage read it."""
    (tmp_path / "my-model").mkdir()
    monkeypatch.chdir(tmp_path)
    base_dir_from(tmp_path, source)
    assert base_model_reference(Path("models/base")) == str(tmp_path.resolve() / "models/base")


def test_save_adapter_records_the_base_in_config_and_model_card(tiny_model, tmp_path):
    from qlora_diag.train.outputs import save_adapter
    from qlora_diag.train.trainer import attach_lora

    model = attach_lora(tiny_model, rank=2, alpha=4, dropout=0.0, targets="qv", seed=0)
    save_adapter(model, tmp_path / "a", "/somewhere/models/quantized")
    saved = json.loads((tmp_path / "a/adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "/somewhere/models/quantized"
    assert "base_model: /somewhere/models/quantized\n" in (tmp_path / "a/README.md").read_text()


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_auto_peft_loads_a_trained_adapter_from_another_directory(tiny_base_dir, tmp_path,
                                                                  monkeypatch, method):
    """Trained as the stage trains (paths relative to the project), the adapter loads with
    ``AutoPeftModelForCausalLM.from_pretrained(adapter)`` from another working directory, on the
    base it was trained on -- for QLoRA the 4-bit model -- and gives the logits of
    ``PeftModel.from_pretrained`` on that base."""
    import bitsandbytes as bnb
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    from qlora_diag.data.splits import prepare_dataset
    from qlora_diag.models.loading import load_tokenizer
    from qlora_diag.models.quantization.save import quantize_and_save

    project = tmp_path / "project"
    shutil.copytree(tiny_base_dir, project / "models/base")
    monkeypatch.chdir(project)
    prepare_dataset(source="embedded:probe", n_train=16, n_eval=4, max_length=96, seed=0,
                    tokenizer=load_tokenizer("models/base"), out_dir=Path("data/prepared"))
    if method == "qlora":
        quantize_and_save("models/base", "models/quantized", quant_type="nf4", double_quant=True,
                          compute_dtype="bfloat16")
    train = TrainCfg(max_steps=3, batch_size=4, lr=1e-2, lr_scheduler="constant", warmup_steps=0,
                     weight_decay=0.0, max_grad_norm=1.0, optimizer="auto", group_by_length=True,
                     share_prefix=True, kbit_prep=False, gradient_checkpointing=False,
                     eval_every=3, save_every=3, threads=1)
    spec = RunSpec(method, 4, "qv", 0)
    train_adapter(spec, base_dir=Path("models/base"), quant_dir=Path("models/quantized"),
                  data_dir=Path("data/prepared"), base_dtype="bfloat16", compute_dtype="bfloat16",
                  lora=LoraCfg(r=4, alpha=8.0, dropout=0.0, targets="qv"), train=train,
                  gen=GenerationCfg(n_generate=2, max_new_tokens=2, batch_size=2),
                  adapter_out=Path("models/adapters") / spec.name,
                  report_dir=Path("reports/train") / spec.name,
                  checkpoint_root=Path("models/checkpoints"))
    adapter = project.resolve() / "models/adapters" / spec.name
    trained_on = (project / ("models/quantized" if method == "qlora" else "models/base")).resolve()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(trained_on)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    auto = AutoPeftModelForCausalLM.from_pretrained(adapter)
    n_4bit = sum(isinstance(m, bnb.nn.Linear4bit) for m in auto.modules())
    assert n_4bit == (14 if method == "qlora" else 0)  # every linear layer but the LM head
    explicit = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(trained_on), adapter)
    b = explicit.base_model.model.model.layers[0].self_attn.v_proj.lora_B["default"].weight
    assert b.abs().sum() > 0, "the adapter was trained (B moved from its zero init)"
    ids = torch.tensor([[1, 503, 2874, 28, 253, 1345, 30, 2]])
    torch.testing.assert_close(_logits(auto, ids), _logits(explicit, ids), rtol=0, atol=0)
