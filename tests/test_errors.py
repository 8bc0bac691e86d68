"""Bad models and targets the model cannot take: each a UserError with a clear message, found
before training; on the command line, exit 2 without a traceback."""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from qlora_diag.core.errors import ParamsError, UserError
from qlora_diag.models.loading import EMBEDDED_MODELS, materialize_base
from qlora_diag.models.targets import (
    architecture_problems,
    check_architecture,
    resolve_targets,
)
from qlora_diag.train.trainer import attach_lora

# PEFT notes that GPT-2's Conv1D stores weights transposed and adapts accordingly.
pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out:UserWarning")

REPO = Path(__file__).resolve().parents[1]
EMBEDDED = ", ".join(EMBEDDED_MODELS)


def materialize_error(spec: str, tmp_path: Path) -> str:
    out = tmp_path / "out" / "base"
    with pytest.raises(UserError) as exc:
        materialize_base(spec, out, dtype="float32")
    assert not out.parent.exists() or list(out.parent.iterdir()) == [], "nothing written"
    return str(exc.value)


# --- base.model -------------------------------------------------------------------------------

def test_unknown_embedded_model_lists_them(tmp_path):
    msg = materialize_error("embedded:xyz", tmp_path)
    assert msg == f"base.model = 'embedded:xyz': unknown embedded model; embedded models: {EMBEDDED}"


def test_directory_without_config(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_bytes(b"")
    msg = materialize_error(str(tmp_path / "m"), tmp_path)
    assert msg.startswith(f"base.model = '{tmp_path / 'm'}': no config.json in this directory")


def test_directory_with_config_but_no_weights(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    msg = materialize_error(str(tmp_path / "m"), tmp_path)
    assert msg.startswith(f"base.model = '{tmp_path / 'm'}': no weights (model.safetensors, ")


@pytest.mark.parametrize("config, weights, cause", [
    ("{broken", b"", "not a valid JSON file"),
    (json.dumps({"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2, "vocab_size": 10}),
     b"garbage", "header"),
])
def test_directory_with_unreadable_files(tmp_path, config, weights, cause):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(config)
    (tmp_path / "m" / "model.safetensors").write_bytes(weights)
    msg = materialize_error(str(tmp_path / "m"), tmp_path)
    assert msg.startswith(f"base.model = '{tmp_path / 'm'}': cannot load the model in this "
                          "directory (")
    assert cause in msg and "save_pretrained()" in msg


@pytest.mark.parametrize("spec", ["./no/such/model", "/no/such/model", "~/no-such-model"])
def test_path_that_does_not_exist(tmp_path, spec):
    msg = materialize_error(spec, tmp_path)
    assert msg.startswith(f"base.model = {spec!r}: no such directory; give a local model "
                          "directory, a hub id")
    assert EMBEDDED in msg


def test_hub_id_while_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    msg = materialize_error("no-such-org/no-such-model", tmp_path)
    assert msg.startswith("base.model = 'no-such-org/no-such-model': no local directory of that "
                          "name, and it could not be loaded from the Hugging Face hub")
    assert "offline" in msg and EMBEDDED in msg and "\n" not in msg


def test_stage_without_base_model_exits_2(tmp_path):
    """`prepare` run before `base`: the message says which stage to run, no traceback."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    env = {k: v for k, v in os.environ.items() if k != "QLORA_DIAG_DEBUG"}
    proc = subprocess.run([sys.executable, str(REPO / "stages/prepare.py")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == ("error: models/base: not found; the tokenizer comes from the base "
                           "model, so run `dvc repro base` first\n")


# --- targets against the architecture ---------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_gpt2():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return transformers.GPT2LMHeadModel(
            transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100))


@pytest.fixture(scope="module")
def tiny_neox():
    """An architecture with no presets (GPT-NeoX fuses Q, K and V in query_key_value)."""
    return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
        vocab_size=100))


def test_peft_alone_accepts_a_partly_wrong_list(tiny_gpt2):
    """Why resolve_targets checks every name: PEFT errors only when *no* name matches."""
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(copy.deepcopy(tiny_gpt2),
                           LoraConfig(r=2, target_modules=["c_attn", "c_atn"]))
    assert sum("lora_A" in n for n, _ in model.named_parameters()) == 2  # c_atn silently dropped


def test_misspelt_module_among_right_ones(tiny_model):
    with pytest.raises(UserError) as exc:
        resolve_targets(tiny_model, "q_proj,v_prj")
    assert str(exc.value) == (
        "lora.targets = 'q_proj,v_prj': module name(s) v_prj match no linear layer of this "
        "llama model; its linear layers end in: down_proj, gate_proj, k_proj, o_proj, q_proj, "
        "up_proj, v_proj")
    assert resolve_targets(tiny_model, "q_proj,v_proj") == ["q_proj", "v_proj"]


def test_preset_on_an_architecture_without_presets(tiny_neox):
    with pytest.raises(UserError) as exc:
        resolve_targets(tiny_neox, "qv")
    msg = str(exc.value)
    assert msg.startswith("lora.targets = 'qv': presets are not defined for architecture "
                          "'gpt_neox' (known: ")
    assert "its linear layers end in: dense, dense_4h_to_h, dense_h_to_4h, query_key_value" in msg
    assert resolve_targets(tiny_neox, "query_key_value") == ["query_key_value"]


@pytest.mark.parametrize("preset", ["qv", "kv"])
def test_gpt2_cannot_express_split_qkv_presets(tiny_gpt2, preset):
    with pytest.raises(UserError) as exc:
        resolve_targets(tiny_gpt2, preset)
    assert str(exc.value) == (
        f"lora.targets = {preset!r}: architecture 'gpt2' cannot express this preset (GPT-2 "
        "fuses Q, K and V in c_attn); presets it supports: attn, attn_mlp, all_linear")


def test_gpt2_attn_resolves_and_adapts_attention_only(tiny_gpt2):
    assert resolve_targets(tiny_gpt2, "attn") == ["attn.c_attn", "attn.c_proj"]
    model = attach_lora(copy.deepcopy(tiny_gpt2), rank=4, alpha=8, dropout=0.0, targets="attn",
                        seed=0)
    adapted = {".".join(n.split(".lora_A")[0].split(".")[-2:])
               for n, _ in model.named_parameters() if "lora_A" in n}
    assert adapted == {"attn.c_attn", "attn.c_proj"}, adapted


PHI3 = dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def tiny_phi3():
    """Phi-3's layout: self_attn.qkv_proj, self_attn.o_proj, mlp.gate_up_proj, mlp.down_proj."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return transformers.Phi3ForCausalLM(transformers.Phi3Config(**PHI3))


@pytest.mark.parametrize("preset", ["qv", "kv"])
def test_phi3_cannot_express_split_qkv_presets(tiny_phi3, preset):
    with pytest.raises(UserError) as exc:
        resolve_targets(tiny_phi3, preset)
    assert str(exc.value) == (
        f"lora.targets = {preset!r}: architecture 'phi3' cannot express this preset (Phi-3 fuses "
        "Q, K and V in qkv_proj, and gate and up in gate_up_proj); presets it supports: attn, "
        "attn_mlp, all_linear")


@pytest.mark.parametrize("preset, modules", [
    ("attn", {"qkv_proj", "o_proj"}),
    ("attn_mlp", {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),
    ("all_linear", {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),
])
def test_phi3_presets_adapt_the_fused_modules(tiny_phi3, preset, modules):
    model = attach_lora(copy.deepcopy(tiny_phi3), rank=4, alpha=8, dropout=0.0, targets=preset,
                        seed=0)
    adapted = [n.split(".lora_A")[0] for n, _ in model.named_parameters() if "lora_A" in n]
    assert {n.split(".")[-1] for n in adapted} == modules
    assert len(adapted) == 2 * len(modules)  # in each of the 2 layers


def test_phi3_check_architecture_from_its_config(tmp_path):
    transformers.Phi3Config(**PHI3).save_pretrained(tmp_path)
    check_architecture(tmp_path, lora_targets="attn", lora_r=8, ranks=[2, 8],
                       sweep_targets=["attn_mlp"])
    with pytest.raises(ParamsError) as exc:
        check_architecture(tmp_path, lora_targets="qv", lora_r=8, ranks=[2, 8],
                           sweep_targets=["kv", "attn_mlp"])
    assert [p.split(":")[0] for p in exc.value.problems] == ["lora.targets = 'qv'",
                                                             "sweep.targets = 'kv'"]
    assert all("architecture 'phi3' cannot express" in p for p in exc.value.problems)


def test_rank_up_to_the_smallest_adapted_dimension(tiny_gpt2):
    """n_embd = 32 bounds every GPT-2 layer; 32 is allowed, 33 is not."""
    attach_lora(copy.deepcopy(tiny_gpt2), rank=32, alpha=8, dropout=0.0, targets="attn", seed=0)
    with pytest.raises(UserError, match=r"rank 33 \(lora.r / sweep.ranks\) is larger than the "
                                        r"smallest adapted dimension \(32\) of 'attn'"):
        attach_lora(copy.deepcopy(tiny_gpt2), rank=33, alpha=8, dropout=0.0, targets="attn",
                    seed=0)


def test_architecture_problems_reports_every_run_at_once(tiny_gpt2):
    problems = architecture_problems(tiny_gpt2, lora_targets="attn", lora_r=8, ranks=[2, 64],
                                     sweep_targets=["qv", "attn_mlp", "c_fc,c_atn"])
    assert problems == [
        "sweep.ranks contains 64: larger than the smallest dimension (32) of the layers adapted "
        "by 'attn'; a LoRA rank above it adds nothing, use at most 32",
        "sweep.targets = 'qv': architecture 'gpt2' cannot express this preset (GPT-2 fuses "
        "Q, K and V in c_attn); presets it supports: attn, attn_mlp, all_linear",
        "sweep.targets = 'c_fc,c_atn': module name(s) c_atn match no linear layer of this gpt2 "
        "model; its linear layers end in: c_attn, c_fc, c_proj",
    ]
    assert architecture_problems(tiny_gpt2, lora_targets="attn", lora_r=8, ranks=[2, 8],
                                 sweep_targets=["attn_mlp"]) == []


def test_check_architecture_reads_no_weights(tiny_base_dir, tmp_path):
    """The same check from a model directory, built on the meta device (config only)."""
    shutil.copy(tiny_base_dir / "config.json", tmp_path / "config.json")
    check_architecture(tmp_path, lora_targets="qv", lora_r=8, ranks=[2, 8, 32],
                       sweep_targets=["kv", "attn_mlp"])
    with pytest.raises(ParamsError) as exc:
        check_architecture(tmp_path, lora_targets="q_proj,v_prj", lora_r=64, ranks=[2, 8],
                           sweep_targets=["kv"])
    assert [p.split(":")[0] for p in exc.value.problems] == ["lora.targets = 'q_proj,v_prj'",
                                                             "lora.r = 64"]
    assert str(exc.value).startswith(f"params.yaml (against the model in {tmp_path}) has 2 "
                                     "problem(s):")
