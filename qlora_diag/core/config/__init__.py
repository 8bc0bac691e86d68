"""Typed parameters: ``params.yaml`` -> dataclasses that reject unknown, missing or bad keys.

Every knob lives in ``params.yaml``; nothing is defaulted here. The package, by concern:

- :mod:`.choices`: the valid values of the enumerated keys, and the embedded models' facts;
- :mod:`.params`: the dataclasses, one per section, a docstring per field;
- :mod:`.checks`: checks of single values and the "did you mean" hints of their messages;
- :mod:`.relations`: checks between keys, each rule defined once;
- :mod:`.load`: reading the file (as DVC reads it), type checks, building :class:`Params`.

Callers import from here: ``from qlora_diag.core.config import Params, load_params``.
"""
from qlora_diag.core.config.choices import (
    DTYPES,
    EMBEDDED_DATA,
    EMBEDDED_MODELS,
    MAX_SEED,
    OPTIMIZERS,
    PRESETS,
    QUANT_TYPES,
    SCHEDULERS,
    SETTING_SEED_SLOTS,
    SMOLLM2,
    SMOLLM2_GGUF,
    SMOLLM2_WHEEL,
    TINY_LLAMA,
)
from qlora_diag.core.config.load import load_params, params_from_dict
from qlora_diag.core.config.params import (
    BaseCfg,
    BenchCfg,
    CompareCfg,
    DataCfg,
    LoraCfg,
    Params,
    QuantCfg,
    SweepCfg,
    TrainCfg,
    headline_seeds,
    setting_seeds,
)
from qlora_diag.core.config.relations import require_eval_examples
from qlora_diag.core.run_names import run_name

__all__ = [
    "DTYPES", "EMBEDDED_DATA", "EMBEDDED_MODELS", "MAX_SEED", "OPTIMIZERS", "PRESETS",
    "QUANT_TYPES", "SCHEDULERS", "SETTING_SEED_SLOTS", "SMOLLM2", "SMOLLM2_GGUF", "SMOLLM2_WHEEL",
    "TINY_LLAMA", "BaseCfg", "BenchCfg", "CompareCfg", "DataCfg", "LoraCfg", "Params", "QuantCfg",
    "SweepCfg", "TrainCfg", "headline_seeds", "load_params", "params_from_dict",
    "require_eval_examples", "run_name", "setting_seeds",
]
