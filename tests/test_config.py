"""params.yaml validation: every rule fires with a message naming key, value and what is valid;
all problems are reported at once; the command line shows them without a traceback."""
from __future__ import annotations

import ast
import copy
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from qlora_diag.core.config import (
    Params,
    load_params,
    params_from_dict,
    require_eval_examples,
)
from qlora_diag.core.config import params as params_module
from qlora_diag.core.config.load import read_yaml
from qlora_diag.core.errors import ParamsError, UserError

REPO = Path(__file__).resolve().parents[1]
REAL = yaml.safe_load((REPO / "params.yaml").read_text())


def problems_after(*edits: tuple[str, object]) -> list[str]:
    """Problems of the real params with ``("section.key", value)`` edits; value ``DELETE``
    removes the key. Fails if the edited params are accepted."""
    raw = copy.deepcopy(REAL)
    for path, value in edits:
        *parents, last = path.split(".")
        node = raw
        for p in parents:
            node = node[p]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
    with pytest.raises(ParamsError) as exc:
        params_from_dict(raw)
    return exc.value.problems


DELETE = object()


def only(problems: list[str]) -> str:
    assert len(problems) == 1, problems
    return problems[0]


def test_real_params_validate():
    p = load_params(REPO / "params.yaml")
    assert isinstance(p, Params)
    assert p.lora.r in p.sweep.ranks and p.seed not in p.sweep.seeds
    assert isinstance(p.lora.alpha, float), "ints in float fields are converted"


# --- keys -------------------------------------------------------------------------------------

@pytest.mark.parametrize("typo, meant, section", [
    ("rnak", "lora.r", "lora"),
    ("rank", "lora.r", "lora"),
    ("target_modules", "lora.targets", "lora"),
    ("lr_schedular", "train.lr_scheduler", "train"),
    ("n_trian", "data.n_train", "data"),
])
def test_unknown_key_suggests_the_right_one(typo, meant, section):
    raw = copy.deepcopy(REAL)
    raw[section][typo] = raw[section].pop(meant.split(".")[1])
    with pytest.raises(ParamsError) as exc:
        params_from_dict(raw)
    unknown, missing = exc.value.problems
    assert unknown.startswith(f"{section}.{typo}: unknown key (did you mean {meant}?); "
                              "valid keys: ")
    assert missing.startswith(f"{meant}: missing; add it to params.yaml")


def test_unknown_top_level_key_and_missing_section():
    raw = copy.deepcopy(REAL)
    raw["lroa"] = raw.pop("lora")
    with pytest.raises(ParamsError) as exc:
        params_from_dict(raw)
    assert exc.value.problems == [
        "lroa: unknown top-level key (did you mean lora?); valid keys: seed, base, data, quant, "
        "lora, train, sweep, compare, bench",
        "lora: missing section; add it to params.yaml with keys r, alpha, dropout, targets"]


def test_missing_key_names_its_type():
    assert only(problems_after(("train.lr", DELETE))) == \
        "train.lr: missing; add it to params.yaml (a number)"
    assert only(problems_after(("compare.max_new_tokens", DELETE))) == \
        "compare.max_new_tokens: missing; add it to params.yaml (an integer or 'auto')"


@pytest.mark.parametrize("value", ["auto", 1, 300])
def test_max_new_tokens_is_a_number_or_auto(value):
    raw = copy.deepcopy(REAL)
    raw["compare"]["max_new_tokens"] = value
    assert params_from_dict(raw).compare.max_new_tokens == value


def test_empty_section():
    assert only(problems_after(("quant", None))) == ("quant = None: must be a mapping with keys "
                                                     "type, double_quant, compute_dtype (the "
                                                     "section is empty)")


# --- types ------------------------------------------------------------------------------------

@pytest.mark.parametrize("key, value, message", [
    ("lora.r", "8", "lora.r = '8': must be an integer (remove the quotes)"),
    ("lora.r", True, "lora.r = True: must be an integer"),
    ("lora.r", 8.0, "lora.r = 8.0: must be an integer"),
    ("lora.alpha", "high", "lora.alpha = 'high': must be a number"),
    ("lora.alpha", float("nan"), "lora.alpha = nan: must be a finite number"),
    ("train.max_grad_norm", float("inf"), "train.max_grad_norm = inf: must be a finite number"),
    ("base.model", ["a", "b"], "base.model = ['a', 'b']: must be a string"),
    ("lora.targets", ["q_proj", "v_proj"], "lora.targets = ['q_proj', 'v_proj']: must be a "
                                           "string; write several names comma-separated, e.g. "
                                           "q_proj,v_proj"),
    ("quant.double_quant", "yes", "quant.double_quant = 'yes': must be true or false"),
    ("train.batch_size", None, "train.batch_size = None: must be an integer (the value is empty)"),
    ("sweep.ranks", [2, "4"], "sweep.ranks = [2, '4']: must be a list of integers"),
    ("sweep.ranks", 8, "sweep.ranks = 8: must be a list of integers"),
    ("seed", "42", "seed = '42': must be an integer (remove the quotes)"),
    ("compare.max_new_tokens", "16", "compare.max_new_tokens = '16': must be an integer or "
                                     "'auto' (remove the quotes)"),
    ("compare.max_new_tokens", "Auto", "compare.max_new_tokens = 'Auto': must be an integer or "
                                       "'auto' (did you mean 'auto'?)"),
    ("compare.max_new_tokens", 16.5, "compare.max_new_tokens = 16.5: must be an integer or "
                                     "'auto'"),
    ("compare.max_new_tokens", True, "compare.max_new_tokens = True: must be an integer or "
                                     "'auto'"),
    ("compare.max_new_tokens", None, "compare.max_new_tokens = None: must be an integer or "
                                     "'auto' (the value is empty)"),
    ("data.max_truncated_share", "5%", "data.max_truncated_share = '5%': must be a number"),
])
def test_wrong_type(key, value, message):
    assert only(problems_after((key, value))) == message


def test_long_values_are_abbreviated():
    line = only(problems_after(("train.max_steps", "x" * 10_000)))
    assert line.startswith("train.max_steps = 'xxx") and line.endswith("...: must be an integer")
    assert len(line) < 120


# --- ranges -----------------------------------------------------------------------------------

@pytest.mark.parametrize("key, value, valid", [
    ("lora.r", 0, "the rank must be a positive integer"),
    ("lora.r", -4, "the rank must be a positive integer"),
    ("lora.alpha", 0.0, "must be > 0"),
    ("lora.alpha", -16.0, "must be > 0"),
    ("lora.dropout", 1.0, "must be in [0, 1)"),
    ("lora.dropout", -0.1, "must be in [0, 1)"),
    ("data.n_train", 0, "must be a positive integer"),
    ("data.n_eval", -1, "must be a positive integer"),
    ("data.max_length", 8, "must be at least 16 tokens"),
    ("train.max_steps", 0, "must be a positive integer"),
    ("train.batch_size", 0, "must be a positive integer"),
    ("train.eval_every", 0, "must be a positive integer"),
    ("train.lr", 0.0, "must be in (0, 1)"),
    ("train.warmup_steps", -1, "must be >= 0"),
    ("train.threads", -2, "must be >= 0 (0 = all cores)"),
    ("compare.cos_threshold", 1.5, "must be in (0, 1]"),
    ("compare.max_new_tokens", 0, "must be a positive integer or auto"),
    ("data.max_truncated_share", 1.5, "must be in [0, 1] (a share of a split's examples)"),
    ("data.max_truncated_share", -0.1, "must be in [0, 1]"),
    ("compare.gen_batch_size", 0, "must be a positive integer"),
    ("compare.margin", 0.0, "must be > 0 (an equivalence margin in nats/token"),
    ("compare.margin", -0.05, "must be > 0"),
    ("compare.margin_exact_match", 0.0, "must be > 0 (an equivalence margin in exact-match"),
    ("compare.n_boot", 10, "must be an integer >= 200"),
    ("bench.steps", 0, "must be a positive integer"),
    ("seed", -1, "a seed must be in 0 .. 4294967295"),
    ("seed", 2**32, "a seed must be in 0 .. 4294967295"),
])
def test_out_of_range(key, value, valid):
    line = only(problems_after((key, value)))
    assert line.startswith(f"{key} = {value!r}: {valid}")


@pytest.mark.parametrize("value, message", [
    ([], "sweep.ranks = []: is empty; list at least one rank, e.g. [2, 4, 8, 16]"),
    ([2, 8, 8, 2], "sweep.ranks = [2, 8, 8, 2]: has duplicates (2, 8); list each once"),
    ([0, 8], "sweep.ranks = [0, 8]: contains 0: must be a positive integer"),
])
def test_sweep_ranks(value, message):
    assert only(problems_after(("sweep.ranks", value))) == message


def test_sweep_seeds():
    assert only(problems_after(("sweep.seeds", []))).startswith("sweep.seeds = []: is empty")
    assert only(problems_after(("sweep.seeds", [1, 1]))).startswith(
        "sweep.seeds = [1, 1]: has duplicates (1)")
    assert only(problems_after(("sweep.seeds", [-3]))).startswith(
        "sweep.seeds = [-3]: contains -3: a seed must be in 0 .. 4294967295")


def test_setting_seeds_fill_exactly_the_slots_dvc_yaml_names():
    assert only(problems_after(("sweep.setting_seeds", [5]))).startswith(
        "sweep.setting_seeds = [5]: lists 1 value(s), must list exactly 2: dvc.yaml's")
    assert only(problems_after(("sweep.setting_seeds", [5, 5]))).startswith(
        "sweep.setting_seeds = [5, 5]: has duplicates (5)")


@pytest.mark.parametrize("key, value, hint", [
    ("quant.type", "nf3", "must be one of nf4, fp4 (did you mean 'nf4'?)"),
    ("quant.compute_dtype", "bf16", "must be one of auto, bfloat16, float16, float32"),
    ("base.dtype", "float64", "must be one of auto, bfloat16, float16, float32"),
    ("train.lr_scheduler", "cosine_annealing", "must be one of constant, constant_with_warmup, "
                                               "linear, cosine (did you mean 'cosine'?)"),
    ("train.optimizer", "adamw", "must be one of auto, adamw_torch, paged_adamw_32bit"),
    ("base.model", "embedded:smollm2", "unknown embedded model (did you mean "
                                       "'embedded:smollm2-135m-instruct'?); embedded models: "
                                       "embedded:smollm2-135m-instruct, embedded:tiny-llama"),
    ("data.source", "embedded:prob", "unknown embedded data set (did you mean 'embedded:probe'?)"),
])
def test_unknown_choice(key, value, hint):
    assert only(problems_after((key, value))).startswith(f"{key} = {value!r}: {hint}")


# --- targets ----------------------------------------------------------------------------------

@pytest.mark.parametrize("value, hint", [
    ("qkv", "unknown target preset (did you mean 'qv'?); valid presets: qv, kv, attn, attn_mlp, "
            "all_linear, or a list of module names"),
    ("atn", "unknown target preset (did you mean 'attn'?)"),
    ("all-linear", "must be a preset (qv, kv, attn, attn_mlp, all_linear) (did you mean "
                   "'all_linear'?) or comma-separated module names without spaces"),
    ("q_proj, v_proj", "must be a preset"),
    ("q_proj,,v_proj", "must be a preset"),
    ("q_proj,", "must be a preset"),
    ("", "must be a preset"),
    ("q_proj,v_proj,q_proj", "has duplicate module names"),
])
def test_malformed_lora_targets(value, hint):
    # Only the form is checked here; names are checked against the model (test_errors.py).
    problems = problems_after(("lora.targets", value))
    assert problems[0].startswith(f"lora.targets = {value!r}: {hint}"), problems


@pytest.mark.parametrize("value", ["q_proj,v_proj", "q_proj", "c_attn", "attn.c_proj",
                                   "query_key_value", "dense,query_key_value", "all_linear"])
def test_module_names_pass_the_form_check(value):
    raw = copy.deepcopy(REAL)
    raw["lora"]["targets"] = value
    assert params_from_dict(raw).lora.targets == value


def test_sweep_targets_must_be_presets():
    assert only(problems_after(("sweep.targets", ["kv", "atn"]))).startswith(
        "sweep.targets = ['kv', 'atn']: contains 'atn': unknown target preset "
        "(did you mean 'attn'?)")
    assert only(problems_after(("sweep.targets", ["kv", "kv"]))).startswith(
        "sweep.targets = ['kv', 'kv']: has duplicates ('kv')")


# --- relations --------------------------------------------------------------------------------

@pytest.mark.parametrize("edits, message", [
    ([("lora.r", 32)], "lora.r = 32 is not in sweep.ranks [2, 4, 8, 16]: the headline "
                       "comparison uses the rank-sweep runs at lora.r, so add it to sweep.ranks"),
    ([("sweep.seeds", [3, 42])], "sweep.seeds [3, 42] contains the main seed 42: list only the "
                                 "extra seeds of the noise-floor runs"),
    ([("sweep.setting_seeds", [42, 5])], "sweep.setting_seeds [42, 5] contains the main seed 42"),
    ([("sweep.setting_seeds", [5, 4])], "sweep.seeds [3, 4] and sweep.setting_seeds [5, 4] share [4]"),
    ([("sweep.targets", ["qv", "kv"])], "sweep.targets ['qv', 'kv'] contains lora.targets ('qv')"),
    ([("data.n_eval", 64), ("compare.n_generate", 65)],
     "compare.n_generate = 65 is larger than data.n_eval = 64"),
    ([("compare.subspace_k", 3)], "compare.subspace_k = 3 is larger than the smallest rank in "
                                  "sweep.ranks (2)"),
    ([("train.max_steps", 40), ("train.warmup_steps", 40)], "train.warmup_steps = 40: must be smaller than "
                                   "train.max_steps (40)"),
    ([("bench.warmup_steps", 12)], "bench.warmup_steps = 12 must be smaller than bench.steps = 12"),
])
def test_relations(edits, message):
    assert only(problems_after(*edits)).startswith(message)


def test_eval_split_rule_on_the_prepared_split():
    """compare.n_generate <= data.n_eval again, against the prepared eval split, which may come
    from other params (training, compare and bench call this)."""
    eval_file = Path("data/prepared/eval.jsonl")
    require_eval_examples("compare.n_generate", 47, 47, eval_file)  # all of them: fine
    with pytest.raises(UserError) as exc:
        require_eval_examples("compare.n_generate", 50, 47, eval_file)
    assert str(exc.value) == ("compare.n_generate = 50 is larger than the eval split (47 examples "
                              "in data/prepared/eval.jsonl)")
    with pytest.raises(UserError, match=r"^bench\.gen_examples = 33 is larger than the eval "):
        require_eval_examples("bench.gen_examples", 33, 32, eval_file)


def test_relation_is_not_repeated_for_an_invalid_key():
    """lora.r = 0 is reported once, as a bad rank, not again as 'not in sweep.ranks'."""
    assert only(problems_after(("lora.r", 0))).startswith("lora.r = 0: the rank must be")


def test_all_problems_reported_at_once_one_line_each():
    raw = copy.deepcopy(REAL)
    raw["lora"]["rnak"] = raw["lora"].pop("r")
    raw["lora"]["dropout"] = 1.5
    raw["quant"]["type"] = "nf3"
    raw["train"]["batch_size"] = "8"
    raw["train"]["lr"] = -1.0
    raw["sweep"]["ranks"] = [4, 4]
    raw["compare"]["n_generate"] = 1000
    with pytest.raises(ParamsError) as exc:
        params_from_dict(raw)
    keys = ["quant.type", "lora.rnak", "lora.r", "lora.dropout", "train.batch_size", "train.lr",
            "sweep.ranks", "compare.n_generate"]
    assert [p.split(":")[0].split(" ")[0] for p in exc.value.problems] == keys
    lines = str(exc.value).splitlines()
    assert lines[0] == f"params.yaml has {len(keys)} problem(s):"
    assert lines[1:] == [f"  - {p}" for p in exc.value.problems]


# --- the file ---------------------------------------------------------------------------------

def write_params(tmp_path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_bad_yaml_names_the_line(tmp_path):
    text = (REPO / "params.yaml").read_text().replace("  alpha: 16", "  alpha: [16", 1)
    lineno = next(i for i, line in enumerate(text.splitlines(), 1) if "alpha: [16" in line)
    # The parser notices the unclosed list a line late; the message also names where it began.
    with pytest.raises(UserError, match=rf"params\.yaml line {lineno + 1}: not valid YAML "
                                        rf"\(expected ',' or '\]', but got '<scalar>'; while "
                                        rf"parsing a flow sequence on line {lineno}\)"):
        load_params(write_params(tmp_path, text))


def test_duplicate_key_names_both_lines(tmp_path):
    text = "seed: 1\nlora:\n  r: 4\n  alpha: 8\n  r: 8\n"
    with pytest.raises(UserError, match=r"params\.yaml line 5: not valid YAML \(duplicate key "
                                        r"'r' \(first on line 3\)"):
        load_params(write_params(tmp_path, text))


def test_exponent_floats_read_like_dvc(tmp_path):
    """YAML 1.1 (PyYAML) reads 1e-3 as a string; DVC's YAML 1.2 reader as a float. We agree
    with DVC, so `lr: 1e-3` is a number."""
    text = re.sub(r"(?m)^  lr: \S+", "  lr: 3e-3", (REPO / "params.yaml").read_text(), count=1)
    assert "lr: 3e-3" in text
    assert load_params(write_params(tmp_path, text)).train.lr == 0.003


def test_duplicate_key_names_its_first_line_not_the_mapping_start(tmp_path):
    text = "seed: 1\nlora:\n  alpha: 8\n  r: 4\n  dropout: 0.1\n  r: 8\n"
    with pytest.raises(UserError) as exc:
        load_params(write_params(tmp_path, text))
    assert str(exc.value).endswith("params.yaml line 6: not valid YAML (duplicate key 'r' (first "
                                   "on line 4); each key may appear once)")


# (scalar as written, the value YAML 1.2 gives). PyYAML (YAML 1.1) read the rows marked * as
# something else (yes -> True, 010 -> 8, 0o10 -> '0o10', 1:30 -> 90), while DVC, which
# substitutes params into dvc.yaml and records them in dvc.lock, reads them as here.
YAML_1_2 = [("1e-3", 0.001), ("2.0e-3", 0.002), ("+1e-3", 0.001), (".5e-3", 0.0005),
            ("1E3", 1000.0), ("-.5e2", "-.5e2"), ("yes", "yes"), ("off", "off"), ("TRUE", True),
            ("010", 10), ("0o10", 8), ("0x1F", 31), ("1_000", 1000), ("1:30", "1:30"),
            (".inf", float("inf")), ("~", None), ("y", "y")]


@pytest.mark.parametrize("scalar, value", YAML_1_2)
def test_scalars_read_as_dvc_reads_them(scalar, value):
    from dvc.utils.serialize import parse_yaml

    text = f"x: {scalar}\n"
    ours, dvcs = read_yaml(Path("params.yaml"), text)["x"], parse_yaml(text, "params.yaml")["x"]
    assert (ours, type(ours)) == (value, type(value)) == (dvcs, type(dvcs))


def test_yaml_1_1_boolean_word_is_not_a_boolean():
    """`double_quant: yes` was True for PyYAML but the string 'yes' for DVC: now it is an error."""
    assert only(problems_after(("quant.double_quant", read_yaml(Path("p"), "x: yes")["x"]))) == \
        "quant.double_quant = 'yes': must be true or false"


def test_duplicates_dvc_rejects_too(tmp_path):
    from dvc.utils.serialize import YAMLFileCorruptedError, parse_yaml

    text = "seed: 1\nseed: 2\n"
    with pytest.raises(YAMLFileCorruptedError):
        parse_yaml(text, "params.yaml")
    with pytest.raises(UserError, match=r"^\S+params\.yaml line 2: not valid YAML \(duplicate key "
                                        r"'seed' \(first on line 1\); each key may appear once\)$"):
        load_params(write_params(tmp_path, text))


def test_unreadable_character_and_deep_nesting_are_one_line(tmp_path):
    with pytest.raises(UserError) as exc:
        load_params(write_params(tmp_path, "seed: 1\nlora:\n  r: \x01\n"))
    assert str(exc.value).endswith("params.yaml line 3: not valid YAML (unacceptable character "
                                   "#x0001: special characters are not allowed)")
    with pytest.raises(UserError) as exc:
        load_params(write_params(tmp_path, "seed: " + "[" * 5000))
    assert str(exc.value).endswith("params.yaml: cannot be read (lists or mappings nested too "
                                   "deeply); params.yaml holds sections of keys, two levels deep")


def test_missing_empty_and_non_mapping_file(tmp_path):
    with pytest.raises(UserError, match=r"nope\.yaml: file not found"):
        load_params(tmp_path / "nope.yaml")
    with pytest.raises(ParamsError, match="the file must be a mapping with keys seed, base, .*; "
                                          "it is empty"):
        load_params(write_params(tmp_path, "# nothing\n"))
    with pytest.raises(ParamsError, match=r"must be a mapping .*; got \[1, 2\]"):
        load_params(write_params(tmp_path, "[1, 2]\n"))
    with pytest.raises(UserError, match="cannot read it"):
        load_params(tmp_path)  # a directory


# --- the dataclasses --------------------------------------------------------------------------

def test_every_field_has_a_docstring():
    """litgpt's convention: a string right under each field says what the value means (the
    sections of Params are documented by their classes)."""
    tree = ast.parse(Path(params_module.__file__).read_text())
    hints = typing.get_type_hints(Params)
    sections = {name for name, tp in hints.items() if dataclasses.is_dataclass(tp)}
    leaves = len(hints) - len(sections) + sum(len(dataclasses.fields(hints[s])) for s in sections)
    undocumented, n_fields = [], 0
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        for stmt, after in zip(cls.body, cls.body[1:] + [None]):
            if not isinstance(stmt, ast.AnnAssign) or (cls.name == "Params" and
                                                       stmt.target.id in sections):
                continue
            n_fields += 1
            if not (isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str) and after.value.value.strip()):
                undocumented.append(f"{cls.name}.{stmt.target.id}")
    assert undocumented == [] and n_fields == leaves == 48


# --- command line -----------------------------------------------------------------------------

BAD = (REPO / "params.yaml").read_text().replace("  r: 8 ", "  rnak: 8 ", 1)


def run(args, cwd, debug=False):
    env = {k: v for k, v in os.environ.items() if k != "QLORA_DIAG_DEBUG"}
    if debug:
        env["QLORA_DIAG_DEBUG"] = "1"
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_check_params_command(tmp_path):
    assert "rnak" in BAD
    write_params(tmp_path, BAD)
    proc = run(["-m", "qlora_diag.check_params", "params.yaml"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: params.yaml has 2 problem(s):\n"
                                  "  - lora.rnak: unknown key (did you mean lora.r?)")
    assert "Traceback" not in proc.stderr and proc.stdout == ""

    debug = run(["-m", "qlora_diag.check_params", "params.yaml"], tmp_path, debug=True)
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr and "ParamsError" in debug.stderr

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    ok = run(["-m", "qlora_diag.check_params", "params.yaml"], tmp_path)
    assert ok.returncode == 0 and ok.stdout.startswith("params.yaml: ok (models/base not built")


def test_stage_fails_fast_without_traceback(tmp_path):
    """A stage checks params before any work: exit 2 and the message, nothing written."""
    write_params(tmp_path, BAD)
    proc = run([str(REPO / "stages/prepare.py")], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: params.yaml has 2 problem(s):")
    assert "lora.rnak" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
