"""The embedded probe data set: deterministic, balanced, varied, and every answer verifiable."""
from collections import Counter, defaultdict

import pytest

from qlora_diag.data.answers import check_answer, exact_match, normalize_answer
from qlora_diag.data.probe import TASKS, generate_probe


def test_same_seed_same_examples_different_seed_different():
    assert generate_probe(200, seed=7) == generate_probe(200, seed=7)
    assert generate_probe(200, seed=7) != generate_probe(200, seed=8)


def test_length_is_exactly_n():
    assert len(generate_probe(0, seed=1)) == 0
    assert len(generate_probe(33, seed=1)) == 33


def test_fields_and_types():
    for ex in generate_probe(100, seed=3):
        assert set(ex) == {"instruction", "input", "output", "task"}
        assert all(isinstance(v, str) for v in ex.values())
        assert ex["instruction"].strip() and ex["output"].strip()


def test_at_least_eight_families_balanced():
    assert len(TASKS) >= 8
    counts = Counter(ex["task"] for ex in generate_probe(1000, seed=0))
    assert set(counts) == set(TASKS)
    assert max(counts.values()) - min(counts.values()) <= 1


def test_every_answer_of_5000_examples_checks_out():
    examples = generate_probe(5000, seed=123)
    failed = [ex for ex in examples if not check_answer(ex)]
    assert failed == []


@pytest.mark.parametrize("corrupt", [
    lambda out: out + "1",
    lambda out: out[:-1] if len(out) > 1 else out + "x",
    lambda out: out.swapcase() if out.swapcase() != out else out + "0",
    lambda out: "wrong",
])
def test_corrupted_answers_fail(corrupt):
    for ex in generate_probe(300, seed=5):
        bad = {**ex, "output": corrupt(ex["output"])}
        assert bad["output"] != ex["output"]
        assert not check_answer(bad), bad


def test_checker_catches_a_wrong_but_plausible_answer_per_family():
    seen = set()
    for ex in generate_probe(200, seed=9):
        if ex["task"] in seen:
            continue
        seen.add(ex["task"])
        # Swap in another example's answer of the same family: right format, wrong content.
        other = next(o for o in generate_probe(200, seed=10)
                     if o["task"] == ex["task"] and o["output"] != ex["output"])
        assert not check_answer({**ex, "output": other["output"]}), (ex, other)
    assert seen == set(TASKS)


def test_unknown_task_is_an_error():
    with pytest.raises(ValueError, match="unknown probe task"):
        check_answer({"instruction": "x", "input": "", "output": "y", "task": "nope"})


def test_prompts_vary_within_each_family():
    templates = defaultdict(set)
    uses_input = defaultdict(set)
    for ex in generate_probe(2000, seed=11):
        # The first three words identify the phrasing well enough.
        templates[ex["task"]].add(" ".join(ex["instruction"].split()[:3]))
        uses_input[ex["task"]].add(bool(ex["input"]))
    for task in TASKS:
        assert len(templates[task]) >= 3, (task, templates[task])
    assert any(True in v for v in uses_input.values())
    assert any(False in v for v in uses_input.values())


def test_no_repeated_prompt_at_the_default_size():
    examples = generate_probe(576, seed=42)
    assert len({(ex["instruction"], ex["input"]) for ex in examples}) == len(examples)


def test_answers_are_short():
    examples = generate_probe(1000, seed=2)
    # Whitespace words are a cheap proxy for tokens; sort answers are the longest family.
    assert max(len(ex["output"].split()) for ex in examples) <= 5
    assert max(len(ex["output"]) for ex in examples) <= 40


@pytest.mark.parametrize("prediction, reference, expected", [
    ("42", "42", True),
    ("  42.  ", "42", True),
    ("\n42\nand then some more text", "42", True),
    ("42 apples", "42", False),
    ("HELLO", "hello", False),
    ("Marsten.", "Marsten", True),
    ("", "42", False),
])
def test_exact_match(prediction, reference, expected):
    assert exact_match(prediction, reference) is expected


def test_normalize_answer():
    assert normalize_answer("  Fe.\nThe symbol of iron.") == "Fe"
    assert normalize_answer("3, 7, 9") == "3, 7, 9"
