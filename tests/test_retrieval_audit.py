"""`retriever-server audit` and `build --add-evidence` on real HotpotQA questions and their paragraphs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from retriever_server.audit import CorpusMatcher, normalize
from retriever_server.cli import main as cli_main
from tests.helpers import DEMO_CORPUS, HOTPOTQA_DEV

QUESTIONS = [json.loads(line) for line in HOTPOTQA_DEV.read_text("utf-8").splitlines()[:6]]


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Questions (6 dev, 12 evidence passages, one of another dataset) and a corpus lacking 3 of them."""
    root = tmp_path_factory.mktemp("audit")
    questions = [dict(q) for q in QUESTIONS]
    questions[5] = {**questions[5], "id": "other-5", "dataset": "other"}
    (root / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    drop = {normalize(e["text"]) for q in questions[:2] for e in q["metadata"]["evidence"][:1]}
    drop.add(normalize(questions[2]["metadata"]["evidence"][1]["text"]))
    kept = [
        line
        for line in DEMO_CORPUS.read_text("utf-8").splitlines()
        if normalize(json.loads(line)["contents"].partition("\n")[2]) not in drop
    ]
    assert len(kept) == 4858 - 3
    (root / "corpus.jsonl").write_text("\n".join(kept) + "\n")
    (root / "no-evidence.jsonl").write_text(
        json.dumps({"id": "q", "question": "why?", "golden_answers": ["x"]})
    )
    return {"root": root, "questions": root / "questions.jsonl", "corpus": root / "corpus.jsonl"}


def _audit(index: Path, questions: Path, out: Path, capsys: Any) -> dict[str, Any]:
    code = cli_main(["audit", "--index", str(index), "--questions", str(questions), "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    assert "| overall |" in capsys.readouterr().out
    return json.loads(out.read_text())


def test_matcher_tells_exact_from_near_duplicates() -> None:
    matcher = CorpusMatcher([("1", '"J. G. Farrell"\nJames Gordon  Farrell was a novelist.')])
    assert matcher.match("J. G. Farrell", "James Gordon  Farrell was a novelist.") == ("1", "exact")
    assert matcher.match("j.g. farrell", "James Gordon Farrell was a novelist") == ("1", "near_duplicate")
    assert matcher.match("Louis Aragon", "James Gordon Farrell was a novelist.") == (None, "missing")


def _bm25_build(corpus: Path, out: Path) -> list[str]:
    """`retriever-server build` arguments for a BM25 index of `corpus` in `out`."""
    return ["build", "--encoder", "bm25", "--no-progress", "--corpus", str(corpus), "--out", str(out)]


def test_audit_finds_missing_evidence_and_add_evidence_fixes_it(
    files: dict[str, Path], tmp_path: Path, capsys: Any, start_retriever: Any
) -> None:
    before_dir, after_dir = tmp_path / "before", tmp_path / "after"
    assert cli_main(_bm25_build(files["corpus"], before_dir)) == 0
    before = _audit(before_dir, files["questions"], tmp_path / "before.json", capsys)
    overall = before["evidence_in_corpus"]["overall"]
    assert (overall["questions"], overall["evidence"], overall["missing"]) == (6, 12, 3)
    assert overall["exact"] + overall["near_duplicate"] == 9
    assert set(before["recall_at_k"]) == {"overall", "hotpotqa", "other"}
    assert before["recall_at_k"]["overall"]["5"] <= 9 / 12

    args = [*_bm25_build(files["corpus"], after_dir), "--add-evidence"]
    assert cli_main([*args, str(files["questions"])]) == 0
    assert "plus 3 evidence passages" in capsys.readouterr().out
    added = [row for row in _rows(after_dir / "corpus+evidence.jsonl") if "provenance" in row]
    assert [row["provenance"]["question_id"] for row in added] == [
        QUESTIONS[0]["id"],
        QUESTIONS[1]["id"],
        QUESTIONS[2]["id"],
    ]
    assert all(row["id"].startswith("evidence:") for row in added)
    after = _audit(after_dir, files["questions"], tmp_path / "after.json", capsys)
    assert after["evidence_in_corpus"]["overall"]["missing"] == 0
    assert after["recall_at_k"]["overall"]["5"] > before["recall_at_k"]["overall"]["5"]
    # The added passage is served like any other.
    with start_retriever(after_dir) as (url, _):
        text = added[0]["text"]
        hits = httpx.post(f"{url}/retrieve", json={"queries": [text], "topk": 1}, timeout=30).json()["result"]
    assert hits[0][0]["id"] == added[0]["id"]


def test_question_file_without_evidence_is_refused(
    files: dict[str, Path], tmp_path: Path, capsys: Any
) -> None:
    args = _bm25_build(files["corpus"], tmp_path)
    assert cli_main([*args, "--add-evidence", str(files["root"] / "no-evidence.jsonl")]) == 1
    assert "carries no evidence" in capsys.readouterr().err


def test_added_evidence_that_would_duplicate_an_id_is_refused(
    files: dict[str, Path], tmp_path: Path, capsys: Any
) -> None:
    clash = {"id": f"evidence:{QUESTIONS[0]['id']}:0", "contents": '"Elsewhere"\nAnother passage.'}
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(files["corpus"].read_text() + json.dumps(clash) + "\n")
    args = _bm25_build(corpus, tmp_path / "i")
    assert cli_main([*args, "--add-evidence", str(files["questions"])]) == 1
    assert (
        f"added evidence id 'evidence:{QUESTIONS[0]['id']}:0' is already a passage id"
        in capsys.readouterr().err
    )
