"""The headline pair per adapted module: ``reports/layers.csv`` joins the weight comparison of
the two adapters (:func:`~qlora_diag.compare.adapters.compare_adapters`), how the QLoRA update
relates to the quantization error W − deq(Q(W)) of its module
(:func:`~qlora_diag.compare.adapters.quantization_alignment`) and that module's relative
quantization error from the quantize stage's table.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from qlora_diag.compare.adapters import load_adapter_factors, quantization_alignment
from qlora_diag.core.errors import UserError
from qlora_diag.core.schemas import LAYERS_COLUMNS, QUANTIZATION_COLUMNS
from qlora_diag.models.quantization.per_module import QuantizationResiduals


def _module_subset(model: torch.nn.Module, names: list[str]) -> torch.nn.Module:
    """A container whose ``named_modules()`` yields ``names`` under their full names, sharing
    (not copying) the modules: only the adapted ones' residuals are what alignment needs."""
    root = torch.nn.Module()
    for name in names:
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            child = dict(parent.named_children()).get(part)
            if child is None:
                child = torch.nn.Module()
                parent.add_module(part, child)
            parent = child
        parent.add_module(leaf, model.get_submodule(name))
    return root


def load_quant_errors(path: Path, quant_type: str, double_quant: bool) -> pd.Series:
    """``{module full name: rel_frob_error}`` of the configured quantization, from the
    quantize stage's table (``reports/quantization.csv``)."""
    if not path.is_file():
        raise UserError(f"{path}: quantization error table not found; it is written by the "
                        "stage `quantize`: run `dvc repro quantize`")
    table = pd.read_csv(path)
    missing = [c for c in QUANTIZATION_COLUMNS if c not in table.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)}; re-create it with "
                        "`dvc repro -f quantize`")
    rows = table[(table["quant_type"] == quant_type)
                 & (table["double_quant"].astype(str).str.lower() == str(double_quant).lower())]
    if rows.empty:
        raise UserError(f"{path}: no rows for quant.type = {quant_type}, quant.double_quant = "
                        f"{double_quant}; re-create it with `dvc repro -f quantize`")
    return rows.set_index("name")["rel_frob_error"]


def layer_table(compare: pd.DataFrame, align: pd.DataFrame, quant_errors: pd.Series,
                source: Path) -> pd.DataFrame:
    """``reports/layers.csv`` of the headline pair: :func:`compare_adapters` (QLoRA as ``a``,
    LoRA as reference ``b``) joined with :func:`quantization_alignment` and the module's
    quantization error ‖W − deq(Q(W))‖_F / ‖W‖_F of the configured quant type."""
    lacking = [n for n in compare["name"] if n not in quant_errors.index]
    if lacking:
        raise UserError(f"{source}: no quantization error for adapted module(s) "
                        f"{', '.join(lacking[:3])}; re-create it with `dvc repro -f quantize`")
    t = compare.merge(align.drop(columns=["layer", "module"]), on="name", validate="one_to_one")
    t = t.rename(columns={"norm_a": "norm_qlora", "norm_b": "norm_lora"})
    t["quant_rel_error"] = [float(quant_errors[n]) for n in t["name"]]
    return t[list(LAYERS_COLUMNS)]


def headline_layers(base, quant, lora_dir: Path, qlora_dir: Path, compare: pd.DataFrame,
                    quant_errors: pd.Series, quant_csv: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(``layers.csv``, the :func:`quantization_alignment` table) of the headline pair, with the
    residuals W − deq(Q(W)) of the adapted modules of the two loaded bases.

    Must run before any forward pass of ``quant``: on AVX512-BF16 CPUs bitsandbytes repacks
    4-bit weights in place on the first no-grad forward, after which they no longer dequantize
    exactly (:func:`~qlora_diag.models.quantization.per_module.dequantized_weight` refuses them).
    """
    f_lora, f_qlora = load_adapter_factors(lora_dir), load_adapter_factors(qlora_dir)
    names = list(f_lora)
    # computed module by module as the alignment reaches it, on the 4-bit model's device
    residuals = QuantizationResiduals(_module_subset(base, names), _module_subset(quant, names))
    align = quantization_alignment(f_lora, f_qlora, residuals)
    return layer_table(compare, align, quant_errors, quant_csv), align
