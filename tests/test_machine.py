"""Device and dtype decisions for machines this one is not: patched CUDA facts."""
from __future__ import annotations

import pytest
import torch

from qlora_diag.core import machine
from qlora_diag.core.errors import UserError


@pytest.mark.parametrize("capability, native", [
    ((7, 0), False),   # V100: bf16 only emulated
    ((7, 5), False),   # T4
    ((8, 0), True),    # A100
    ((8, 6), True),    # RTX 30xx / A10
    ((9, 0), True),    # H100
    (None, False),
])
def test_cuda_bf16_is_native_from_ampere_on(capability, native):
    assert machine.has_fast_bf16("cuda", set(), capability) is native


@pytest.mark.parametrize("flags, native", [
    ({"avx2"}, False), ({"avx2", "avx512_bf16"}, True), ({"amx_bf16"}, True), (set(), False)])
def test_cpu_bf16_needs_avx512_bf16_or_amx(flags, native):
    assert machine.has_fast_bf16("cpu", flags, None) is native


def _fake_gpu(monkeypatch, *, capability=(7, 5), count=1, bf16_supported=True):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    # what torch reports on a T4 (emulation counts as support): must not decide
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_supported)


def test_auto_dtype_on_a_pre_ampere_gpu_is_float32_although_torch_reports_bf16_support(monkeypatch):
    _fake_gpu(monkeypatch, capability=(7, 5), bf16_supported=True)
    assert machine.resolve_dtype("auto") == "float32"
    _fake_gpu(monkeypatch, capability=(8, 0))
    assert machine.resolve_dtype("auto") == "bfloat16"
    assert machine.resolve_dtype("float16") == "float16"  # an explicit choice passes through


def test_one_visible_gpu_is_used_as_cuda_0(monkeypatch):
    _fake_gpu(monkeypatch, count=1)
    assert machine.choose_device() == torch.device("cuda:0")


def test_several_visible_gpus_are_refused_with_the_variable_to_set(monkeypatch):
    _fake_gpu(monkeypatch, count=4)
    with pytest.raises(UserError) as err:
        machine.choose_device()
    msg = str(err.value)
    assert "4 GPUs are visible" in msg and "CUDA_VISIBLE_DEVICES=0" in msg


def test_no_gpu_means_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert machine.choose_device() == torch.device("cpu")
