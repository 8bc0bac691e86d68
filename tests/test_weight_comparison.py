"""qlora_diag.compare.adapters on real PEFT adapters of a tiny in-process Llama."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from qlora_diag.compare import similarity as sim
from qlora_diag.compare.adapters import (
    ALIGNMENT_COLUMNS,
    COMPARE_COLUMNS,
    Factor,
    compare_adapters,
    load_adapter_factors,
    quantization_alignment,
    summarize_adapter_comparison,
)
from qlora_diag.core.errors import UserError

N_LAYERS = 3


def _peft_model(seed: int, use_rslora: bool = False):
    import peft
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=N_LAYERS, num_attention_heads=4,
                                   num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(cfg)
    # init_lora_weights=False: random A and B, so ΔW != 0 as after training
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                           init_lora_weights=False, use_rslora=use_rslora)
    return peft.get_peft_model(model, lcfg)


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("adapter") / "a"
    pm = _peft_model(seed=0, use_rslora=True)
    pm.save_pretrained(out)
    return out, pm


def _copy_adapter(src: Path, dst: Path, config_edit=None, tensors_edit=None) -> Path:
    dst.mkdir(parents=True)
    cfg = json.loads((src / "adapter_config.json").read_text())
    if config_edit:
        config_edit(cfg)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(src / "adapter_model.safetensors"))
    if tensors_edit:
        tensors_edit(tensors)
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    return dst


def test_load_matches_peft_weights_and_merged_delta(saved_adapter):
    path, pm = saved_adapter
    factors = load_adapter_factors(path)
    expected = [f"model.layers.{i}.self_attn.{m}" for i in range(N_LAYERS)
                for m in ("q_proj", "v_proj")]
    assert list(factors) == expected
    modules = dict(pm.base_model.model.named_modules())
    for name, f in factors.items():
        layer = modules[name]
        assert f.scale == layer.scaling["default"] == 8 / math.sqrt(4)  # rsLoRA
        torch.testing.assert_close(f.A, layer.lora_A["default"].weight.double())
        torch.testing.assert_close(f.B, layer.lora_B["default"].weight.double())
        with torch.no_grad():
            peft_delta = layer.get_delta_weight("default")
        torch.testing.assert_close(f.delta(), peft_delta.double(), rtol=1e-5, atol=1e-6)
        assert f.shape == tuple(layer.base_layer.weight.shape)


def test_load_plain_lora_scale(tmp_path):
    pm = _peft_model(seed=1, use_rslora=False)
    pm.save_pretrained(tmp_path / "plain")
    f = next(iter(load_adapter_factors(tmp_path / "plain").values()))
    assert f.scale == 8 / 4


def test_load_errors_name_the_file(saved_adapter, tmp_path):
    path, _ = saved_adapter
    with pytest.raises(UserError, match="adapter_config.json"):
        load_adapter_factors(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    with pytest.raises(UserError, match=r"broken/adapter_config.json.*not valid JSON"):
        load_adapter_factors(broken)
    no_alpha = _copy_adapter(path, tmp_path / "no_alpha", config_edit=lambda c: c.pop("lora_alpha"))
    with pytest.raises(UserError, match="lora_alpha"):
        load_adapter_factors(no_alpha)
    dora = _copy_adapter(path, tmp_path / "dora", config_edit=lambda c: c.update(use_dora=True))
    with pytest.raises(UserError, match="DoRA"):
        load_adapter_factors(dora)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "adapter_config.json").write_text((path / "adapter_config.json").read_text())
    with pytest.raises(UserError, match="adapter_model.safetensors"):
        load_adapter_factors(no_weights)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    half = _copy_adapter(path, tmp_path / "half", tensors_edit=lambda t: t.pop(key))
    with pytest.raises(UserError, match="layers.0.self_attn.q_proj has no lora_B"):
        load_adapter_factors(half)


def test_compare_identical_and_rotated_adapters(saved_adapter):
    factors = load_adapter_factors(saved_adapter[0])
    df = compare_adapters(factors, factors, k=2)
    assert list(df.columns) == COMPARE_COLUMNS
    assert len(df) == 2 * N_LAYERS
    assert df["layer"].tolist() == [0, 0, 1, 1, 2, 2]
    assert df["module"].tolist() == ["q_proj", "v_proj"] * N_LAYERS
    assert df["cos_sim"].tolist() == pytest.approx([1.0] * len(df))
    assert (df["rel_frob"] < 1e-12).all() and (df["frob_dist"] < 1e-12).all()
    assert df["subspace_sim"].tolist() == pytest.approx([1.0] * len(df))
    torch.testing.assert_close(torch.tensor(df["norm_a"].values), torch.tensor(df["norm_b"].values))

    g = torch.Generator().manual_seed(0)
    rotated = {}
    for name, f in factors.items():
        R = torch.randn(f.rank, f.rank, generator=g, dtype=torch.float64) + 3 * torch.eye(f.rank)
        rotated[name] = Factor(torch.linalg.solve(R, f.A), f.B @ R, f.scale)
    df_rot = compare_adapters(rotated, factors, k=2)
    assert df_rot["cos_sim"].tolist() == pytest.approx([1.0] * len(df))
    assert (df_rot["rel_frob"] < 1e-10).all()
    assert df_rot["subspace_sim"].tolist() == pytest.approx([1.0] * len(df))


def test_compare_negated_scaled_and_orthogonal():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(4, 20, generator=g, dtype=torch.float64)
    B = torch.randn(30, 4, generator=g, dtype=torch.float64)
    B_orth = torch.zeros(30, 4, dtype=torch.float64)
    B_top = torch.zeros(30, 4, dtype=torch.float64)
    B_top[:4], B_orth[-4:] = torch.eye(4), torch.eye(4)
    a = {"model.layers.0.mlp.up_proj": Factor(A, B, 2.0),
         "model.layers.1.mlp.up_proj": Factor(A, B_top, 2.0)}
    b = {"model.layers.0.mlp.up_proj": Factor(A, -B, 0.5),
         "model.layers.1.mlp.up_proj": Factor(A, B_orth, 2.0)}
    df = compare_adapters(a, b, k=4).set_index("layer")
    assert df.loc[0, "cos_sim"] == pytest.approx(-1.0)
    assert df.loc[0, "rel_frob"] == pytest.approx(5.0)  # ‖2X + 0.5X‖ / ‖0.5X‖
    assert df.loc[0, "subspace_sim"] == pytest.approx(1.0)  # sign does not change a subspace
    assert df.loc[0, "norm_a"] == pytest.approx(4 * df.loc[0, "norm_b"])
    # column spaces orthogonal, row spaces identical (same A)
    assert df.loc[1, "cos_sim"] == 0.0
    assert df.loc[1, "subspace_sim_left"] == pytest.approx(0.0, abs=1e-15)
    assert df.loc[1, "subspace_sim_right"] == pytest.approx(1.0)
    assert df.loc[1, "subspace_sim"] == pytest.approx(0.5)
    scaled = compare_adapters(a, {n: Factor(f.A, f.B, 7 * f.scale) for n, f in a.items()}, k=4)
    assert scaled["cos_sim"].tolist() == pytest.approx([1.0, 1.0])
    assert scaled["rel_frob"].tolist() == pytest.approx([6 / 7, 6 / 7])


def test_compare_zero_update_gives_nan_not_crash():
    A = torch.randn(2, 8, dtype=torch.float64)
    a = {"model.layers.0.self_attn.q_proj": Factor(A, torch.zeros(6, 2, dtype=torch.float64), 2.0)}
    b = {"model.layers.0.self_attn.q_proj": Factor(A, torch.randn(6, 2, dtype=torch.float64), 2.0)}
    row = compare_adapters(a, b, k=2).iloc[0]
    assert math.isnan(row["cos_sim"]) and math.isnan(row["subspace_sim"])
    assert row["rel_frob"] == pytest.approx(1.0)
    assert math.isnan(summarize_adapter_comparison(compare_adapters(a, b, k=2))["cos_sim_mean"])


def test_compare_rejects_mismatched_modules_and_bad_k(saved_adapter):
    factors = load_adapter_factors(saved_adapter[0])
    fewer = {n: f for n, f in factors.items() if "v_proj" not in n}
    with pytest.raises(UserError, match=r"only in adapter a: model\.layers\.0\.self_attn\.v_proj"):
        compare_adapters(factors, fewer, k=2)
    with pytest.raises(UserError, match="k = 5 exceeds"):
        compare_adapters(factors, factors, k=5)
    with pytest.raises(UserError, match="positive integer"):
        compare_adapters(factors, factors, k=0)


def test_two_seeds_compare_as_different(saved_adapter, tmp_path):
    _peft_model(seed=3, use_rslora=True).save_pretrained(tmp_path / "other")
    df = compare_adapters(load_adapter_factors(saved_adapter[0]),
                          load_adapter_factors(tmp_path / "other"), k=2)
    assert (df["cos_sim"].abs() < 0.9).all()
    assert ((df["subspace_sim"] >= 0) & (df["subspace_sim"] <= 1)).all()


def test_quantization_alignment_known_answers():
    g = torch.Generator().manual_seed(2)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    lora = {n: Factor(torch.randn(2, 12, generator=g, dtype=torch.float64),
                      torch.randn(10, 2, generator=g, dtype=torch.float64), 2.0) for n in names}
    # QLoRA adds a rank-1 correction c·residual, with residual itself rank 1 so that a rank-3
    # adapter [B, c·u][A; v^T] can represent ΔW_LoRA + c·residual exactly.
    residuals, qlora = {}, {}
    for n, c in zip(names, (0.7, -0.2)):
        u = torch.randn(10, 1, generator=g, dtype=torch.float64)
        v = torch.randn(12, 1, generator=g, dtype=torch.float64)
        residuals[n] = (u @ v.T).float()
        f = lora[n]
        qlora[n] = Factor(torch.cat([f.A, v.T]), torch.cat([f.B, c * u / f.scale], dim=1), f.scale)
    residuals["model.layers.0.mlp.up_proj"] = torch.randn(3, 3)  # extra modules are ignored
    df = quantization_alignment(lora, qlora, residuals)
    assert list(df.columns) == ALIGNMENT_COLUMNS
    assert df["alignment"].tolist() == pytest.approx([1.0, -1.0], rel=1e-6)
    assert df["alignment_ceiling"].tolist() == pytest.approx([1.0, 1.0])
    for _, row in df.iterrows():
        d_l, d_q = lora[row["name"]].delta(), qlora[row["name"]].delta()
        res = residuals[row["name"]]
        assert row["norm_delta_lora"] == pytest.approx(torch.linalg.matrix_norm(d_l).item())
        assert row["norm_delta_qlora"] == pytest.approx(torch.linalg.matrix_norm(d_q).item())
        assert row["norm_residual"] == pytest.approx(torch.linalg.matrix_norm(res.double()).item())
        assert row["alignment_qlora"] == pytest.approx(sim.cosine(d_q, res))


def test_alignment_ceiling_is_at_rank_r_lora_plus_r_qlora_with_chance_beside_it():
    """Known answer: residual diag(4, 3, 2, 1); rank-1 adapters ΔW_QLoRA = 4·e1e1ᵀ and
    ΔW_LoRA = −3·e2e2ᵀ give the correction diag(4, 3, 0, 0), of rank 2 = r_LoRA + r_QLoRA, whose
    cosine with the residual is 25 / (5·sqrt(30)) = sqrt(25/30): the rank-2 ceiling, above the
    rank-1 value 4/sqrt(30) a rank-r ceiling would claim as the best possible. Chance level:
    1/sqrt(4·4)."""
    e = torch.eye(4, dtype=torch.float64)
    name = "model.layers.0.self_attn.q_proj"
    qlora = {name: Factor(e[:1], 4.0 * e[:, :1], 1.0)}
    lora = {name: Factor(e[1:2], -3.0 * e[:, 1:2], 1.0)}
    row = quantization_alignment(lora, qlora, {name: torch.diag(torch.tensor([4., 3., 2., 1.]))}
                                 ).iloc[0]
    assert row["alignment"] == pytest.approx(math.sqrt(25 / 30))
    assert row["alignment_ceiling"] == pytest.approx(math.sqrt(25 / 30))
    assert row["alignment"] > 4 / math.sqrt(30)
    assert row["alignment_chance"] == pytest.approx(0.25)
    # The ceiling's rank never exceeds the matrix: two rank-3 adapters of a 4×4 module -> 1.
    big = {name: Factor(e[:3], e[:, :3], 1.0)}
    assert quantization_alignment(big, big, {name: torch.diag(torch.tensor([4., 3., 2., 1.]))}
                                  ).iloc[0]["alignment_ceiling"] == pytest.approx(1.0)


def test_quantization_alignment_errors():
    f = Factor(torch.randn(2, 12, dtype=torch.float64), torch.randn(10, 2, dtype=torch.float64),
               1.0)
    name = "model.layers.0.self_attn.q_proj"
    with pytest.raises(UserError, match="no quantization residual"):
        quantization_alignment({name: f}, {name: f}, {})
    with pytest.raises(UserError, match="transposed"):
        quantization_alignment({name: f}, {name: f}, {name: torch.randn(12, 10)})
    with pytest.raises(UserError, match="only in the QLoRA adapter"):
        quantization_alignment({}, {name: f}, {name: torch.randn(10, 12)})


def test_summarize():
    df = pd.DataFrame({"cos_sim": [0.2, 0.4, 0.9], "rel_frob": [1.0, 2.0, 6.0],
                       "subspace_sim": [0.1, 0.1, 0.4]})
    s = summarize_adapter_comparison(df)
    assert s["n_modules"] == 3
    assert s["cos_sim_mean"] == pytest.approx(0.5)
    assert s["cos_sim_median"] == pytest.approx(0.4)
    assert s["cos_sim_min"] == pytest.approx(0.2)
    assert s["rel_frob_max"] == pytest.approx(6.0)
    assert s["subspace_sim_mean"] == pytest.approx(0.2)
    assert all(isinstance(v, (int, float)) for v in s.values())
    with pytest.raises(ValueError):
        summarize_adapter_comparison(df.drop(columns="subspace_sim"))
