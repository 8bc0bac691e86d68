"""Free-form sources (issue 15): chrF against the reference, LoRA-vs-QLoRA agreement over full
answers, and a report that says which measures apply to which source."""
from __future__ import annotations

import json

import pytest
import yaml
from test_report import fixture_params, write_inputs

from qlora_diag.core.config import params_from_dict
from qlora_diag.data.overlap import chrf, exact_match_applies, reference_chrf
from qlora_diag.report import markdown as report
from qlora_diag.report.inputs import diagnose_inputs, read_inputs
from qlora_diag.report.sections.answers import section_answers


def test_chrf_known_answers():
    assert chrf(["the cat sat"], ["the cat sat"]) == pytest.approx(100.0)
    assert chrf(["xyz"], ["abc"]) == pytest.approx(0.0)
    # "ab" against "abcd" by hand: 1-grams P 2/2, R 2/4; 2-grams P 1/1, R 1/3; longer orders
    # have no hypothesis n-gram and are left out. Mean P = 1, mean R = 5/12, and
    # F_2 = 5·P·R / (4·P + R) = 25/53. Swapped: P = 5/12, R = 1, F_2 = 25/32 (recall weighs more).
    assert chrf(["ab"], ["abcd"]) == pytest.approx(100 * 25 / 53)
    assert chrf(["abcd"], ["ab"]) == pytest.approx(100 * 25 / 32)
    rows = [{"output": "a b", "reference": "a b"}, {"output": "q", "reference": "z"}]
    assert 0 < reference_chrf(rows) < 100
    with pytest.raises(ValueError):
        chrf([], [])


def test_exact_match_applies_to_the_probe_only():
    assert exact_match_applies("embedded:probe")
    assert not exact_match_applies("tatsu-lab/alpaca")
    assert not exact_match_applies("alpaca.jsonl")


def _loaded(root, source):
    data = root / "reports" / "data.json"
    obj = json.loads(data.read_text())
    obj["source"] = source
    data.write_text(json.dumps(obj))
    params = params_from_dict(yaml.safe_load((root / "params.yaml").read_text()))
    inputs = read_inputs(root / "reports", params)
    return inputs, diagnose_inputs(inputs, params), params


@pytest.mark.parametrize("source", ["embedded:probe", "alpaca.jsonl"])
def test_report_says_which_measures_apply(tmp_path, source):
    inputs, diag, params = _loaded(write_inputs(tmp_path, fixture_params()), source)
    text = report.render_report(inputs, diag, params)
    answers = section_answers(inputs, params)
    assert answers in text
    assert f"Measures by source (this run: `{source}`)" in answers
    free_form = source != "embedded:probe"
    # a free-form source gets no exact-match comparison: not overall, not per family, so no
    # verdict or failure mode can rest on it
    assert (inputs.paired.headline_em is None) == free_form
    assert (inputs.paired.families_em == {}) == free_form
    exact_row = next(line for line in answers.splitlines() if line.startswith("| exact match |"))
    assert exact_row.endswith("| no: free-form answers almost never match word for word |") \
        == free_form
    # the fixture's chrF per run: 40 + 2 (LoRA) + seed % 3, seeds 42, 1, 2, 3: mean of seed % 3 = 0.75
    assert "| chrF vs reference (mean over 4 seeds) | 42.8 | 40.8 |" in answers
    assert ("| exact match (mean over 4 seeds) |" in answers) != free_form
    # the fixture's answers are all "o": LoRA and QLoRA agree everywhere
    assert "chrF 100.0, identical answers 100.0 %" in answers
    tasks = text.split("## Exact match per task family\n\n")[1].split("\n## ")[0]
    assert ("| task family | paired examples" in tasks) != free_form
    summary = report.readme_summary(inputs, diag, params)
    assert ("| chrF vs reference (mean over 4 seeds) | 42.8 | 40.8 |" in summary) == free_form
