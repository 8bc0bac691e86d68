"""The compare stage: pure measures against known answers, the run bookkeeping, and the whole
comparison on a tiny fake pipeline (tiny Llama, real quantization, PEFT adapters, hand-written
run.json and generations)."""
from __future__ import annotations

import dataclasses
import json
import math
import zlib
from pathlib import Path

import pandas as pd
import pytest
import torch

from qlora_diag.compare import floors, headline, runs
from qlora_diag.compare import function as fn
from qlora_diag.compare import run as cmp
from qlora_diag.compare.outputs import summary_lines, write_outputs
from qlora_diag.core import schemas
from qlora_diag.core.config import (
    BaseCfg,
    LoraCfg,
    Params,
    QuantCfg,
    SweepCfg,
    load_params,
    run_name,
)
from qlora_diag.core.errors import UserError
from qlora_diag.core.examples import mean_loss, read_examples
from qlora_diag.core.numbers import json_safe
from qlora_diag.data.splits import load_split
from qlora_diag.train.trainer import RunSpec

REPO = Path(__file__).resolve().parents[1]
N_EVAL = 6
N_GENERATE = 4


def tiny_params(**sweep) -> Params:
    """The repository's params.yaml (so every key exists), shrunk to the tiny pipeline: ranks
    [2, 4] with the headline at r = 4 on qv, one extra seed, one extra preset, no setting seeds."""
    p = load_params(REPO / "params.yaml")
    return dataclasses.replace(
        p, seed=42,
        base=BaseCfg(model="embedded:tiny-llama", dtype="float32"),
        data=dataclasses.replace(p.data, source="embedded:probe", n_train=4, n_eval=N_EVAL,
                                 max_length=96),
        quant=QuantCfg(type="nf4", double_quant=True, compute_dtype="float32"),
        lora=LoraCfg(r=4, alpha=8.0, dropout=0.0, targets="qv"),
        sweep=SweepCfg(**(dict(ranks=[2, 4], seeds=[1], setting_seeds=[], targets=["kv"])
                           | sweep)),
        compare=dataclasses.replace(p.compare, n_generate=N_GENERATE, max_new_tokens=3,
                                    gen_batch_size=4, subspace_k=2))


# ---------------------------------------------------------------------------------------------
# Pure measures
# ---------------------------------------------------------------------------------------------

def test_token_match_identical_disjoint_and_partial():
    assert fn.token_match_rate([[1, 2, 3], [4]], [[1, 2, 3], [4]]) == 1.0
    assert fn.token_match_rate([[]], [[]]) == 1.0  # two empty answers agree
    assert fn.token_match_rate([[1, 2]], [[2, 1]]) == 0.0
    # up to the longer output: 2 matching positions of 4
    assert fn.token_match_counts([1, 2, 3], [1, 2, 4, 5]) == (2, 4)
    assert fn.token_match_rate([[1, 2, 3]], [[1, 2, 4, 5]]) == 0.5
    # a prefix that stops early loses the positions the other goes on for
    assert fn.token_match_rate([[7]], [[7, 8, 9]]) == pytest.approx(1 / 3)
    # pooled over tokens: (2 + 1) matches over (4 + 1) positions, not the mean of 0.5 and 1
    assert fn.token_match_rate([[1, 2, 3], [5]], [[1, 2, 4, 5], [5]]) == pytest.approx(3 / 5)
    # position-wise: a later coincidental match counts
    assert fn.token_match_rate([[1, 9, 3]], [[1, 8, 3]]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        fn.token_match_rate([[1]], [])


def test_exact_output_agreement():
    assert fn.exact_output_agreement([[1, 2], [3], []], [[1, 2], [3, 4], []]) == pytest.approx(2 / 3)
    assert fn.exact_output_agreement([[1]], [[1]]) == 1.0


def test_kl_known_values():
    logits = torch.randn(5, 11)
    assert fn.kl_divergence_sum(logits, logits) == 0.0
    # a shift of all logits leaves the distribution unchanged
    assert fn.kl_divergence_sum(logits, logits + 3.0) == pytest.approx(0.0, abs=1e-5)
    # two-outcome case by hand: P = (1/2, 1/2), Q = (1/(1+e), e/(1+e))
    p, q = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    qa, qb = 1 / (1 + math.e), math.e / (1 + math.e)
    expected = 0.5 * math.log(0.5 / qa) + 0.5 * math.log(0.5 / qb)
    assert fn.kl_divergence_sum(p, q) == pytest.approx(expected, rel=1e-6)
    assert fn.kl_divergence_sum(q, p) != pytest.approx(expected, rel=1e-3)  # asymmetric
    # sums over rows
    assert fn.kl_divergence_sum(torch.cat([p, p]), torch.cat([q, q])) == pytest.approx(2 * expected)


def test_response_pair_sums_known_values_in_any_chunking():
    """Two-word vocabulary, identity heads: model a's logits are its hidden state (0, 0) =
    P (1/2, 1/2), model b's (0, 1) = Q; labels 0 and 1. Cross-entropy, KL and cosine sums by
    hand, the same whether the positions are projected one at a time or all at once."""
    head = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
    ha = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    hb = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    y = torch.tensor([0, 1, 0])
    qa, qb = 1 / (1 + math.e), math.e / (1 + math.e)
    pa3 = math.e / (1 + math.e)  # both models at (1, 0): P = Q, label 0
    expected = {"ce_a": 2 * math.log(2) - math.log(pa3),
                "ce_b": -math.log(qa) - math.log(qb) - math.log(pa3),
                "kl": 2 * (0.5 * math.log(0.5 / qa) + 0.5 * math.log(0.5 / qb)),
                "cos": 0.0 + 0.0 + 1.0}  # a zero vector has cosine 0 (eps in the norm)
    for chunk in (1, 2, 3, 1024):
        got = fn.response_pair_sums(head, head, ha, hb, y, chunk=chunk)
        per_a, per_b = got.pop("ce_a_per_position"), got.pop("ce_b_per_position")
        assert got == pytest.approx(expected, rel=1e-6, abs=1e-7), chunk
        assert per_a.tolist() == pytest.approx([math.log(2), math.log(2), -math.log(pa3)])
        assert per_b.tolist() == pytest.approx([-math.log(qa), -math.log(qb), -math.log(pa3)])


def test_seed_stats_and_noise_aware_gap_by_hand():
    s = headline.seed_stats([1.0, 1.2, 1.1])
    assert s["mean"] == pytest.approx(1.1)
    assert s["std"] == pytest.approx(0.1)  # sample std: sqrt((0.01 + 0.01 + 0) / 2)
    assert s["spread"] == pytest.approx(0.2)
    one = headline.seed_stats([2.0])
    assert one["mean"] == 2.0 and math.isnan(one["std"]) and math.isnan(one["spread"])

    g = headline.noise_aware_gap(lora=[1.00, 1.10], qlora=[1.20, 1.50])
    assert g["gap"] == pytest.approx(1.35 - 1.05)
    assert g["spread_lora"] == pytest.approx(0.10)
    assert g["spread_qlora"] == pytest.approx(0.30)
    assert g["seed_spread"] == pytest.approx(0.30)  # largest same-method difference
    single = headline.noise_aware_gap(lora=[1.0], qlora=[1.25])
    assert single["gap"] == 0.25 and math.isnan(single["seed_spread"])
    assert headline.quality_drop_pct(2.0, 2.1) == pytest.approx(5.0)


def test_json_safe_turns_nan_into_null():
    out = json_safe({"a": math.nan, "b": [1.0, math.inf], "c": {"d": 2}})
    assert out == {"a": None, "b": [1.0, None], "c": {"d": 2}}


# ---------------------------------------------------------------------------------------------
# Which runs and pairs
# ---------------------------------------------------------------------------------------------

def test_noise_floor_pairs_are_exactly_the_expected_ones():
    p = tiny_params(seeds=[1, 7])
    pairs = runs.adapter_pairs(p)
    by_kind = {}
    for ap in pairs:
        by_kind.setdefault(ap.kind, set()).add((ap.a.name, ap.b.name))

    def n(method: str, seed: int) -> str:
        return run_name(method, 4, "qv", seed)

    assert by_kind["noise_lora"] == {(n("lora", 1), n("lora", 42)), (n("lora", 7), n("lora", 42)),
                                     (n("lora", 7), n("lora", 1))}
    assert by_kind["noise_qlora"] == {(n("qlora", 1), n("qlora", 42)),
                                      (n("qlora", 7), n("qlora", 42)),
                                      (n("qlora", 7), n("qlora", 1))}
    # every ordered pair of distinct seeds: QLoRA seed b vs LoRA seed a
    assert by_kind["cross_seed"] == {(n("qlora", b), n("lora", a))
                                     for a in (42, 1, 7) for b in (42, 1, 7) if a != b}
    assert by_kind["same_seed"] == {
        (run_name("qlora", 2, "qv", 42), run_name("lora", 2, "qv", 42)),
        (n("qlora", 42), n("lora", 42)), (n("qlora", 1), n("lora", 1)),
        (n("qlora", 7), n("lora", 7)),
        (run_name("qlora", 4, "kv", 42), run_name("lora", 4, "kv", 42))}
    assert len(pairs) == sum(len(v) for v in by_kind.values())  # each pair once


def test_runs_and_producing_stages():
    p = tiny_params()
    names = [s.name for s in runs.all_runs(p)]
    assert len(names) == len(set(names)) == 10
    assert names[-2:] == ["lora-r4-qv-s42-d1", "qlora-r4-qv-s42-d1"]  # the same-init control
    assert runs.producing_stage(RunSpec("qlora", 4, "qv", 42, 1), p) == "control_qlora"
    assert runs.producing_stage(RunSpec("lora", 4, "qv", 42, 1), p) == "control_lora"
    with pytest.raises(ValueError):
        runs.producing_stage(RunSpec("lora", 4, "qv", 42, 7), p)
    assert list(runs.preset_pairs(p)) == ["qv", "kv"]
    assert runs.preset_pairs(p)["qv"] == runs.headline_pair(p) == runs.rank_pairs(p)[4]
    assert runs.producing_stage(RunSpec("qlora", 2, "qv", 42), p) == "train_qlora@2"
    assert runs.producing_stage(RunSpec("lora", 4, "qv", 1), p) == "seeds_lora@1"
    assert runs.producing_stage(RunSpec("qlora", 4, "kv", 42), p) == "modules_qlora@kv"
    with pytest.raises(ValueError):
        runs.producing_stage(RunSpec("lora", 16, "qv", 42), p)


def test_floor_pairs_are_exactly_the_expected_ones():
    p = tiny_params(seeds=[1, 7])

    def L(s, d=None):
        return run_name("lora", 4, "qv", s, d)

    def Q(s, d=None):
        return run_name("qlora", 4, "qv", s, d)

    got = {}
    for fp in floors.weight_floor_pairs(p):
        got.setdefault(fp.kind, []).append((fp.a.name, fp.b.name))
    assert got == {
        "lora-lora": [(L(42), L(1)), (L(42), L(7)), (L(1), L(7))],
        "qlora-qlora": [(Q(42), Q(1)), (Q(42), Q(7)), (Q(1), Q(7))],
        "lora-qlora-cross": [(L(s), Q(t)) for s in (42, 1, 7) for t in (42, 1, 7) if s != t],
        "lora-qlora-same": [(L(42), Q(42)), (L(1), Q(1)), (L(7), Q(7)), (L(42, 1), Q(42, 1))],
        "lora-qlora-control": [(L(42), Q(42, 1)), (L(42, 1), Q(42))],
        "lora-lora-control": [(L(42), L(42, 1))], "qlora-qlora-control": [(Q(42), Q(42, 1))]}
    got = {}
    for fp in floors.function_floor_pairs(p):
        got.setdefault(fp.kind, []).append((fp.a.name, fp.b.name))
    assert got == {  # consecutive seeds only: 42-1, 1-7
        "lora-lora": [(L(42), L(1)), (L(1), L(7))], "qlora-qlora": [(Q(42), Q(1)), (Q(1), Q(7))],
        "lora-qlora-cross": [(L(42), Q(1)), (L(1), Q(7))],
        "lora-qlora-same": [(L(42), Q(42)), (L(1), Q(1)), (L(7), Q(7))],
        "lora-qlora-control": [(L(42), Q(42, 1))]}


def test_setting_seeds_are_trained_by_their_settings_stage():
    """Each setting trains seed and sweep.setting_seeds in one stage; the headline setting adds
    sweep.seeds in their own stages: 2 ranks x 3 + 2 + 1 preset x 3 = 11 runs per method, and
    the same-init control's one."""
    p = tiny_params(setting_seeds=[5, 6], seeds=[1, 7])
    specs = runs.all_runs(p)
    assert len(specs) == len({s.name for s in specs}) == 24
    assert runs.noise_seeds(p) == [42, 5, 6, 1, 7]
    assert runs.producing_stage(RunSpec("lora", 2, "qv", 6), p) == "train_lora@2"
    assert runs.producing_stage(RunSpec("qlora", 4, "qv", 5), p) == "train_qlora@4"
    assert runs.producing_stage(RunSpec("qlora", 4, "qv", 7), p) == "seeds_qlora@7"
    assert runs.producing_stage(RunSpec("lora", 4, "kv", 5), p) == "modules_lora@kv"
    with pytest.raises(ValueError):
        runs.producing_stage(RunSpec("lora", 4, "kv", 7), p)  # extra seeds: headline only
    from qlora_diag.distribute import training_stages
    assert training_stages(p) == ["train_lora@2", "train_qlora@2", "train_lora@4", "train_qlora@4",
                                  "seeds_lora@1", "seeds_qlora@1", "seeds_lora@7",
                                  "seeds_qlora@7", "modules_lora@kv", "modules_qlora@kv",
                                  "control_lora", "control_qlora"]


# ---------------------------------------------------------------------------------------------
# The tiny pipeline
# ---------------------------------------------------------------------------------------------

def _write_adapter(base_dir: Path, out: Path, spec: RunSpec, alpha: float) -> None:
    """A PEFT adapter as training would save it, with random (seeded) A and B so ΔW != 0."""
    from qlora_diag.models.loading import load_base
    from qlora_diag.train.trainer import attach_lora

    model = attach_lora(load_base(base_dir, "float32"), rank=spec.rank, alpha=alpha, dropout=0.0,
                        targets=spec.targets, seed=spec.seed)
    gen = torch.Generator().manual_seed(zlib.crc32(spec.name.encode()))  # stable across runs
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))
    model.save_pretrained(out)


def _run_json(spec: RunSpec, eval_loss: float, exact: float) -> dict:
    return {"run": spec.name, "method": spec.method, "rank": spec.rank, "targets": spec.targets,
            "seed": spec.seed, "data_seed": spec.data_seed, "optimizer": "adamw_torch",
            "device": "cpu", "dtype": "float32",
            "kbit_prep": False, "trainable_params": 1000 * spec.rank, "eval_loss": eval_loss,
            "eval_perplexity": math.exp(eval_loss), "eval_tokens": 10, "train_loss_final": 1.0,
            "exact_match": exact, "exact_match_per_task": {}, "chrf": 50.0, "weights_mb": 2.0 if spec.method
            == "lora" else 1.0, "peak_mem_mb": 300.0 if spec.method == "lora" else 250.0,
            "peak_mem_growth_mb": 50.0, "memory_measure": "test",
            "step_time_median_s": 1.0 if spec.method == "lora" else 1.5, "tokens_per_s": 100.0,
            "timed_steps": 1, "resumed_from_step": 0, "train_steps_s": 0.5, "eval_s": 0.1,
            "generation_s": 0.1, "wall_s": 1.0}


# Saved greedy outputs of the headline pair: LoRA = [5, 6, 7] everywhere; QLoRA agrees on the
# first example, differs in the last token on the second, stops early on the third and is
# entirely different on the fourth: token match (3 + 2 + 1 + 0) / (3 + 3 + 3 + 3) = 0.5.
LORA_OUT = [[5, 6, 7]] * N_GENERATE
QLORA_OUT = [[5, 6, 7], [5, 6, 9], [5], [8, 8, 8]]


@pytest.fixture(scope="module")
def fake_pipeline(tmp_path_factory, tiny_base_dir):
    """models/, data/, reports/ as `dvc repro` would leave them before compare, for tiny_params."""
    from qlora_diag.data.resolved import resolve_max_new_tokens, write_resolved
    from qlora_diag.data.splits import load_split, prepare_dataset
    from qlora_diag.models.loading import load_base, load_tokenizer
    from qlora_diag.models.quantization.per_module import weight_error_table
    from qlora_diag.models.quantization.save import quantize_and_save

    p = tiny_params()
    root = tmp_path_factory.mktemp("compare")
    tok = load_tokenizer(tiny_base_dir)
    stats = prepare_dataset(source=p.data.source, n_train=p.data.n_train, n_eval=p.data.n_eval,
                            max_length=p.data.max_length, seed=p.seed, tokenizer=tok,
                            out_dir=root / "data/prepared")
    write_resolved(root / "data/resolved.json",
                   resolve_max_new_tokens(p.compare.max_new_tokens, stats["splits"]["train"]))
    quantize_and_save(tiny_base_dir, root / "models/quantized", quant_type=p.quant.type,
                      double_quant=p.quant.double_quant, compute_dtype=p.quant.compute_dtype)
    (root / "reports").mkdir()
    weight_error_table(load_base(tiny_base_dir, "float32")).to_csv(
        root / "reports/quantization.csv", index=False)
    eval_records = load_split(root / "data/prepared/eval.jsonl")[:N_GENERATE]
    losses = {("lora", 42): 2.00, ("qlora", 42): 2.10, ("lora", 1): 2.04, ("qlora", 1): 2.30}
    for spec in runs.all_runs(p):
        _write_adapter(tiny_base_dir, root / "models/adapters" / spec.name, spec, p.lora.alpha)
        report = root / "reports/train" / spec.name
        report.mkdir(parents=True)
        outs = QLORA_OUT if spec.method == "qlora" else LORA_OUT
        rows = [{"id": r["id"], "task": r["task"], "prompt": r["prompt"],
                 "reference": r["output"], "output": tok.decode(o), "output_ids": o,
                 "exact_match": i % 2 == 0} for i, (r, o) in enumerate(zip(eval_records, outs))]
        (report / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        loss = losses.get((spec.method, spec.seed), 2.0 + 0.01 * spec.rank)
        if spec.targets != "qv" or spec.rank != 4:
            loss = {"lora": 2.5, "qlora": 2.6}[spec.method]
        run = _run_json(spec, loss, 0.5)
        (report / "run.json").write_text(json.dumps(run))
    paths = cmp.ComparePaths(
        base_dir=tiny_base_dir, quant_dir=root / "models/quantized",
        data_dir=root / "data/prepared", resolved_json=root / "data/resolved.json",
        adapters_dir=root / "models/adapters",
        train_dir=root / "reports/train", quant_csv=root / "reports/quantization.csv",
        reports_dir=root / "reports", compare_dir=root / "reports/compare")
    return p, paths


@pytest.fixture(scope="module")
def compared(fake_pipeline):
    p, paths = fake_pipeline
    result = cmp.run_compare(p, paths)
    write_outputs(result, paths)
    return result, paths


def test_outputs_exist_with_their_columns(compared):
    result, paths = compared
    r = paths.reports_dir
    assert list(pd.read_csv(r / "ranks.csv").columns) == list(schemas.RANKS_COLUMNS)
    assert list(pd.read_csv(r / "modules.csv").columns) == list(schemas.MODULES_COLUMNS)
    assert list(pd.read_csv(r / "layers.csv").columns) == list(schemas.LAYERS_COLUMNS)
    c = paths.compare_dir
    assert list(pd.read_csv(c / "pairs.csv").columns) == list(schemas.PAIRS_COLUMNS)
    assert list(pd.read_csv(c / "per_task.csv").columns) == list(schemas.PER_TASK_COLUMNS)
    assert list(pd.read_csv(c / "function.csv").columns) == list(schemas.FUNCTION_COLUMNS)
    for name in ("base.json", "transfer.json", "setup.json"):
        assert json.loads((c / name).read_text())
    for case in (*schemas.BASE_CASES, *schemas.TRANSFER_CASES):
        assert len((c / "generations" / f"{case}.jsonl").read_text().splitlines()) == N_GENERATE

    metrics = json.loads((r / "metrics.json").read_text())
    headline_numbers = json.loads((c / "headline.json").read_text())
    # metrics.json holds exactly the DVC metrics, in their order; headline.json the rest
    assert list(metrics) == list(schemas.METRICS_KEYS)
    assert list(headline_numbers) == list(schemas.HEADLINE_KEYS)
    spec_keys = ["eval_loss_lora", "eval_loss_qlora", "eval_loss_gap", "exact_match_lora",
                 "exact_match_qlora", "token_match_rate", "cos_sim_mean", "subspace_sim_mean",
                 "noise_floor_cos_sim", "peak_mem_mb_lora", "peak_mem_mb_qlora",
                 "weights_mb_lora", "weights_mb_qlora", "step_time_ratio"]
    brief_keys = ["eval_loss_seed_spread", "exact_output_agreement", "kl_mean", "hidden_cos_sim",
                  "rel_frob_mean", "cross_seed_cos_sim", "noise_floor_cos_sim_lora",
                  "noise_floor_cos_sim_qlora", "alignment_mean", "alignment_ceiling_mean",
                  "base_eval_loss", "base_eval_loss_quantized", "base_exact_match",
                  "base_exact_match_quantized", "tokens_per_s_lora", "tokens_per_s_qlora",
                  "peak_mem_growth_mb_lora", "peak_mem_growth_mb_qlora"]
    for key in spec_keys:
        assert isinstance(metrics[key], (int, float)) and math.isfinite(metrics[key]), key
    for key in brief_keys:
        value = headline_numbers[key]
        assert isinstance(value, (int, float)) and math.isfinite(value), key
    for numbers in (metrics, headline_numbers):
        assert all(isinstance(v, (int, float)) for v in numbers.values()), "flat and numeric"

    ranks = pd.read_csv(r / "ranks.csv")
    assert ranks["rank"].tolist() == [2, 4]
    modules = pd.read_csv(r / "modules.csv")
    assert modules["targets"].tolist() == ["qv", "kv"]
    layers = pd.read_csv(r / "layers.csv")
    assert len(layers) == 2 * 2  # 2 layers x (q_proj, v_proj)
    assert layers[["cos_sim", "norm_residual", "quant_rel_error", "alignment_ceiling"]].notna().all().all()
    setup = json.loads((c / "setup.json").read_text())
    assert list(setup) == list(schemas.SETUP_KEYS)
    assert setup["dtypes"] == {"base": "float32", "quant_compute": "float32"}
    assert {"torch", "transformers", "peft", "bitsandbytes"} <= set(setup["versions"])


def test_numbers_from_the_hand_written_runs(compared):
    result, _ = compared
    m = result.metrics
    assert m["token_match_rate"] == pytest.approx(0.5)
    assert m["exact_output_agreement"] == pytest.approx(0.25)
    # seeds 42 and 1: LoRA 2.00, 2.04; QLoRA 2.10, 2.30
    assert m["eval_loss_gap"] == pytest.approx(2.20 - 2.02)
    assert m["eval_loss_gap_same_seed"] == pytest.approx(0.10)
    assert m["eval_loss_seed_spread"] == pytest.approx(0.20)
    assert m["step_time_ratio"] == pytest.approx(1.5)
    mod = result.modules.set_index("targets")
    assert mod.loc["kv", "quality_drop_pct"] == pytest.approx(4.0)
    row = result.ranks.set_index("rank").loc[4]
    assert row["eval_loss_gap"] == pytest.approx(0.10)
    assert row["cos_sim_mean"] == pytest.approx(m["cos_sim_mean"])
    # noise floor = mean of the two same-method pairs
    pairs = result.pairs
    floor = pairs[pairs["kind"].isin(["noise_lora", "noise_qlora"])]["cos_sim_mean"].mean()
    assert m["noise_floor_cos_sim"] == pytest.approx(floor)
    assert set(pairs["kind"]) == {"same_seed", "noise_lora", "noise_qlora", "cross_seed"}
    per_task = result.per_task
    assert set(per_task["method"]) == {"lora", "qlora", "base", "base_quantized"}


def _dense_cos_mean(dir_a: Path, dir_b: Path) -> tuple[float, int]:
    """Mean over modules of cos(ΔW_a, ΔW_b) from the dense products of the saved safetensors
    (independent of the factored computation), and the number of modules."""
    from safetensors.torch import load_file

    ta, tb = load_file(dir_a / "adapter_model.safetensors"), load_file(dir_b / "adapter_model.safetensors")
    cos = []
    for key in ta:
        if "lora_A" in key:
            bkey = key.replace("lora_A", "lora_B")
            da = (ta[bkey].double() @ ta[key].double()).flatten()
            db = (tb[bkey].double() @ tb[key].double()).flatten()
            cos.append(float(da @ db / (da.norm() * db.norm())))
    return sum(cos) / len(cos), len(cos)


def test_weight_floors_match_a_dense_computation(compared):
    result, paths = compared
    fl = pd.read_csv(paths.compare_dir / "floors.csv")
    assert list(fl.columns) == list(schemas.FLOORS_COLUMNS)
    assert set(fl["kind"]) == set(schemas.FLOOR_KINDS)
    for row in fl.itertuples():
        cos, n = _dense_cos_mean(paths.adapters_dir / row.run_a, paths.adapters_dir / row.run_b)
        assert row.cos_sim_mean == pytest.approx(cos, rel=1e-4), row.kind
        assert row.n_modules == n
        assert row.subspace_sim_mean == pytest.approx(
            (row.subspace_sim_left_mean + row.subspace_sim_right_mean) / 2, rel=1e-4)
    ctl = fl[fl["kind"] == "lora-lora-control"].iloc[0]
    assert (ctl.seed_a, ctl.seed_b, ctl.data_seed_a, ctl.data_seed_b) == (42, 42, 42, 1)
    # The fake adapters keep the init A of their seed (attach_lora) and draw B from the run
    # name: the control shares the row space of ΔW (the span of A's rows) with its same-seed
    # run exactly, so over all r = 4 directions its right phi is 1 and its left one is not;
    # a cross-seed pair shares neither.
    p = tiny_params()
    full = floors.weight_floors([fp for fp in floors.weight_floor_pairs(p)
                                 if fp.kind in ("lora-lora-control", "lora-qlora-cross")],
                                {d.name: d for d in paths.adapters_dir.iterdir()}, k=4)
    by = full.set_index("kind")
    assert by.loc["lora-lora-control", "subspace_sim_right_mean"] == pytest.approx(1.0, abs=1e-9)
    assert by.loc["lora-lora-control", "subspace_sim_left_mean"] < 0.99
    assert (full.loc[full["kind"] == "lora-qlora-cross", "subspace_sim_right_mean"] < 0.99).all()
    # The same pairs in pairs.csv have the same numbers.
    pairs = result.pairs.set_index(["run_a", "run_b"])
    same = fl[fl["kind"] == "lora-qlora-same"].iloc[0]
    assert pairs.loc[(same.run_b, same.run_a), "cos_sim_mean"] == pytest.approx(same.cos_sim_mean)


def test_summary_names_every_floor_kind(compared):
    result, _ = compared
    line = next(x for x in summary_lines(result) if x.startswith("cos(ΔW) floors"))
    for kind in schemas.FLOOR_KINDS:
        value = result.floors.loc[result.floors["kind"] == kind, "cos_sim_mean"].mean()
        assert f"{kind} {value:.3f}" in line


def test_function_floors_known_answers(compared):
    result, paths = compared
    assert list(pd.read_csv(paths.compare_dir / "function_floors.csv").columns) == list(
        schemas.FUNCTION_FLOORS_COLUMNS)
    ff = result.function_floors
    by = ff.set_index("kind")
    # every fake LoRA run saved LORA_OUT, every QLoRA run QLORA_OUT (token match 0.5 between)
    assert by.loc["lora-lora", "token_match_rate"] == 1.0
    assert by.loc["qlora-qlora", "token_match_rate"] == 1.0
    assert by.loc["lora-qlora-cross", "token_match_rate"] == pytest.approx(0.5)
    assert by.loc["lora-qlora-control", "exact_output_agreement"] == pytest.approx(0.25)
    assert (ff["kl_mean"] > 0).all() and (ff["hidden_cos_sim"] < 1).all()
    # a run's loss is the same whichever pair it is in (and whichever copy of its base), and
    # equals the function.csv recomputation of the headline pair
    loss = {}
    for row in ff.itertuples():
        for run, value in ((row.run_a, row.eval_loss_a), (row.run_b, row.eval_loss_b)):
            assert loss.setdefault(run, value) == pytest.approx(value, rel=1e-6), run
    head = result.function.iloc[[i for i, r in enumerate(result.function.itertuples())
                                 if r.run_lora == run_name("lora", 4, "qv", 42)][0]]
    assert loss[head["run_lora"]] == pytest.approx(head["eval_loss_lora_recomputed"], rel=1e-6)
    assert loss[head["run_qlora"]] == pytest.approx(head["eval_loss_qlora_recomputed"], rel=1e-6)


def test_per_example_records_of_compare_and_transfer_from_one_pass(compared):
    result, paths = compared
    t = result.transfer
    for case in schemas.EXAMPLE_CASES:
        rows = read_examples(paths.compare_dir / "examples" / f"{case}.jsonl")
        assert len(rows) == len(load_split(paths.data_dir / "eval.jsonl"))
        assert sum(r["exact_match"] is not None for r in rows) == N_GENERATE
        loss = mean_loss(rows)
        if case in schemas.BASE_CASES:
            key = "eval_loss" if case == "base" else "eval_loss_quantized"
            assert loss == pytest.approx(result.base[key], rel=1e-6)
        elif case in schemas.TRANSFER_CASES:
            assert loss == pytest.approx(t["cases"][case]["eval_loss"], rel=1e-6)
        else:
            assert loss == pytest.approx(t["native"][case.split("_")[1]]["eval_loss"], rel=1e-6)
    # both sides of each change are compare's own numbers
    m = result.metrics
    for case, method in (("qlora_on_base", "qlora"), ("qlora_merged", "qlora"),
                         ("lora_on_quantized", "lora")):
        c = t["cases"][case]
        assert c["eval_loss_change"] == pytest.approx(c["eval_loss"] - t["native"][method]["eval_loss"])
        assert m[f"transfer_{case}_eval_loss_change"] == c["eval_loss_change"]
        native_rows = read_examples(paths.compare_dir / "examples" / f"native_{method}.jsonl")
        em = sum(r["exact_match"] for r in native_rows[:N_GENERATE]) / N_GENERATE
        assert c["exact_match_change"] == pytest.approx(c["exact_match"] - em)
    # the native LoRA adapter on its base, evaluated by compare, is the function pass's value
    head = result.function[result.function["run_lora"] == run_name("lora", 4, "qv", 42)].iloc[0]
    assert t["native"]["lora"]["eval_loss"] == pytest.approx(head["eval_loss_lora_recomputed"],
                                                             rel=1e-6)


def test_transfer_and_base_numbers_are_finite_and_consistent(compared):
    result, _ = compared
    for case in schemas.TRANSFER_CASES:
        c = result.transfer["cases"][case]
        assert math.isfinite(c["eval_loss"]) and 0 <= c["exact_match"] <= 1
    cases = result.transfer["cases"]
    # On a float32 base merging is exact up to rounding: unmerged and merged agree closely.
    assert cases["qlora_merged"]["eval_loss"] == pytest.approx(cases["qlora_on_base"]["eval_loss"],
                                                               abs=1e-4)
    assert math.isfinite(result.base["eval_loss"]) and math.isfinite(result.base["eval_loss_quantized"])
    # quantization changes the model, so the two bases disagree a little
    assert result.base["kl_mean"] > 0 and result.base["hidden_cos_sim"] < 1


def test_kl_of_a_model_with_itself_is_zero_and_hidden_cos_one(fake_pipeline, tiny_base_dir):
    from qlora_diag.data.splits import load_split
    from qlora_diag.models.loading import load_base, load_tokenizer

    p, paths = fake_pipeline
    model = load_base(tiny_base_dir, "float32")
    records = load_split(paths.data_dir / "eval.jsonl")
    out = fn.pair_forward_stats(model, model, records, 4, load_tokenizer(tiny_base_dir).pad_token_id,
                                 desc="self")
    assert out["kl_mean"] == 0.0
    assert out["hidden_cos_sim"] == pytest.approx(1.0, abs=1e-6)
    assert out["loss_a"] == out["loss_b"]
    assert out["n_tokens"] == sum(len(r["input_ids"]) - r["n_prompt"] for r in records)


def test_attached_adapter_is_removed_again(fake_pipeline, tiny_base_dir):
    from qlora_diag.models.loading import load_base

    p, paths = fake_pipeline
    model = load_base(tiny_base_dir, "float32")
    ids = torch.tensor([[5, 6, 7, 8]])
    before = model(ids).logits
    with fn.attached(model, paths.adapters_dir / run_name("lora", 4, "qv", 42)) as m:
        assert not torch.allclose(m(ids).logits, before)
    assert torch.equal(model(ids).logits, before)
    assert not any("lora_" in n for n, _ in model.named_parameters())


def test_missing_adapter_names_path_and_stage(fake_pipeline, tmp_path):
    import shutil

    p, paths = fake_pipeline
    adapters = tmp_path / "adapters"
    shutil.copytree(paths.adapters_dir, adapters)
    shutil.rmtree(adapters / run_name("qlora", 4, "kv", 42))
    with pytest.raises(UserError, match=r"qlora-r4-kv-s42.*modules_qlora@kv"):
        cmp.run_compare(p, dataclasses.replace(paths, adapters_dir=adapters))
    (adapters / run_name("lora", 2, "qv", 42) / "adapter_model.safetensors").unlink()
    with pytest.raises(UserError, match=r"lora-r2-qv-s42/adapter_model.safetensors.*train_lora@2"):
        cmp.run_compare(p, dataclasses.replace(paths, adapters_dir=adapters))


def test_missing_or_stale_run_report_names_path_and_stage(fake_pipeline, tmp_path):
    import shutil

    p, paths = fake_pipeline
    train = tmp_path / "train"
    shutil.copytree(paths.train_dir, train)
    shutil.rmtree(train / run_name("lora", 4, "qv", 1))
    with pytest.raises(UserError, match=r"lora-r4-qv-s1.*seeds_lora@1"):
        cmp.run_compare(p, dataclasses.replace(paths, train_dir=train))
    shutil.copytree(paths.train_dir / run_name("lora", 4, "qv", 1), train / run_name("lora", 4, "qv", 1))
    gens = train / run_name("qlora", 2, "qv", 42) / "generations.jsonl"
    gens.write_text("".join(gens.read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(UserError, match=r"generations.jsonl.*stale.*train_qlora@2"):
        cmp.run_compare(p, dataclasses.replace(paths, train_dir=train))


def test_missing_stage_outputs_name_the_stage(fake_pipeline, tmp_path):
    p, paths = fake_pipeline
    with pytest.raises(UserError, match=r"quantize"):
        cmp.run_compare(p, dataclasses.replace(paths, quant_dir=tmp_path / "nope"))
    with pytest.raises(UserError, match=r"q.csv: quantization error table.*quantize"):
        cmp.run_compare(p, dataclasses.replace(paths, quant_csv=tmp_path / "q.csv"))
    with pytest.raises(UserError, match=r"eval.jsonl.*prepare"):
        cmp.run_compare(p, dataclasses.replace(paths, data_dir=tmp_path))
