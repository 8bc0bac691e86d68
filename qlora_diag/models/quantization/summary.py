"""The ``quantize`` stage's metrics (``reports/quantization.json``): one row per configuration of
the error table, and the chosen configuration's headline numbers next to the paper's and the
commonly quoted ones."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from qlora_diag.models.quantization.per_module import QUOTED_BYTES_PER_PARAM_QLORA
from qlora_diag.models.quantization.roundtrip import BLOCKSIZE, paper_bits_per_param


def config_label(quant_type: str, double_quant: bool) -> str:
    """``nf4``, ``nf4_dq``, ``fp4``, ``fp4_dq``: the metric-key name of one configuration."""
    return f"{quant_type}_dq" if double_quant else quant_type


def _with_config(table: pd.DataFrame) -> pd.DataFrame:
    return table.assign(config=[config_label(t, bool(d)) for t, d in
                                zip(table["quant_type"], table["double_quant"])])


def summary_table(table: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration of a :func:`weight_error_table`: mean relative error and cosine
    over matrices, and bits per parameter over all matrices together (measured and paper)."""
    rows = []
    for label, g in _with_config(table).groupby("config", sort=False):
        stored_bits = (g["bits_per_param"] * g["n_params"]).sum()
        rows.append({"config": label,
                     "rel_frob_error_mean": g["rel_frob_error"].mean(),
                     "cosine_mean": g["cosine"].mean(),
                     "bits_per_param_measured": stored_bits / g["n_params"].sum(),
                     "bits_per_param_paper": paper_bits_per_param(bool(g["double_quant"].iloc[0]))})
    return pd.DataFrame(rows).set_index("config")


def quantization_metrics(table: pd.DataFrame, storage_16bit: dict, storage_4bit: dict,
                         quant_type: str, double_quant: bool) -> dict:
    """The ``reports/quantization.json`` metrics: the chosen configuration's headline numbers,
    storage of the 16-bit and the saved 4-bit model (MB = 2**20 bytes), and per configuration
    the mean error and cosine overall and per module type."""
    per_config = summary_table(table)
    chosen = per_config.loc[config_label(quant_type, double_quant)]
    configs = {}
    for label, g in _with_config(table).groupby("config", sort=False):
        by_module = g.groupby("module", sort=False)[["rel_frob_error", "cosine"]].mean()
        configs[label] = {**{k: float(v) for k, v in per_config.loc[label].items()},
                          "modules": {m: {"rel_frob_error_mean": float(r["rel_frob_error"]),
                                          "cosine_mean": float(r["cosine"])}
                                      for m, r in by_module.iterrows()}}
    return {
        "quant_type": quant_type, "double_quant": double_quant, "blocksize": BLOCKSIZE,
        "rel_frob_error_mean": float(chosen["rel_frob_error_mean"]),
        "cosine_mean": float(chosen["cosine_mean"]),
        "bits_per_param_measured": float(chosen["bits_per_param_measured"]),
        "bits_per_param_paper": float(chosen["bits_per_param_paper"]),
        "bytes_per_param_model": storage_4bit["bytes_per_param"],
        "bytes_per_param_quantized_linear": storage_4bit["quantized_bytes_per_param"],
        "bytes_per_param_quoted_qlora": QUOTED_BYTES_PER_PARAM_QLORA,
        "bytes_per_param_16bit_model": storage_16bit["bytes_per_param"],
        "weights_mb_16bit": storage_16bit["total_bytes"] / 2**20,
        "weights_mb_4bit": storage_4bit["total_bytes"] / 2**20,
        "mb_4bit_by_category": {k: v / 2**20 for k, v in storage_4bit["bytes"].items()},
        "n_params": storage_16bit["n_params"],
        "n_params_quantized": storage_4bit["n_params_quantized"],
        "shared_tensors": "; ".join(storage_4bit["shared"]),
        "configs": configs,
    }


def dir_size_mb(path: str | Path) -> float:
    """Size on disk of the files under ``path`` in MB (2**20 bytes)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20
