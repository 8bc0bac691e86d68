"""Issue 15 on the data side: exact split sizes with replacement, truncation reported and warned
about, compare.max_new_tokens = auto, BOS for tokenizers that expect one, and the whole prepare
stage on an Alpaca-shaped file at the default params."""
from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qlora_diag.core.errors import UserError
from qlora_diag.data.lengths import covering_length, truncation_warning
from qlora_diag.data.resolved import (
    max_new_tokens_warning,
    read_max_new_tokens,
    resolve_max_new_tokens,
    write_resolved,
)
from qlora_diag.data.sources import format_prompt
from qlora_diag.data.splits import (
    bos_prefix,
    load_split,
    prepare_dataset,
    select_examples,
    split_examples,
    tokenize_example,
)

REPO = Path(__file__).resolve().parents[1]


def examples(n, tasks=("t",)):
    return [{"instruction": f"Repeat {i}.", "input": "", "output": str(i),
             "task": tasks[i % len(tasks)]} for i in range(n)]


# --- the length that covers a share of examples -----------------------------------------------

@pytest.mark.parametrize("values, share, expected", [
    (list(range(1, 21)), 0.95, 19),     # 19 of 20 values are <= 19, 18 of 20 are <= 18
    (list(range(1, 101)), 0.95, 95),
    (list(range(100, 0, -1)), 0.95, 95),  # order does not matter
    ([7], 0.95, 7),
    ([3, 3, 3, 50], 0.75, 3),           # 3 of 4 fit in 3
    ([3, 3, 3, 50], 0.76, 50),
    ([1, 2, 3], 1.0, 3),
])
def test_covering_length_known_answers(values, share, expected):
    assert covering_length(values, share) == expected


def test_covering_length_rejects_nothing_to_cover():
    with pytest.raises(ValueError):
        covering_length([])
    with pytest.raises(ValueError):
        covering_length([1, 2], 0.0)


# --- replacement in the seeded order -----------------------------------------------------------

def test_replacement_takes_the_next_examples_of_the_seeded_order():
    """One task, so the split is a plain seeded order: that order (from split_examples with every
    example in eval) with the rejected positions struck out gives eval, then train."""
    data = examples(30)
    order = [int(e["id"]) for e in split_examples(data, n_train=0, n_eval=30, seed=7)[1]]
    rejected = {order[0], order[2], order[9], order[10]}
    picked = select_examples(data, n_train=8, n_eval=4, seed=7, fits=lambda i: i not in rejected)
    kept = [i for i in order if i not in rejected]
    assert picked.eval == kept[:4] and picked.train == kept[4:12]
    # eval is order[1, 3, 4, 5], after drawing order[0] and order[2]; train draws order[9, 10]
    assert (picked.skipped_eval, picked.skipped_train) == (2, 2)


def test_replacement_keeps_the_fitting_picks_and_the_task_balance():
    data = examples(200, tasks=("a", "b", "c", "d"))
    train, ev = split_examples(data, n_train=80, n_eval=20, seed=3)
    plain_train, plain_eval = [int(e["id"]) for e in train], [int(e["id"]) for e in ev]
    rejected = set(random.Random(0).sample(range(200), 40))
    picked = select_examples(data, 80, 20, seed=3, fits=lambda i: i not in rejected)
    assert len(picked.eval) == 20 and len(picked.train) == 80
    assert not rejected & set(picked.eval + picked.train)
    assert not set(picked.eval) & set(picked.train)
    # the eval slots keep their tasks (round robin); within a task, the examples that fit come
    # first in their order, then the task's next examples replace the rejected ones
    assert [data[i]["task"] for i in picked.eval] == [data[i]["task"] for i in plain_eval]
    assert len(rejected & set(plain_eval)) >= 1
    for task in "abcd":
        fitting = [i for i in plain_eval if data[i]["task"] == task and i not in rejected]
        assert [i for i in picked.eval if data[i]["task"] == task][:len(fitting)] == fitting
    # a fitting train example stays in train, unless eval took it as a replacement
    assert {i for i in plain_train if i not in rejected} <= set(picked.train) | set(picked.eval)
    assert picked == select_examples(data, 80, 20, seed=3, fits=lambda i: i not in rejected)


def test_without_rejections_the_split_is_unchanged():
    data = examples(100, tasks=("a", "b", "c"))
    train, ev = split_examples(data, n_train=50, n_eval=30, seed=5)
    picked = select_examples(data, 50, 30, seed=5, fits=lambda i: True)
    assert picked.train == [int(e["id"]) for e in train]
    assert picked.eval == [int(e["id"]) for e in ev]
    assert (picked.skipped_train, picked.skipped_eval) == (0, 0)


def test_default_params_prepare_the_reference_bytes(tiny_tokenizer, tmp_path):
    """The default data (probe, 160 + 50, max_length 128, seed 42, SmolLM2's tokenizer) needs no
    replacement and no BOS: the prepared files are byte for byte those of the reference run
    (data/prepared md5 e734fb37... in dvc.lock before issue 15), and every number
    reports/data.json held then is unchanged (issue 15 only appends keys). The test tokenizer is
    SmolLM2's (conftest), as in models/base."""
    stats = prepare_dataset(source="embedded:probe", n_train=160, n_eval=50, max_length=128,
                            seed=42, tokenizer=tiny_tokenizer, out_dir=tmp_path)
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()}
    assert digest == {
        "train.jsonl": "fa9f6edf3e10a46ce64afbe794ef40bc1b3b126f94ec0b6c98c6f94bc375db27",
        "eval.jsonl": "cf79cff720db274a6e8415675513d56329af8b95c6a7a254360b6bec6ceafbc2"}
    # reports/data.json of that run (md5 from the dvc.lock of then)
    before = REPO / "tests/data/data_json_before_issue15.json"
    assert hashlib.md5(before.read_bytes()).hexdigest() == "26e0a5924512d2daa159fbe22845e686"
    reference = json.loads(before.read_text())
    assert _restricted(stats, reference) == reference


def _restricted(new, old):
    """``new`` cut down to the keys of ``old``, recursively, in old's order."""
    if isinstance(old, dict):
        return {k: _restricted(new[k], old[k]) for k in old}
    return new


# --- truncation warning --------------------------------------------------------------------------

def split_stats(n, n_truncated, total_p95, total_max):
    return {"n": n, "n_truncated": n_truncated, "truncated_share": round(n_truncated / n, 4),
            "nearest_rank_p95": {"total": total_p95},
            "untruncated": {"total": {"max": total_max}}}


def test_truncation_warning_names_counts_share_and_length():
    splits = {"train": split_stats(160, 88, 310, 402), "eval": split_stats(50, 2, 290, 350)}
    msg = truncation_warning(splits, max_length=128, max_share=0.05)
    assert msg.startswith("warning: 88 of 160 train examples (55.0 %) have their response cut at "
                          "data.max_length = 128 tokens, more than data.max_truncated_share = "
                          "0.05;")
    assert "eval" not in msg.split(";")[0]  # 4 % of eval is within the share
    assert "data.max_length = 310 would hold 95 % of the examples of every split whole" in msg
    assert "\n" not in msg
    both = truncation_warning(splits, max_length=128, max_share=0.03)
    assert both.startswith("warning: 88 of 160 train examples (55.0 %) and 2 of 50 eval "
                           "examples (4.0 %) have")
    assert truncation_warning(splits, max_length=128, max_share=0.6) is None
    assert truncation_warning(splits, max_length=128, max_share=1.0) is None


def test_truncation_warning_below_five_percent_suggests_the_longest():
    """With a share below 5 %, the 95th percentile may already fit; then the longest counts."""
    splits = {"train": split_stats(100, 2, 120, 140), "eval": split_stats(50, 0, 100, 110)}
    msg = truncation_warning(splits, max_length=128, max_share=0.0)
    assert "2 of 100 train examples (2.0 %)" in msg
    assert msg.endswith("data.max_length = 140 would hold every example whole.")


# --- compare.max_new_tokens = auto ------------------------------------------------------------

def test_auto_resolves_to_the_train_response_p95_and_a_number_stays():
    train = {"nearest_rank_p95": {"response": 217}}
    assert resolve_max_new_tokens("auto", train)["value"] == 217
    fixed = resolve_max_new_tokens(16, train)
    assert (fixed["setting"], fixed["value"], fixed["train_response_p95"]) == (16, 16, 217)


def test_fixed_max_new_tokens_shorter_than_the_answers_is_warned_about():
    probe = resolve_max_new_tokens(16, {"nearest_rank_p95": {"response": 15}})
    assert max_new_tokens_warning(probe) is None  # the default data: answers <= 15 with eos
    assert max_new_tokens_warning(resolve_max_new_tokens(
        16, {"nearest_rank_p95": {"response": 16}})) is None
    msg = max_new_tokens_warning(resolve_max_new_tokens(16, {"nearest_rank_p95":
                                                             {"response": 217}}))
    assert msg == ("warning: compare.max_new_tokens = 16 is shorter than the 217 tokens (eos "
                   "included) that 95 % of the train split's responses take; generation stops "
                   "there, so longer answers are cut and cannot match their reference exactly. "
                   "Set compare.max_new_tokens to 217, or to auto.")


def test_resolved_file_round_trip_and_errors(tmp_path):
    path = tmp_path / "resolved.json"
    with pytest.raises(UserError, match=r"resolved\.json: not found; prepare resolves "
                                        r"compare\.max_new_tokens .*dvc repro prepare"):
        read_max_new_tokens(path, "auto")
    write_resolved(path, resolve_max_new_tokens("auto", {"nearest_rank_p95": {"response": 41}}))
    assert read_max_new_tokens(path, "auto") == 41
    with pytest.raises(UserError, match=r"resolved from 'auto' \(= 41\), but params.yaml has "
                                        r"16; run `dvc repro prepare`"):
        read_max_new_tokens(path, 16)
    write_resolved(path, resolve_max_new_tokens(16, {"nearest_rank_p95": {"response": 41}}))
    assert read_max_new_tokens(path, 16) == 16
    path.write_text("{broken")
    with pytest.raises(UserError, match=r"cannot read compare.max_new_tokens .*dvc repro -f "
                                        r"prepare"):
        read_max_new_tokens(path, 16)


# --- BOS --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bos_tokenizer():
    """A word-level tokenizer that, like Llama's, puts <s> in front of every text it encodes
    (through its post-processor; its add_bos_token attribute says False, as Llama 3's does)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    texts = [format_prompt(e["instruction"], e["input"]) + " " + e["output"]
             for e in BOS_DATA]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for word in sorted({w for t in texts for w in t.split()}):
        vocab[word] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                           special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


BOS_DATA = [{"instruction": f"Name the colour number {i}.", "input": "",
             "output": f"It is colour {i}.", "task": "t"} for i in range(12)]


def test_bos_tokenizer_prompt_is_what_the_tokenizer_itself_encodes(bos_tokenizer):
    ex = BOS_DATA[3]
    prompt = format_prompt(ex["instruction"], ex["input"])
    assert bos_tokenizer(prompt)["input_ids"][0] == 1  # the tokenizer adds <s> by itself
    assert bos_prefix(bos_tokenizer) == [1]
    tok = tokenize_example(ex, bos_tokenizer, max_length=128)
    assert tok["input_ids"][:tok["n_prompt"]] == bos_tokenizer(prompt)["input_ids"]
    assert tok["input_ids"].count(1) == 1  # exactly one BOS, at the start
    assert tok["input_ids"][tok["n_prompt"]:] == \
        bos_tokenizer(ex["output"], add_special_tokens=False)["input_ids"] + [2]


def test_bos_in_every_prepared_row(bos_tokenizer, tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(BOS_DATA))
    prepare_dataset(source=str(path), n_train=8, n_eval=4, max_length=64, seed=0,
                    tokenizer=bos_tokenizer, out_dir=tmp_path / "out")
    rows = load_split(tmp_path / "out" / "train.jsonl") + load_split(tmp_path / "out" / "eval.jsonl")
    assert len(rows) == 12
    for r in rows:
        assert r["input_ids"][0] == 1 and r["input_ids"].count(1) == 1


def test_smollm2_gets_no_bos(tiny_tokenizer):
    """SmolLM2 has a bos_token (<|im_start|>) but adds none itself: ids stay as before."""
    assert tiny_tokenizer.bos_token_id is not None
    assert bos_prefix(tiny_tokenizer) == []
    ex = BOS_DATA[0]
    tok = tokenize_example(ex, tiny_tokenizer, max_length=128)
    assert tok["input_ids"] == (
        tiny_tokenizer(format_prompt(ex["instruction"], ""), add_special_tokens=False)["input_ids"]
        + tiny_tokenizer(ex["output"], add_special_tokens=False)["input_ids"]
        + [tiny_tokenizer.eos_token_id])


# --- the prepare stage on an Alpaca-shaped file at the default params ---------------------------

TOPICS = ("rivers", "bread", "chess", "volcanoes", "jazz", "tides", "bees", "glass", "maps",
          "clocks")


def alpaca_records(rng: random.Random) -> list[dict]:
    """260 records shaped like tatsu-lab/alpaca: 200 ordinary ones (short prompt, a one-sentence
    free-form answer: never cut at 128 tokens), 30 essays (an answer of 150+ words: always cut)
    and 30 with a 200-word input (a prompt longer than 128 tokens: never fits)."""
    words = ("the", "a", "water", "light", "people", "often", "small", "across", "history",
             "made", "because", "slowly", "many", "world", "form", "each")

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    records = []
    for i in range(200):
        topic = TOPICS[i % len(TOPICS)]
        records.append({"instruction": f"Give one fact about {topic}.",
                        "input": "" if i % 3 else f"Keep it about {topic} number {i}.",
                        "output": f"Fact {i}: {text(rng.randint(5, 15))}."})
    for i in range(30):
        records.append({"instruction": f"Write a short essay about {TOPICS[i % 10]}.",
                        "input": "", "output": f"ESSAY {i}. {text(160)}."})
    for i in range(30):
        records.append({"instruction": "Summarize the following text in one sentence.",
                        "input": text(200), "output": f"Summary {i}: {text(8)}."})
    rng.shuffle(records)
    return records


def run_prepare(project: Path, **overrides) -> subprocess.CompletedProcess:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in overrides.items():
        section, name = key.split(".")
        params[section][name] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k != "QLORA_DIAG_DEBUG"}
    return subprocess.run([sys.executable, str(REPO / "stages/prepare.py")], cwd=project, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def alpaca_project(tmp_path_factory, tiny_base_dir):
    project = tmp_path_factory.mktemp("alpaca")
    (project / "models").mkdir()
    (project / "models" / "base").symlink_to(tiny_base_dir)  # the SmolLM2 tokenizer
    with open(project / "alpaca.jsonl", "w") as fh:
        for rec in alpaca_records(random.Random(15)):
            fh.write(json.dumps(rec) + "\n")
    return project


def full_lengths(tokenizer, rows):
    """(response + eos, prompt + response + eos) token counts of prepared rows, untruncated."""

    def enc(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    resp = [enc(r["output"]) + 1 for r in rows]
    return resp, [enc(r["prompt"]) + n for r, n in zip(rows, resp)]


def share_within(values, limit):
    return sum(v <= limit for v in values) / len(values)


def test_alpaca_file_at_default_params(alpaca_project, tiny_tokenizer):
    """Issue 15's new-user run: a public-Alpaca-like file at the default params. Before the fix
    prepare dropped the long prompts after splitting (eval < n_eval, so train failed minutes
    later on compare.n_generate) and cut half the answers without a word."""
    proc = run_prepare(alpaca_project, **{"data.source": "alpaca.jsonl"})
    assert proc.returncode == 0, proc.stderr
    prepared = alpaca_project / "data" / "prepared"
    splits = {s: load_split(prepared / f"{s}.jsonl") for s in ("train", "eval")}
    assert (len(splits["train"]), len(splits["eval"])) == (160, 50)  # exactly the params
    rows = splits["train"] + splits["eval"]
    assert not any(r["instruction"].startswith("Summarize") for r in rows)  # prompts too long
    report = json.loads((alpaca_project / "reports" / "data.json").read_text())
    assert report["n_available"] == 260
    assert sum(report["splits"][s]["n_dropped"] for s in splits) >= 1
    essays = {s: sum(r["output"].startswith("ESSAY") for r in rows_)
              for s, rows_ in splits.items()}
    for s, rows_ in splits.items():
        got = report["splits"][s]
        # exactly the essays are cut, and only they
        assert got["n_truncated"] == essays[s] == sum(r["truncated"] for r in rows_)
        assert got["truncated_share"] == round(essays[s] / len(rows_), 4)
    train_share = essays["train"] / 160
    assert train_share > 0.05  # by construction ~30 of 230 fitting records are essays
    assert proc.stderr.startswith(f"warning: {essays['train']} of 160 train examples "
                                  f"({100 * train_share:.1f} %)")
    cover = int(proc.stderr.split("data.max_length = ")[2].split()[0])
    lengths = {s: full_lengths(tiny_tokenizer, rows_)[1] for s, rows_ in splits.items()}
    assert all(share_within(v, cover) >= 0.95 for v in lengths.values())
    assert any(share_within(v, cover - 1) < 0.95 for v in lengths.values())
    # the default fixed length is kept, and the train responses' 95th percentile recorded
    gen = report["max_new_tokens"]
    assert (gen["setting"], gen["value"]) == (16, 16)
    train_resp = full_lengths(tiny_tokenizer, splits["train"])[0]
    assert share_within(train_resp, gen["train_response_p95"]) >= 0.95 > \
        share_within(train_resp, gen["train_response_p95"] - 1)
    assert read_max_new_tokens(alpaca_project / "data" / "resolved.json", 16) == 16
    assert (f"warning: compare.max_new_tokens = 16 is shorter than the "
            f"{gen['train_response_p95']} tokens (eos included) that 95 % of the train split's "
            "responses take") in proc.stderr


def test_alpaca_file_with_auto_max_new_tokens(alpaca_project):
    proc = run_prepare(alpaca_project, **{"data.source": "alpaca.jsonl",
                                          "compare.max_new_tokens": "auto"})
    assert proc.returncode == 0, proc.stderr
    report = json.loads((alpaca_project / "reports" / "data.json").read_text())
    gen = report["max_new_tokens"]
    assert gen["setting"] == "auto" and gen["value"] == gen["train_response_p95"] > 150
    assert read_max_new_tokens(alpaca_project / "data" / "resolved.json", "auto") == gen["value"]
    assert f"compare.max_new_tokens = {gen['value']}" in proc.stdout
    assert "warning: compare.max_new_tokens" not in proc.stderr


def test_training_generates_to_the_resolved_auto_length(tmp_path, tiny_base_dir):
    """`compare.max_new_tokens: auto` end to end: prepare resolves it into data/resolved.json and
    the train stage generates to that many tokens (before, it stopped at its start: training did
    not read the resolved value). The random tiny model rarely emits eos, so its answers run to
    the limit: the longest generated answer is the resolved length."""
    from qlora_diag.tools.smoke import SMOKE_PARAMS

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "base").symlink_to(tiny_base_dir)
    small = {k: v for k, v in SMOKE_PARAMS.items() if k.split(".")[0] in ("data", "train")}
    proc = run_prepare(tmp_path, **{**small, "train.max_steps": 2, "train.eval_every": 2,
                                    "train.save_every": 2, "compare.n_generate": 4,
                                    "compare.gen_batch_size": 4, "compare.max_new_tokens": "auto"})
    assert proc.returncode == 0, proc.stderr
    resolved = read_max_new_tokens(tmp_path / "data" / "resolved.json", "auto")
    assert resolved == json.loads((tmp_path / "reports" / "data.json").read_text())[
        "max_new_tokens"]["train_response_p95"] != 8  # not the smoke default
    proc = subprocess.run([sys.executable, str(REPO / "stages/train.py"), "--method", "lora",
                           "--rank", "2", "--targets", "qv", "--seed", "42"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = "lora-r2-qv-s42"
    rows = [json.loads(line) for line in
            (tmp_path / "reports" / "train" / run / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    assert max(len(r["output_ids"]) for r in rows) == resolved
