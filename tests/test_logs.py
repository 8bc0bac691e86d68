"""The known-harmless library messages are silenced at their source; everything else still shows."""
from __future__ import annotations

import subprocess
import sys

SCRIPT = r"""
import logging, warnings
from qlora_diag.core.logs import quiet_known_library_noise
quiet_known_library_noise()
import bitsandbytes  # on AVX512-BF16 CPUs this import logs the kernels-community message
import torch
from transformers import LlamaConfig, LlamaForCausalLM
log = logging.getLogger("bitsandbytes.backends.cpu.ops")
log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'.")
log.warning("another bitsandbytes warning")
model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                     num_hidden_layers=1, num_attention_heads=2))
model.is_gradient_checkpointing  # the deprecated property transformers' Trainer reads
warnings.warn("another FutureWarning", FutureWarning)
"""


def test_known_noise_is_dropped_and_other_messages_show():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "kernels-community" not in out
    assert "is_gradient_checkpointing" not in out
    assert "another bitsandbytes warning" in out
    assert "another FutureWarning" in out


def test_without_the_filters_the_messages_appear():
    """Control: the same script minus the call prints both messages (so the test above can fail)."""
    script = SCRIPT.replace("quiet_known_library_noise()\n", "")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "Failed to load CPU gemm_4bit_forward from kernels-community" in out
    assert "is_gradient_checkpointing` is deprecated" in out
