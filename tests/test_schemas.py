"""The file schemas of qlora_diag.core.schemas against what the writers of other stages write.

The compare stage builds its tables from the schema (tests/test_comparison.py checks its files);
the quantize, prepare and train stages write their own dicts and tables, so their outputs are
checked here: the committed reference run's files, and the writers themselves on the tiny model
(run.json needs a training run: tests/test_pipeline_e2e.py checks it).
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from qlora_diag.core import schemas

REPO = Path(__file__).resolve().parents[1]
REPORTS = REPO / "reports"


def columns(path: Path) -> list[str]:
    return list(pd.read_csv(path, nrows=1).columns)


def keys(path: Path) -> list[str]:
    return list(json.loads(path.read_text()))


@pytest.mark.parametrize("file, schema", [
    ("quantization.csv", schemas.QUANTIZATION_COLUMNS), ("ranks.csv", schemas.RANKS_COLUMNS),
    ("modules.csv", schemas.MODULES_COLUMNS), ("layers.csv", schemas.LAYERS_COLUMNS),
    ("compare/pairs.csv", schemas.PAIRS_COLUMNS), ("compare/function.csv", schemas.FUNCTION_COLUMNS),
    ("compare/per_task.csv", schemas.PER_TASK_COLUMNS), ("compare/seeds.csv", schemas.SEEDS_COLUMNS),
])
def test_reference_tables_have_the_schema_columns_in_order(file, schema):
    assert columns(REPORTS / file) == list(schema)


@pytest.mark.parametrize("file, schema", [
    ("data.json", schemas.DATA_KEYS), ("quantization.json", schemas.QUANTIZATION_KEYS),
    ("metrics.json", schemas.METRICS_KEYS), ("compare/headline.json", schemas.HEADLINE_KEYS),
    ("compare/setup.json", schemas.SETUP_KEYS),
])
def test_reference_json_files_have_the_schema_keys_in_order(file, schema):
    assert keys(REPORTS / file) == list(schema)


def test_reference_verdicts_have_the_schema_keys():
    verdicts = json.loads((REPORTS / "verdicts.json").read_text())
    assert list(verdicts) == list(schemas.VERDICTS_KEYS)
    for h in ("h1", "h2", "h3"):
        assert list(verdicts[h]) == list(schemas.VERDICT_KEYS), h
        if verdicts[h]["interval"] is not None:
            assert list(verdicts[h]["interval"]) == list(schemas.VERDICT_INTERVAL_KEYS), h


def test_reference_nested_keys_and_generations():
    data = json.loads((REPORTS / "data.json").read_text())
    assert list(data["splits"]) == list(schemas.DATA_SPLITS)
    for split in schemas.DATA_SPLITS:
        assert list(data["splits"][split]) == list(schemas.DATA_SPLIT_KEYS)
    setup = json.loads((REPORTS / "compare/setup.json").read_text())
    for key, inner in schemas.SETUP_NESTED_KEYS.items():
        assert set(inner) <= set(setup[key]), key
    quant = json.loads((REPORTS / "quantization.json").read_text())
    assert list(quant["configs"]) == list(schemas.QUANT_CONFIG_KEYS)
    cases = sorted(p.stem for p in (REPORTS / "compare/generations").glob("*.jsonl"))
    assert cases == sorted((*schemas.BASE_CASES, *schemas.TRANSFER_CASES))
    for case in cases:
        for line in (REPORTS / "compare/generations" / f"{case}.jsonl").read_text().splitlines():
            assert list(json.loads(line)) == list(schemas.GENERATION_KEYS), case


def test_metrics_and_headline_split_every_number_once():
    both = (*schemas.METRICS_KEYS, *schemas.HEADLINE_KEYS)
    assert len(both) == len(set(both)) == 68
    # SPEC.md's headline metrics are all DVC metrics
    spec = {"eval_loss_lora", "eval_loss_qlora", "eval_loss_gap", "exact_match_lora",
            "exact_match_qlora", "token_match_rate", "cos_sim_mean", "subspace_sim_mean",
            "noise_floor_cos_sim", "peak_mem_mb_lora", "peak_mem_mb_qlora", "weights_mb_lora",
            "weights_mb_qlora", "step_time_ratio"}
    assert set(schemas.METRICS_KEYS) == spec | {"n_seeds"}
    numbers = {k: float(i) for i, k in enumerate(reversed(both))}
    metrics, headline = schemas.split_headline(numbers)
    assert list(metrics) == list(schemas.METRICS_KEYS)
    assert list(headline) == list(schemas.HEADLINE_KEYS)
    assert metrics | headline == numbers
    with pytest.raises(ValueError, match="not in the schema.*kl_mean_typo"):
        schemas.split_headline(numbers | {"kl_mean_typo": 1.0})
    del numbers["kl_mean"]
    with pytest.raises(ValueError, match=r"missing \['kl_mean'\]"):
        schemas.split_headline(numbers)


def test_quant_config_keys_are_the_quantize_stage_labels():
    from qlora_diag.models.quantization.summary import config_label

    for quant_type in ("nf4", "fp4"):
        for double_quant in (False, True):
            assert (schemas.quant_config_key(quant_type, double_quant)
                    == config_label(quant_type, double_quant))
    assert schemas.quant_config_key("fp4", True) == "fp4_dq"
    assert schemas.quant_config_key("nf4", False) == "nf4"


def test_quantize_table_has_the_schema_columns(tiny_base_dir):
    from qlora_diag.models.loading import load_base
    from qlora_diag.models.quantization.per_module import weight_error_table

    table = weight_error_table(load_base(tiny_base_dir, "float32"))
    assert list(table.columns) == list(schemas.QUANTIZATION_COLUMNS)


def test_prepare_stats_and_generation_records_have_the_schema_keys(tiny_tokenizer, tmp_path):
    from qlora_diag.data.splits import load_split, prepare_dataset
    from qlora_diag.train.generation import generation_records

    stats = prepare_dataset(source="embedded:probe", n_train=4, n_eval=4, max_length=96, seed=1,
                            tokenizer=tiny_tokenizer, out_dir=tmp_path / "prepared")
    assert list(stats) == list(schemas.DATA_STATS_KEYS)
    assert list(stats["splits"]) == list(schemas.DATA_SPLITS)
    assert all(list(s) == list(schemas.DATA_SPLIT_KEYS) for s in stats["splits"].values())
    records = load_split(tmp_path / "prepared" / "eval.jsonl")
    rows = generation_records(records[:2], [[5, 6], []], tiny_tokenizer)
    assert [list(r) for r in rows] == [list(schemas.GENERATION_KEYS)] * 2
