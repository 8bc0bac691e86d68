"""Data sources, errors on bad input, the split, tokenization with a response-only mask."""
import json
import re

import pytest

from qlora_diag.core.errors import UserError
from qlora_diag.data.probe import generate_probe
from qlora_diag.data.sources import format_prompt, load_examples
from qlora_diag.data.splits import (
    load_split,
    prepare_dataset,
    split_examples,
    tokenize_example,
)

RECORDS = [
    {"instruction": "Say hi.", "output": "hi"},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "task": "math"},
    {"instruction": "Name a color.", "input": "", "output": "blue", "extra": 1},
]


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def write_json(path, obj):
    path.write_text(json.dumps(obj, indent=1))
    return str(path)


def examples(n):
    return [{"instruction": f"Repeat {i}.", "input": "", "output": str(i), "task": "t"}
            for i in range(n)]


# --- prompt -----------------------------------------------------------------------------------

def test_prompt_with_and_without_input():
    with_input = format_prompt("Add the numbers.", "2 and 3")
    assert "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n" in with_input
    assert with_input.startswith("Below is an instruction that describes a task, paired with an "
                                 "input that provides further context.")
    without = format_prompt("Say hi.", "")
    assert "### Input:" not in without
    assert without.startswith("Below is an instruction that describes a task. Write a response")
    assert with_input.endswith("### Response:\n") and without.endswith("### Response:\n")


# --- sources ----------------------------------------------------------------------------------

def test_probe_source_generates_exactly_n():
    assert load_examples("embedded:probe", 50, seed=4) == generate_probe(50, seed=4)


def test_unknown_embedded_source():
    with pytest.raises(UserError, match="unknown embedded data set.*embedded:probe"):
        load_examples("embedded:nope", 10, seed=0)


def test_jsonl_source_with_defaults_and_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(RECORDS[0]), "",
                                              json.dumps(RECORDS[1]), json.dumps(RECORDS[2])])
    got = load_examples(path, 99, seed=0)
    assert got == [
        {"instruction": "Say hi.", "input": "", "output": "hi", "task": "alpaca"},
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "task": "math"},
        {"instruction": "Name a color.", "input": "", "output": "blue", "task": "alpaca"},
    ]


def test_json_source_equals_jsonl_source(tmp_path):
    a = load_examples(write_json(tmp_path / "d.json", RECORDS), 3, seed=0)
    b = load_examples(write_jsonl(tmp_path / "d.jsonl", [json.dumps(r) for r in RECORDS]), 3,
                      seed=0)
    assert a == b


@pytest.mark.parametrize("name", ["missing.json", "missing.jsonl"])
def test_missing_file(tmp_path, name):
    with pytest.raises(UserError, match=rf"{name}'?: file not found.*embedded:probe"):
        load_examples(str(tmp_path / name), 3, seed=0)


def test_directory_and_binary_file(tmp_path):
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(UserError, match="is a directory"):
        load_examples(str(tmp_path / "dir.jsonl"), 3, seed=0)
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UserError, match="bin.json.*cannot read.*UTF-8"):
        load_examples(str(tmp_path / "bin.json"), 3, seed=0)


def test_malformed_jsonl_names_the_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [json.dumps(RECORDS[0]), json.dumps(RECORDS[1]),
                                                '{"instruction": "x", "output": }'])
    with pytest.raises(UserError, match=r"bad\.jsonl line 3: not valid JSON .*column 32") as exc:
        load_examples(path, 3, seed=0)
    assert "Traceback" not in str(exc.value)


def test_malformed_json_names_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"instruction": "x", "output": "y"},\n  {"instruction": "x",,}\n]\n')
    with pytest.raises(UserError,
                       match=r"bad\.json line 3 column 23: not valid JSON \(Expecting property name"):
        load_examples(str(path), 3, seed=0)


def test_json_top_level_must_be_a_list(tmp_path):
    path = write_json(tmp_path / "obj.json", {"instruction": "x", "output": "y"})
    with pytest.raises(UserError, match=r"obj\.json: the top level is a dict, not a list"):
        load_examples(path, 3, seed=0)


@pytest.mark.parametrize("content, message", [
    ("", "holds no records"),
    ("\n\n", "holds no records"),
])
def test_empty_jsonl(tmp_path, content, message):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=rf"empty\.jsonl: {message}"):
        load_examples(str(path), 3, seed=0)


def test_empty_json_list(tmp_path):
    with pytest.raises(UserError, match=r"e\.json: the list is empty"):
        load_examples(write_json(tmp_path / "e.json", []), 3, seed=0)


@pytest.mark.parametrize("bad, message", [
    (["not", "an", "object"], r"line 2: is a list, not a JSON object"),
    ({"instruction": "x"}, r"line 2: missing key 'output'"),
    ({"output": "x"}, r"line 2: missing key 'instruction'"),
    ({"instruction": 5, "output": "x"}, r"line 2: key 'instruction' is a int \(5\), not a string"),
    ({"instruction": "x", "output": "y", "input": None},
     r"line 2: key 'input' is a NoneType \(null\), not a string"),
    ({"instruction": "x", "output": "  "}, r"line 2: key 'output' is empty"),
    ({"instruction": "", "output": "y"}, r"line 2: key 'instruction' is empty"),
    ({"instruction": "x", "output": "y", "task": ""}, r"line 2: key 'task' is empty"),
])
def test_bad_jsonl_record_names_file_line_and_key(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "recs.jsonl", [json.dumps(RECORDS[0]), json.dumps(bad)])
    with pytest.raises(UserError, match=rf"recs\.jsonl {message}") as exc:
        load_examples(path, 3, seed=0)
    assert "instruction (string), output (non-empty string)" in str(exc.value) \
        or "empty" in str(exc.value)


def test_bad_json_record_names_its_position(tmp_path):
    path = write_json(tmp_path / "recs.json", [RECORDS[0], RECORDS[1], {"instruction": "x",
                                                                        "output": ""}])
    with pytest.raises(UserError, match=r"recs\.json record 3: key 'output' is empty"):
        load_examples(path, 3, seed=0)


def test_unreachable_hub_id_says_offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as exc:
        load_examples("no-such-org/no-such-dataset", 10, seed=0)
    msg = str(exc.value)
    assert "data.source = 'no-such-org/no-such-dataset'" in msg
    assert "offline" in msg
    for kind in ("embedded:probe", ".json", ".jsonl", "Hugging Face data set id"):
        assert kind in msg
    assert "\n" not in msg


# --- split ------------------------------------------------------------------------------------

def test_split_is_deterministic_disjoint_and_sized():
    data = examples(100)
    train, ev = split_examples(data, n_train=60, n_eval=30, seed=1)
    assert (train, ev) == split_examples(data, n_train=60, n_eval=30, seed=1)
    assert len(train) == 60 and len(ev) == 30
    train_ids, eval_ids = {e["id"] for e in train}, {e["id"] for e in ev}
    assert len(train_ids) == 60 and len(eval_ids) == 30 and not train_ids & eval_ids
    assert {e["output"] for e in train}.isdisjoint({e["output"] for e in ev})
    assert split_examples(data, n_train=60, n_eval=30, seed=2) != (train, ev)
    assert "id" not in data[0]


def test_split_ids_are_source_positions():
    data = examples(20)
    train, ev = split_examples(data, n_train=10, n_eval=5, seed=3)
    for e in train + ev:
        assert e["output"] == str(int(e["id"]))


def test_growing_train_keeps_eval():
    data = examples(100)
    _, ev_small = split_examples(data, n_train=10, n_eval=20, seed=5)
    _, ev_big = split_examples(data, n_train=70, n_eval=20, seed=5)
    assert ev_small == ev_big


def test_split_too_large_names_both_numbers():
    with pytest.raises(UserError, match=r"data.n_train \+ data.n_eval = 8 \+ 4 = 12 .* "
                                        r"provides only 10"):
        split_examples(examples(10), n_train=8, n_eval=4, seed=0)


# --- tokenization -----------------------------------------------------------------------------

EX = {"instruction": "What is the capital of Veloria?", "input": "", "output": "Marsten",
      "task": "capital"}


def test_tokenizer_adds_no_bos(tiny_tokenizer):
    # tokenize_example relies on this: the SmolLM2 tokenizer adds no special tokens itself.
    text = "Below is an instruction"
    assert tiny_tokenizer(text)["input_ids"] == \
        tiny_tokenizer(text, add_special_tokens=False)["input_ids"]


def test_tokenize_mask_boundary_and_eos(tiny_tokenizer):
    tok = tokenize_example(EX, tiny_tokenizer, max_length=128)
    prompt = tiny_tokenizer(format_prompt(EX["instruction"], ""),
                            add_special_tokens=False)["input_ids"]
    response = tiny_tokenizer("Marsten", add_special_tokens=False)["input_ids"]
    assert tok["n_prompt"] == len(prompt)
    assert tok["input_ids"] == prompt + response + [tiny_tokenizer.eos_token_id]
    assert tok["truncated"] is False
    assert tiny_tokenizer.decode(tok["input_ids"][tok["n_prompt"]:],
                                 skip_special_tokens=True) == "Marsten"


def test_tokenize_truncates_response_then_drops(tiny_tokenizer):
    full = tokenize_example(EX, tiny_tokenizer, max_length=128)
    n_prompt, n_total = full["n_prompt"], len(full["input_ids"])
    assert n_total - n_prompt >= 2
    cut = tokenize_example(EX, tiny_tokenizer, max_length=n_prompt + 1)
    assert cut["truncated"] is True
    assert cut["input_ids"] == full["input_ids"][:n_prompt + 1]
    assert cut["input_ids"][-1] != tiny_tokenizer.eos_token_id
    assert tokenize_example(EX, tiny_tokenizer, max_length=n_total)["truncated"] is False
    assert tokenize_example(EX, tiny_tokenizer, max_length=n_prompt) is None


# --- prepare end to end -----------------------------------------------------------------------

def test_prepare_dataset_probe(tiny_tokenizer, tmp_path):
    out = tmp_path / "prepared"
    stats = prepare_dataset(source="embedded:probe", n_train=40, n_eval=20, max_length=128,
                            seed=42, tokenizer=tiny_tokenizer, out_dir=out)
    train, ev = load_split(out / "train.jsonl"), load_split(out / "eval.jsonl")
    assert len(train) == 40 and len(ev) == 20
    assert set(train[0]) == {"id", "task", "instruction", "input", "output", "prompt",
                             "input_ids", "n_prompt", "truncated"}
    assert not {r["id"] for r in train} & {r["id"] for r in ev}
    for r in train + ev:
        assert r["prompt"] == format_prompt(r["instruction"], r["input"])
        assert r["input_ids"][-1] == tiny_tokenizer.eos_token_id
    assert stats["source"] == "embedded:probe" and stats["n_available"] == 60
    s = stats["splits"]["train"]
    assert s["n"] == 40 and s["n_dropped"] == 0 and s["n_truncated"] == 0
    assert sum(s["tasks"].values()) == 40
    assert set(s["tokens"]) == {"prompt", "response", "total"}
    assert set(s["tokens"]["total"]) == {"mean", "p50", "p95", "max"}
    assert s["tokens"]["total"]["max"] == max(len(r["input_ids"]) for r in train)
    assert s["tokens"]["response"]["max"] == max(len(r["input_ids"]) - r["n_prompt"]
                                                 for r in train)
    again = tmp_path / "again"
    prepare_dataset(source="embedded:probe", n_train=40, n_eval=20, max_length=128, seed=42,
                    tokenizer=tiny_tokenizer, out_dir=again)
    assert (again / "train.jsonl").read_bytes() == (out / "train.jsonl").read_bytes()


def test_prepare_replaces_long_prompts_and_counts_truncated(tiny_tokenizer, tmp_path):
    """6 examples with a short prompt and a long answer, 6 whose prompt alone fills max_length:
    a 4 + 2 split takes the 6 that fit (replacing each long prompt it draws) and cuts each
    answer; before issue 15 the long prompts were dropped after the split, leaving fewer."""
    long_prompt = "word " * 60
    records = [{"instruction": f"Say hi {i}.", "output": "hi " * 40} for i in range(6)] + \
              [{"instruction": long_prompt, "output": "x"}] * 6
    path = write_json(tmp_path / "d.json", records)
    stats = prepare_dataset(source=path, n_train=4, n_eval=2, max_length=48, seed=0,
                            tokenizer=tiny_tokenizer, out_dir=tmp_path / "out")
    splits = stats["splits"]
    assert (splits["train"]["n"], splits["eval"]["n"]) == (4, 2)
    assert splits["train"]["n_truncated"] == 4 and splits["eval"]["n_truncated"] == 2
    assert splits["train"]["truncated_share"] == splits["eval"]["truncated_share"] == 1.0
    # the walk stops once both splits are full, so it may not reach every long prompt
    assert 1 <= splits["train"]["n_dropped"] + splits["eval"]["n_dropped"] <= 6
    rows = load_split(tmp_path / "out" / "train.jsonl") + load_split(tmp_path / "out" / "eval.jsonl")
    assert sorted(r["instruction"] for r in rows) == [f"Say hi {i}." for i in range(6)]
    for r in rows:
        assert len(r["input_ids"]) == 48 and r["truncated"]


def test_prepare_too_few_fit_names_the_numbers_and_writes_nothing(tiny_tokenizer, tmp_path):
    """7 of 12 prompts fit in 48 tokens, 10 are needed; the error says so and names the
    max_length at which 10 fit -- and that length does work, one less does not."""
    short = [{"instruction": f"Say hi {i}.", "output": "hi"} for i in range(7)]
    # prompts of growing length, all longer than 48 tokens
    long = [{"instruction": "word " * (40 + 10 * k), "output": "x"} for k in range(5)]
    path = write_json(tmp_path / "d.json", short + long)
    out = tmp_path / "prepared"
    with pytest.raises(UserError) as exc:
        prepare_dataset(source=path, n_train=7, n_eval=3, max_length=48, seed=0,
                        tokenizer=tiny_tokenizer, out_dir=out)
    msg = str(exc.value)
    assert msg.startswith("data.max_length = 48: only 7 of the 12 examples of data.source have a "
                          "prompt shorter than that")
    assert "data.n_train + data.n_eval = 7 + 3 = 10 are needed" in msg
    assert "lower data.n_train + data.n_eval to at most 7" in msg and "\n" not in msg
    enough = int(re.search(r"Raise data.max_length to at least (\d+) \(then 10 fit\)",
                           msg).group(1))
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["d.json"]
    with pytest.raises(UserError, match=rf"data.max_length = {enough - 1}: only 9 of the 12"):
        prepare_dataset(source=path, n_train=7, n_eval=3, max_length=enough - 1, seed=0,
                        tokenizer=tiny_tokenizer, out_dir=out)
    stats = prepare_dataset(source=path, n_train=7, n_eval=3, max_length=enough, seed=0,
                            tokenizer=tiny_tokenizer, out_dir=out)
    assert (stats["splits"]["train"]["n"], stats["splits"]["eval"]["n"]) == (7, 3)


def test_probe_too_long_for_max_length_fails_before_writing(tiny_tokenizer, tmp_path):
    """embedded:probe generates exactly n_train + n_eval examples: nothing to replace with."""
    out = tmp_path / "prepared"
    with pytest.raises(UserError, match=r"data.max_length = 16: only 0 of the 15 examples .* "
                                        r"7 \+ 8 = 15 are needed.*Raise data.max_length to at "
                                        r"least \d+ \(then 15 fit\)"):
        prepare_dataset(source="embedded:probe", n_train=7, n_eval=8, max_length=16, seed=0,
                        tokenizer=tiny_tokenizer, out_dir=out)
    assert list(tmp_path.iterdir()) == []


def test_load_split_errors(tmp_path):
    with pytest.raises(UserError, match="prepared split not found.*dvc repro prepare"):
        load_split(tmp_path / "train.jsonl")
    (tmp_path / "eval.jsonl").write_text('{"id": "1"}\n{broken\n')
    with pytest.raises(UserError, match=r"eval\.jsonl line 2: corrupt prepared split"):
        load_split(tmp_path / "eval.jsonl")


def test_eval_split_is_stratified_by_task():
    from collections import Counter

    from qlora_diag.data.probe import TASKS, generate_probe
    from qlora_diag.data.splits import split_examples

    train, evals = split_examples(generate_probe(400, seed=3), n_train=300, n_eval=64, seed=3)
    counts = Counter(e["task"] for e in evals)
    assert set(counts) == set(TASKS)
    assert max(counts.values()) - min(counts.values()) <= 1
    assert not {e["id"] for e in evals} & {e["id"] for e in train}
