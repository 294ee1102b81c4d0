"""Question files: strict reading with file/line/id errors, and the training mix of `prepare-data`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from autorefine.data import DataError, prepare_training_mix, read_questions
from tests.helpers import DEMO_DIR, REPO_ROOT


def write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_reads_flashrag_rows_and_skips_blank_lines(tmp_path):
    path = write(
        tmp_path / "q.jsonl",
        [
            '{"id": "a", "question": "Who?", "golden_answers": ["X", "Y"]}',
            "",
            '{"id": 7, "question": "Où est la tour Eiffel ?", "golden_answers": "Paris"}',
        ],
    )
    rows = read_questions(path)
    assert [r.id for r in rows] == ["a", "7"]
    assert rows[1].golden_answers == ["Paris"] and rows[1].question.startswith("Où")


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("{not json", r"q.jsonl:2: not valid JSON"),
        ('{"id": "b", "question": "Q?"}', r"q.jsonl:2 \(id b\): row has no gold answers"),
        (
            '{"id": "b", "question": "Q?", "golden_answers": []}',
            r"q.jsonl:2 \(id b\): row has no gold answers",
        ),
        ('{"id": "b", "question": "Q?", "golden_answers": ["", "x"]}', r"id b\): every gold answer"),
        ('{"id": "b", "question": "  ", "golden_answers": ["x"]}', r"id b\): 'question' must be"),
        ('{"question": "Q?", "golden_answers": ["x"]}', r"q.jsonl:2: row has no usable 'id'"),
        ('["a", "list"]', r"q.jsonl:2: expected a JSON object"),
        ('{"id": "a", "question": "Q?", "golden_answers": ["x"]}', r"q.jsonl:2: duplicate id 'a'"),
    ],
)
def test_bad_rows_name_file_line_and_id(tmp_path, line, fragment):
    path = write(tmp_path / "q.jsonl", ['{"id": "a", "question": "Q?", "golden_answers": ["x"]}', line])
    with pytest.raises(DataError, match=fragment):
        read_questions(path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="question file not found"):
        read_questions(tmp_path / "nope.jsonl")


def test_demo_benchmarks_are_all_valid():
    for path in sorted((DEMO_DIR / "benchmarks").glob("*.jsonl")):
        rows = read_questions(path)
        assert len(rows) in (125, 500), path.name


def test_training_mix_prefixes_ids_and_carves_validation_from_training_rows(tmp_path):
    nq = write(
        tmp_path / "nq.jsonl",
        [json.dumps({"id": str(i), "question": f"nq {i}?", "golden_answers": ["a"]}) for i in range(30)],
    )
    hp = write(
        tmp_path / "hp.jsonl",
        [json.dumps({"id": str(i), "question": f"hp {i}?", "golden_answers": ["b"]}) for i in range(20)],
    )
    out = tmp_path / "prepared"
    provenance = prepare_training_mix({"nq": nq, "hotpotqa": hp}, out, val_size=10, seed=1)
    train, val = read_questions(out / "train.jsonl"), read_questions(out / "val.jsonl")
    assert len(train) == 40 and len(val) == 10
    ids = [q.id for q in train + val]
    assert len(set(ids)) == 50  # "0" exists in both sources: prefixes keep ids unique
    assert {i.split("-")[0] for i in ids} == {"nq", "hotpotqa"}
    assert {q.metadata["source"] for q in train} == {"nq", "hotpotqa"}  # mixed
    assert provenance["val_from"].startswith("training rows")
    assert [s["name"] for s in provenance["sources"]] == ["nq", "hotpotqa"]
    assert json.loads((out / "provenance.json").read_text())["train_rows"] == 40
    # the same seed gives the same split
    again = prepare_training_mix({"nq": nq, "hotpotqa": hp}, tmp_path / "again", val_size=10, seed=1)
    assert again["val_rows"] == 10
    assert read_questions(tmp_path / "again" / "val.jsonl") == val


def test_training_mix_rejects_a_validation_split_that_eats_everything(tmp_path):
    nq = write(tmp_path / "nq.jsonl", ['{"id": "1", "question": "q?", "golden_answers": ["a"]}'])
    with pytest.raises(DataError, match="leaves no training rows"):
        prepare_training_mix({"nq": nq}, tmp_path / "out", val_size=1)


def test_prepare_data_command_with_local_flashrag_layout(tmp_path):
    for name in ("nq", "hotpotqa"):
        (tmp_path / "flashrag" / name).mkdir(parents=True)
        write(
            tmp_path / "flashrag" / name / "train.jsonl",
            [
                json.dumps({"id": f"{i}", "question": f"{name} {i}?", "golden_answers": ["x"]})
                for i in range(12)
            ],
        )
    result = subprocess.run(
        [sys.executable, "-m", "autorefine.cli", "prepare-data", "--data-dir", str(tmp_path / "flashrag"),
         "--val-size", "4", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=REPO_ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "20 training and 4 validation questions" in result.stdout
    assert len(read_questions(tmp_path / "out" / "train.jsonl")) == 20


def test_prepare_data_reports_a_bad_source_row(tmp_path):
    bad = write(tmp_path / "bad.jsonl", ['{"id": "x1", "question": "q?", "golden_answers": []}'])
    result = subprocess.run(
        [sys.executable, "-m", "autorefine.cli", "prepare-data", "--file", f"nq={bad}", "--val-size", "0",
         "--out", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=REPO_ROOT,
    )  # fmt: skip
    assert result.returncode == 2
    assert "bad.jsonl:1 (id x1): row has no gold answers" in result.stderr
