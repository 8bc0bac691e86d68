"""The quantize stage's library: known-answer math, storage accounting, save/load round trip."""
from __future__ import annotations

import math

import bitsandbytes.functional as bnbf
import pandas as pd
import pytest
import torch

from qlora_diag.models.quantization.per_module import (
    model_storage,
    quantization_residuals,
    weight_error_table,
)
from qlora_diag.models.quantization.roundtrip import (
    QUANT_CONFIGS,
    cosine,
    double_quantize,
    measured_bits_per_param,
    paper_bits_per_param,
    quant_roundtrip,
    quant_state_bytes,
    relative_frobenius_error,
)
from qlora_diag.models.quantization.save import quantize_and_save
from qlora_diag.models.quantization.summary import quantization_metrics, summary_table
from qlora_diag.models.targets import linear_module_names


def _code(quant_type: str) -> torch.Tensor:
    return bnbf.get_4bit_type(quant_type, device="cpu")


def _representable(quant_type: str, scales: list[float]) -> torch.Tensor:
    """One block of 64 per scale, every value code[i] * scale with +-1 present (absmax =
    scale): exactly representable, so the 4-bit round trip must give it back bit for bit."""
    code = _code(quant_type)
    blocks = []
    gen = torch.Generator().manual_seed(0)
    for s in scales:
        idx = torch.randint(0, 16, (64,), generator=gen)
        idx[0] = int(torch.argmax(code.abs()))
        blocks.append(code[idx] * s)
    return torch.stack(blocks)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_representable_weight_has_zero_error(quant_type):
    w = _representable(quant_type, [2.0 ** -k for k in range(3, 11)])
    w_hat = quant_roundtrip(w, quant_type, double_quant=False)
    assert torch.equal(w_hat, w)
    assert relative_frobenius_error(w, w_hat) == 0.0
    assert cosine(w, w_hat) == pytest.approx(1.0, abs=1e-12)


def test_double_quant_exact_when_all_blocks_share_absmax():
    # absmax - mean(absmax) is all zeros, which 8-bit quantization keeps exactly.
    w = _representable("nf4", [0.25] * 8)
    assert torch.equal(quant_roundtrip(w, "nf4", double_quant=True), w)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_error_scales_with_block_absmax(quant_type):
    # The same Gaussian block repeated at power-of-two scales: blocks are quantized
    # independently, so each block's error is its scale times the same pattern.
    z = torch.randn(64, generator=torch.Generator().manual_seed(1))
    scales = torch.tensor([2.0 ** k for k in range(-6, 2)])
    w = z[None, :] * scales[:, None]
    err = w - quant_roundtrip(w, quant_type, double_quant=False)
    torch.testing.assert_close(err / scales[:, None], err[:1].expand_as(err) / scales[0],
                               rtol=0, atol=0)
    # rounding to the nearest code value: |error| <= absmax * (largest gap between codes) / 2
    code = torch.sort(_code(quant_type)).values
    bound = w.abs().amax(dim=1, keepdim=True) * (code.diff().max() / 2)
    assert (err.abs() <= bound * (1 + 1e-6)).all()


def test_outlier_raises_error_of_its_block_only():
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(2)) * 0.02
    spiked = w.clone()
    spiked[0, 5] = 1.0  # one outlier sets block 0's absmax 50 sigma out
    err_w = (w - quant_roundtrip(w, "nf4", False)).norm(dim=1)
    err_s = (spiked - quant_roundtrip(spiked, "nf4", False)).norm(dim=1)
    assert err_s[0] > 5 * err_w[0]
    torch.testing.assert_close(err_s[1:], err_w[1:], rtol=0, atol=0)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_double_quantize_equals_bitsandbytes(quant_type):
    w = torch.randn(96, 640, generator=torch.Generator().manual_seed(5))  # 960 blocks: 3.75 x 256
    packed, plain = bnbf.quantize_4bit(w, blocksize=64, quant_type=quant_type)
    packed_dq, ref = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True,
                                        quant_type=quant_type)
    assert torch.equal(packed, packed_dq)  # double quantization never touches the 4-bit codes
    mine = double_quantize(plain)
    assert mine == ref and torch.equal(mine.absmax, ref.absmax)
    assert torch.equal(bnbf.dequantize_4bit(packed, mine), bnbf.dequantize_4bit(packed_dq, ref))


def test_cosine_and_relative_error_known_values():
    w = torch.randn(32, 16, generator=torch.Generator().manual_seed(3))
    assert cosine(w, w) == pytest.approx(1.0, abs=1e-12)
    assert cosine(w, -3 * w) == pytest.approx(-1.0, abs=1e-12)
    e1, e2 = torch.zeros(2, 2), torch.zeros(2, 2)
    e1[0, 0], e2[1, 1] = 1.0, 1.0
    assert cosine(e1, e2) == 0.0
    assert relative_frobenius_error(w, w) == 0.0
    assert relative_frobenius_error(w, torch.zeros_like(w)) == pytest.approx(1.0)
    assert relative_frobenius_error(w, 2 * w) == pytest.approx(1.0)
    assert math.isnan(relative_frobenius_error(torch.zeros(3), torch.ones(3)))
    with pytest.raises(ValueError):
        cosine(w, w.t())


@pytest.mark.parametrize("double_quant, paper", [(False, 4.5), (True, 4 + 8 / 64 + 32 / 16384)])
def test_bits_per_param_matches_paper_accounting(double_quant, paper):
    assert paper_bits_per_param(double_quant) == pytest.approx(paper, abs=1e-12)
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(4))  # 16 x 64*256
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=double_quant,
                                       quant_type="nf4")
    parts = quant_state_bytes(packed, state)
    books = parts["quant_map"] + parts.get("nested_quant_map", 0) + parts.get("nested_offset", 0)
    per_param = {k: 8 * v / w.numel() for k, v in parts.items()}
    assert per_param["packed"] == 4.0
    assert per_param["absmax"] == (8 / 64 if double_quant else 32 / 64)
    measured = measured_bits_per_param(w, "nf4", double_quant)
    assert measured - 8 * books / w.numel() == pytest.approx(paper, abs=1e-12)
    assert measured == pytest.approx(paper, abs=0.04)  # code books: 64 B (+1 KiB) per matrix


def test_bits_per_param_counts_partial_blocks():
    # 100 values = 2 blocks of 64: two absmax constants for 100 parameters, not 100/64.
    w = torch.randn(100)
    assert measured_bits_per_param(w, "nf4", False) == pytest.approx(
        (50 * 8 + 2 * 32 + 16 * 32) / 100)


def test_save_load_round_trip(tiny_base_dir, tmp_path):
    from qlora_diag.models.loading import load_base, load_quantized

    out = tmp_path / "quantized"
    info = quantize_and_save(tiny_base_dir, out, quant_type="nf4", double_quant=True,
                             compute_dtype="bfloat16")
    assert (out / "quant_info.json").is_file() and (out / "tokenizer.json").is_file()
    kept = " ".join(info["kept_16bit"])
    assert "model.embed_tokens" in kept and "lm_head" in kept and "input_layernorm" in kept
    assert info["storage"]["shared"] == ["lm_head.weight = model.embed_tokens.weight"]

    base = load_base(tiny_base_dir, "bfloat16")
    model = load_quantized(out, "bfloat16")
    names = linear_module_names(model)
    assert names == linear_module_names(base) and len(names) == 14
    for name in names:
        mod = model.get_submodule(name)
        assert type(mod).__name__ == "Linear4bit"
        state = mod.weight.quant_state
        assert (state.quant_type, state.blocksize, state.nested) == ("nf4", 64, True)
        # the checkpoint holds exactly Q(W) of the 16-bit base weights
        packed, ref = bnbf.quantize_4bit(base.get_submodule(name).weight.float(), blocksize=64,
                                         compress_statistics=True, quant_type="nf4")
        assert torch.equal(mod.weight.data.view(-1), packed.view(-1))
        assert torch.equal(state.absmax, ref.absmax)
        assert torch.equal(state.state2.absmax, ref.state2.absmax)
    assert type(model.lm_head).__name__ == "Linear"
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16

    residuals = quantization_residuals(base, model)
    assert list(residuals) == names
    for name, res in residuals.items():
        w = base.get_submodule(name).weight
        assert res.shape == w.shape and res.dtype == torch.float32
        deq = quant_roundtrip(w, "nf4", double_quant=True).to(torch.bfloat16).float()
        torch.testing.assert_close(res, w.float() - deq, rtol=0, atol=0)

    storage = model_storage(model)
    n_lin = sum(base.get_submodule(n).weight.numel() for n in names)
    assert storage["n_params_quantized"] == n_lin
    assert storage["n_params"] == model_storage(base)["n_params"]
    assert storage["bytes"]["packed_4bit"] == n_lin // 2
    assert storage["bytes"]["linear_16bit"] == 0
    assert model_storage(base)["bytes_per_param"] == 2.0


def test_error_table_rows_and_nf4_beats_fp4(tiny_model):
    df = weight_error_table(tiny_model)
    names = linear_module_names(tiny_model)
    assert len(df) == len(names) * len(QUANT_CONFIGS)
    assert not df.duplicated(["name", "quant_type", "double_quant"]).any()
    assert set(df["module"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                 "down_proj"}
    assert set(df["layer"]) == {0, 1}
    # the tiny model's weights are Gaussian (random init): NF4 is built for that (QLoRA Sec. 3)
    mean = df.groupby("quant_type")["rel_frob_error"].mean()
    assert mean["nf4"] < mean["fp4"]
    nf4 = df[(df.quant_type == "nf4") & ~df.double_quant].set_index("name")
    fp4 = df[(df.quant_type == "fp4") & ~df.double_quant].set_index("name")
    assert (nf4["rel_frob_error"] < fp4["rel_frob_error"]).all()
    assert (df["cosine"] > 0.98).all() and (df["cosine"] < 1).all()


def test_summary_weights_bits_by_parameters_and_picks_the_chosen_config():
    """Two matrices of 100 and 300 parameters under two configurations: errors and cosines are
    plain means over matrices, bits per parameter are taken over all parameters together."""
    rows = [("a", "q_proj", "nf4", False, 100, 0.1, 0.99, 4.5),
            ("b", "v_proj", "nf4", False, 300, 0.3, 0.97, 4.6),
            ("a", "q_proj", "nf4", True, 100, 0.2, 0.98, 4.2),
            ("b", "v_proj", "nf4", True, 300, 0.4, 0.96, 4.1)]
    table = pd.DataFrame([dict(zip(("name", "module", "quant_type", "double_quant", "n_params",
                                    "rel_frob_error", "cosine", "bits_per_param"), r), layer=0)
                          for r in rows])
    per_config = summary_table(table)
    assert list(per_config.index) == ["nf4", "nf4_dq"]
    assert per_config.loc["nf4", "bits_per_param_measured"] == pytest.approx((450 + 1380) / 400)
    assert per_config.loc["nf4_dq", "bits_per_param_measured"] == pytest.approx((420 + 1230) / 400)
    assert per_config.loc["nf4", "rel_frob_error_mean"] == pytest.approx(0.2)
    assert per_config.loc["nf4_dq", "bits_per_param_paper"] == pytest.approx(4.127, abs=1e-3)

    storage = {"bytes": {"packed_4bit": 2**20}, "total_bytes": 2**21, "n_params": 400,
               "bytes_per_param": 0.6, "quantized_bytes_per_param": 0.55,
               "n_params_quantized": 400, "shared": ["x = y"]}
    m = quantization_metrics(table, {**storage, "bytes_per_param": 2.0}, storage,
                             quant_type="nf4", double_quant=True)
    assert m["rel_frob_error_mean"] == pytest.approx(0.3)  # the chosen nf4_dq, not nf4
    assert m["cosine_mean"] == pytest.approx(0.97)
    assert m["bits_per_param_measured"] == pytest.approx(1650 / 400)
    assert m["weights_mb_4bit"] == 2.0 and m["mb_4bit_by_category"] == {"packed_4bit": 1.0}
    assert m["bytes_per_param_16bit_model"] == 2.0 and m["shared_tensors"] == "x = y"
    assert m["configs"]["nf4"]["modules"]["v_proj"] == {"rel_frob_error_mean": 0.3,
                                                       "cosine_mean": 0.97}


def test_residual_is_taken_on_the_4bit_layers_device(tiny_model, monkeypatch):
    """Issue 15: on a GPU host the 4-bit model sits on cuda:0 while the 16-bit W of compare's
    base is on the CPU, and W − deq(Q(W)) mixed the two. Here the dequantized weight is put on
    the ``meta`` device (arithmetic between meta and CPU tensors raises, as CUDA and CPU do):
    the residual must be formed on the 4-bit layer's device, and only when it is looked up."""
    from qlora_diag.models.quantization import per_module

    looked_up = []

    def on_meta(module):
        looked_up.append(module)
        return torch.zeros(module.out_features, module.in_features, device="meta")

    class Fake4bit(torch.nn.Linear):  # named like bitsandbytes' class, as the code selects it
        pass

    Fake4bit.__name__ = "Linear4bit"
    quant = torch.nn.Module()
    quant.add_module("q_proj", Fake4bit(64, 64, bias=False, device="meta"))
    base = torch.nn.Module()
    base.add_module("q_proj", tiny_model.model.layers[0].self_attn.q_proj)
    monkeypatch.setattr(per_module, "dequantized_weight", on_meta)
    lazy = per_module.QuantizationResiduals(base, quant)
    assert "q_proj" in lazy and len(lazy) == 1 and not looked_up
    res = lazy["q_proj"]
    assert res.device.type == "meta" and res.shape == (64, 64) and res.dtype == torch.float32
    assert len(looked_up) == 1
