"""Benchmark: the pure pieces against known answers, and one tiny end-to-end run_bench.

No timing is asserted anywhere: speed targets are the benchmark's verdicts (bench.json
``goals``), never the tests'.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from qlora_diag.core.config import BenchCfg, load_params
from qlora_diag.core.errors import UserError
from qlora_diag.tools.bench.measures import (
    GOALS,
    goal_status,
    matmul_params,
    median_rate,
    paired_ratio,
    paired_roofline,
    roofline_fraction,
    rotated,
    train_flops_per_token,
)
from qlora_diag.tools.bench.run import check_inputs, format_table, run_bench

REPO = Path(__file__).resolve().parents[1]


class _Toy(torch.nn.Module):
    """Embedding 10x4 (a lookup: no FLOPs), Linear 4->8, Linear 8->4 with bias, a LoRA-named
    module (the adapter, not the base) and an LM head 4->10."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.up = torch.nn.Linear(4, 8, bias=False)
        self.down = torch.nn.Linear(8, 4)
        self.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(4, 2, bias=False)})
        self.lm_head = torch.nn.Linear(4, 10, bias=False)


def test_matmul_params_and_flops_per_token():
    n = matmul_params(_Toy())
    assert n == 4 * 8 + 8 * 4 + 4 * 10  # embedding, biases and LoRA A excluded
    assert train_flops_per_token(n) == 4 * 104  # 2N forward + 2N input gradients


def test_roofline_fraction():
    # 1000 tokens/s x 4e6 FLOPs/token = 4 GFLOP/s achieved, on an 8 GFLOP/s machine
    assert roofline_fraction(1000.0, 4e6, 8.0) == pytest.approx(0.5)


def test_paired_roofline_uses_each_rounds_rate():
    # round 1: 100 tok/s x 1e8 FLOPs = 10 GFLOP/s of 20; round 2 (machine busy): 5 of 10;
    # round 3: 10 of 40. Per round 0.5, 0.5, 0.25 -> median 0.5
    assert paired_roofline([100, 50, 100], [1.0, 1.0, 1.0], 1e8, [20.0, 10.0, 40.0]) == \
        pytest.approx(0.5)
    with pytest.raises(ValueError):
        paired_roofline([100], [1.0], 1e8, [20.0, 10.0])


def test_paired_ratio_is_median_of_per_round_ratios():
    assert paired_ratio([2.0, 4.0, 6.0], [1.0, 2.0, 2.0]) == pytest.approx(2.0)
    # a load burst hits one side in round 3 and the other in round 4: the pairs absorb it,
    # while a ratio of medians or means would not be 1.25
    ref = [1.0, 1.0, 5.0, 1.0, 1.0]
    proj = [0.8, 0.8, 0.8, 4.0, 0.8]
    assert paired_ratio(ref, proj) == pytest.approx(1.25)
    assert sum(ref) / sum(proj) == pytest.approx(9 / 7.2)
    with pytest.raises(ValueError):
        paired_ratio([1.0], [1.0, 2.0])
    with pytest.raises(ValueError):
        paired_ratio([], [])


def test_median_rate():
    # rates 100, 200, 300 tokens/s: the median rate, not total tokens / total time (240)
    assert median_rate([100, 200, 900], [1.0, 1.0, 3.0]) == pytest.approx(200.0)


def test_goal_status():
    assert goal_status(1.2, ">=", 1.0) == {"goal": ">= 1", "measured": 1.2, "met": True}
    assert goal_status(0.9, ">=", 1.0)["met"] is False
    assert goal_status(6.0, "<=", 5.0)["met"] is False
    assert goal_status(5.0, "<=", 5.0)["met"] is True
    assert goal_status(None, "<=", 5.0) == {"goal": "<= 5", "measured": None, "met": None}
    with pytest.raises(ValueError):
        goal_status(1.0, ">", 1.0)


def test_rotated_puts_every_path_in_every_position():
    paths = ["a", "b", "c", "d"]
    assert rotated(paths, 1) == ["b", "c", "d", "a"]
    assert rotated(paths, 5) == rotated(paths, 1)
    for pos in range(4):
        assert sorted(rotated(paths, i)[pos] for i in range(4)) == paths


def test_missing_pipeline_outputs_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="dvc repro quantize prepare"):
        check_inputs(tmp_path / "base", tmp_path / "quantized", tmp_path / "data")


@pytest.fixture()
def one_thread():
    """One torch thread: a tiny model gains nothing from two, and on a machine shared with
    other jobs two OpenMP threads wait on each other (a 240x64 linear: 0.2 ms -> 30 ms)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_params_file(path, tiny_base_dir):
    """The repository's params.yaml shrunk to the tiny pipeline, for the timed train.py runs."""
    import yaml

    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["base"] = {"model": "embedded:tiny-llama", "dtype": "float32"}
    p["quant"]["compute_dtype"] = "float32"
    p["lora"]["r"] = 2
    p["train"].update(max_steps=2, batch_size=4, warmup_steps=0, eval_every=2, save_every=2,
                      threads=1)
    p["compare"].update(n_generate=4, max_new_tokens=4, gen_batch_size=4)
    path.write_text(yaml.safe_dump(p))
    return path


def test_run_bench_end_to_end(tiny_base_dir, tiny_pipeline, tmp_path, one_thread):
    out = tmp_path / "reports" / "bench.json"
    params_file = tiny_params_file(tmp_path / "params.yaml", tiny_base_dir)
    params = load_params(params_file)  # the run's training knobs, as the stage uses
    result = run_bench(
        base_dir=tiny_base_dir, quant_dir=tiny_pipeline / "quantized",
        data_dir=tiny_pipeline / "data", base_dtype="float32", compute_dtype="float32",
        lora=params.lora, train=dataclasses.replace(params.train, threads=1),
        bench=BenchCfg(steps=2, warmup_steps=1, batch_size=4, rank=2, gen_examples=4,
                       paired_seeds=2),
        gen_max_new_tokens=4, gen_batch_size=4, seed=0, repo_dir=tmp_path, out_path=out,
        paired_seeds=[42, 1], params_file=params_file, threads=1, log=lambda *a, **k: None)

    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    # paired seeds: 2 seeds x 2 methods one run per process, 1 process per method the new way
    walls = result["paired_seeds_process_walls_s"]
    assert [len(walls["one_run_per_process"][m]) for m in ("lora", "qlora")] == [2, 2]
    assert [len(walls["seeds_per_process"][m]) for m in ("lora", "qlora")] == [1, 1]
    total = {k: sum(sum(w) for w in v.values()) for k, v in walls.items()}
    assert result["paired_seeds_per_minute"] == pytest.approx(120 / total["seeds_per_process"])
    assert result["paired_seeds_speedup"] == pytest.approx(
        total["one_run_per_process"] / total["seeds_per_process"])
    # the parts come from the runs' own reports and fit inside the processes' walls
    for path, parts in result["paired_seeds_time_parts_s"].items():
        assert all(parts[k] > 0 for k in ("train_steps_s", "eval_s", "generation_s")), parts
        assert parts["other_s"] > 0 and sum(parts.values()) == pytest.approx(total[path])
    assert result["paired_seeds_speedup_ceiling_steps_only"] > result["paired_seeds_speedup"]
    for key in ("train_throughput_ratio_lora", "train_throughput_ratio_qlora",
                "qlora_lora_step_time_ratio", "qlora_lora_peak_mem_ratio", "generation_speedup",
                "noop_repro_s", "train_roofline_fraction_lora", "train_roofline_fraction_qlora",
                "generation_outputs_identical", "weights_mb_lora", "weights_mb_qlora",
                "peak_mem_mb_lora", "peak_mem_mb_qlora", "machine", "goals",
                "paired_seeds_per_minute", "paired_seeds_per_cpu_minute", "paired_seeds_speedup"):
        assert key in result, key
    assert set(result["goals"]) == set(GOALS)
    # the K-adapter ceiling: K = the paired seeds, one timed round per batch after the warm-up
    batched = result["batched_rows"]
    assert batched["k"] == 2
    for method in ("lora", "qlora"):
        m = batched["methods"][method]
        assert len(m["step_s_per_batch_single"]) == len(m["step_s_per_batch_repeated"]) == 2
        assert result[f"batched_rows_speedup_{method}"] == m["speedup_per_example"] > 0
    for key in ("cpu_model", "cpu_cores", "torch_threads", "device", "dtype_lora", "torch",
                "transformers", "peft", "bitsandbytes", "matmul_gflops_float32",
                "matmul_gflops_bfloat16"):
        assert key in result["machine"], key

    tr = result["training"]
    assert tr["steps_total"] == 3 and len(tr["tokens_per_step"]) == 2
    assert tr["batches_identical"]  # the Trainer saw the reference's batches
    # 4-bit weights are counted logically: both methods have the same FLOPs per token, and
    # both equal the tiny Llama's matmul weights by construction (LM head tied, so counted once)
    cfg = json.loads((tiny_base_dir / "config.json").read_text())
    h, i, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    expected = layers * (2 * h * h + 2 * h * kv + 3 * h * i) + cfg["vocab_size"] * h
    for method in ("lora", "qlora"):
        assert tr[method]["matmul_params"] == expected
        assert len(tr[method]["step_s_project"]) == len(tr[method]["step_s_reference"]) == 2
        # same batch, B = 0 at init: both paths start from the same loss (Trainer logs 4 digits)
        assert tr[method]["first_step_loss_project"] == pytest.approx(
            tr[method]["first_step_loss_reference"], abs=1e-3)

    mem = result["memory"]
    assert mem["lora"]["backend"] == mem["qlora"]["backend"]
    assert result["weights_mb_qlora"] < result["weights_mb_lora"]
    assert result["generation"]["examples"] == 4
    # float32: our batched path and transformers' batched generate both give the answers of
    # one-at-a-time generate (in bf16 they may not; see outputs_note)
    assert result["generation"]["outputs_mismatched"] == 0
    assert result["generation"]["hf_batched_outputs_mismatched"] == 0
    assert result["generation_outputs_identical"]
    # tmp_path is no DVC repository: no number, and a reason
    assert result["noop_repro_s"] is None and "dvc status" in result["noop_repro"]["reason"]
    assert result["goals"]["noop_repro_s"]["met"] is None
    assert len(tr["matmul_gflops_per_step"]["float32"]) == 2  # the roofline's per-round rates
    table = format_table(result)
    assert "lora" in table and "qlora" in table and "generation" in table
