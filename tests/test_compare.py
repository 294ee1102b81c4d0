"""`autorefine compare`: paired differences of two evaluations with bootstrap intervals, refusals."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from autorefine.cli import main
from autorefine.evaluation.compare import compare_runs, paired_bootstrap
from autorefine.evaluation.policy import EvaluationError


def write_run(folder, rows: list[tuple[str, str, float, float, int]]):
    """An evaluate output folder: (dataset, id, em, f1, searches) per question, as predictions.jsonl rows."""
    folder.mkdir(parents=True)
    with (folder / "predictions.jsonl").open("w") as f:
        for dataset, qid, em, f1, searches in rows:
            scores = {
                "em": em,
                "f1": f1,
                "format": 1.0,
                "model_tokens": 40.0 + searches,
                "searches": searches,
            }
            f.write(json.dumps({"dataset": dataset, "id": qid, "question": "?", "golden_answers": ["x"],
                                "prediction": "x", "scores": scores, "trajectory": {}, "samples": 1,
                                "searches": searches, "extra": {}}) + "\n")  # fmt: skip
    return folder


def test_the_bootstrap_is_the_percentiles_of_resampled_mean_differences():
    rng = random.Random(1)
    a = [rng.random() for _ in range(50)]
    b = [x + rng.gauss(0.05, 0.1) for x in a]
    mean, low, high = paired_bootstrap(a, b, samples=4000, seed=3)
    diff = np.array(b) - np.array(a)
    draws = np.random.default_rng(3).integers(0, 50, size=(4000, 50))
    expected = np.percentile(diff[draws].mean(axis=1), [2.5, 97.5])
    assert mean == pytest.approx(diff.mean()) and (low, high) == pytest.approx(tuple(expected))
    assert low < mean < high


def test_paired_differences_per_dataset_and_overall(tmp_path):
    questions = [("nq", str(i)) for i in range(40)] + [("hotpotqa", str(i)) for i in range(40)]
    a = write_run(tmp_path / "a", [(d, q, 0.0, 0.2, 2) for d, q in questions])
    # B answers every NQ question and half the HotpotQA ones right, with one search fewer on HotpotQA.
    b = write_run(tmp_path / "b", [(d, q, 1.0 if d == "nq" or int(q) % 2 else 0.0, 0.2, 2 if d == "nq" else 1)
                                   for d, q in questions])  # fmt: skip
    result = compare_runs(a, b, samples=1000)
    assert set(result) == {"nq", "hotpotqa", "all questions"}
    em = {group: next(d for d in diffs if d.metric == "EM") for group, diffs in result.items()}
    assert em["nq"].difference == 1.0 and em["nq"].low == em["nq"].high == 1.0 and em["nq"].better == 40
    assert em["hotpotqa"].difference == 0.5 and 0.25 < em["hotpotqa"].low < 0.5 < em["hotpotqa"].high
    assert em["hotpotqa"].better == 20 and em["hotpotqa"].same == 20 and em["hotpotqa"].significant
    assert em["all questions"].questions == 80 and em["all questions"].difference == 0.75
    f1 = next(d for d in result["nq"] if d.metric == "F1")
    assert f1.difference == 0.0 and not f1.significant and f1.same == 40
    searches = next(d for d in result["hotpotqa"] if d.metric == "searches/q")
    assert searches.difference == -1.0 and searches.worse == 40


def test_different_question_sets_are_refused(tmp_path):
    a = write_run(tmp_path / "a", [("nq", "1", 1.0, 1.0, 1), ("nq", "2", 0.0, 0.0, 1)])
    b = write_run(tmp_path / "b", [("nq", "1", 1.0, 1.0, 1), ("nq", "3", 0.0, 0.0, 1)])
    with pytest.raises(
        EvaluationError, match=r"different questions \(1 only in the first, 1 only in the second"
    ):
        compare_runs(a, b)
    with pytest.raises(EvaluationError, match=r"holds no predictions\.jsonl"):
        compare_runs(a, tmp_path / "missing")


def test_the_command_prints_a_table_and_writes_markdown_and_json(tmp_path, capsys):
    a = write_run(tmp_path / "sft", [("nq", str(i), float(i % 3 == 0), 0.5, 1) for i in range(30)])
    b = write_run(tmp_path / "grpo", [("nq", str(i), float(i % 3 != 1), 0.5, 1) for i in range(30)])
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "cmp"), "--samples", "500"]) == 0
    out = capsys.readouterr().out
    assert "| questions | metric | sft | grpo | grpo − sft | 95% CI |" in out
    assert "| nq (30) | EM | 33.33 | 66.67 | +33.33 *" in out
    data = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert data["groups"]["nq"][0]["metric"] == "EM" and data["groups"]["nq"][0]["significant"] is True
    assert (tmp_path / "cmp" / "compare.md").read_text().startswith("| questions |")
    assert main(["compare", str(a), str(tmp_path / "nope")]) == 2
