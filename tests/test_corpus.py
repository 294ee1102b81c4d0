"""Corpus parsing, validation, the offsets table and document lookups."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from autorefine.files import file_sha256
from retriever_server.corpus import (
    CorpusError,
    DocumentStore,
    corpus_fingerprint,
    iter_passages,
    parse_row,
    scan_corpus,
)

DEMO_CORPUS = Path(__file__).resolve().parent.parent / "data" / "demo" / "corpus.jsonl"
WIKI18_SAMPLE = DEMO_CORPUS.with_name("wiki18_sample.jsonl")


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), "utf-8")
    return path


def _store(tmp_path: Path, lines: list[str], **kwargs: bool) -> tuple[DocumentStore, object]:
    corpus = _write(tmp_path / "corpus.jsonl", lines)
    scan = scan_corpus(corpus, tmp_path / "offsets.npy", **kwargs)
    return DocumentStore(corpus, tmp_path / "offsets.npy"), scan


def test_contents_served_verbatim_with_quoted_and_bare_titles(tmp_path: Path) -> None:
    rows = [
        {"id": "a", "contents": '"Quoted Title"\nSome text.'},
        {"id": "b", "contents": "Bare Title\nOther text."},
    ]
    store, _ = _store(tmp_path, [json.dumps(r) for r in rows])
    assert store.get(0) == rows[0]
    assert store.get(1) == rows[1]


def test_title_text_rows_normalized_to_flashrag_contents(tmp_path: Path) -> None:
    store, _ = _store(tmp_path, [json.dumps({"id": "7", "title": "Paris", "text": "Capital of France."})])
    assert store.get(0) == {"id": "7", "contents": '"Paris"\nCapital of France.'}


def test_int_ids_become_strings_and_unicode_is_preserved(tmp_path: Path) -> None:
    text = '"Zürich"\nStraße – 東京 – emoji 🚀'
    store, _ = _store(tmp_path, [json.dumps({"id": 42, "contents": text}, ensure_ascii=False)])
    assert store.get(0) == {"id": "42", "contents": text}


def test_blank_lines_are_ignored(tmp_path: Path) -> None:
    lines = [
        "",
        json.dumps({"id": "1", "contents": "A\na"}),
        "   ",
        "",
        json.dumps({"id": "2", "contents": "B\nb"}),
        "",
    ]
    store, scan = _store(tmp_path, lines)
    assert len(store) == scan.passages == 2
    assert [store.get(i)["id"] for i in range(2)] == ["1", "2"]
    assert scan.skipped_lines == 0


@pytest.mark.parametrize(
    ("bad_line", "problem"),
    [
        ("{not json", "not valid JSON"),
        ('["a list"]', "expected a JSON object"),
        ('{"contents": "T\\nx"}', "missing field 'id'"),
        ('{"id": "1"}', "missing field 'contents'"),
        ('{"id": "1", "contents": 5}', "'contents' must be a string"),
        ('{"id": "1", "contents": "  "}', "'contents' is empty"),
        ('{"id": [1], "contents": "T\\nx"}', "'id' must be a string or an integer"),
        ('{"id": true, "contents": "T\\nx"}', "'id' must be a string or an integer"),
        ('{"id": "1", "title": "T", "text": ""}', "'text' is empty"),
        ('{"id": "1", "title": 3, "text": "x"}', "'title' and 'text' must be strings"),
    ],
)
def test_malformed_line_is_an_error_naming_file_and_line(tmp_path: Path, bad_line: str, problem: str) -> None:
    corpus = _write(tmp_path / "c.jsonl", [json.dumps({"id": "0", "contents": "T\nok"}), "", bad_line])
    with pytest.raises(CorpusError) as info:
        scan_corpus(corpus, tmp_path / "offsets.npy")
    assert f"{corpus}:3" in str(info.value)
    assert problem in str(info.value)
    assert not (tmp_path / "offsets.npy").exists()


def test_invalid_utf8_is_malformed(tmp_path: Path) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_bytes(b'{"id": "1", "contents": "T\\nok"}\n{"id": "2", "contents": "\xff\xfe"}\n')
    with pytest.raises(CorpusError, match=r"c\.jsonl:2"):
        scan_corpus(corpus, tmp_path / "offsets.npy")


def test_skip_malformed_skips_and_counts(tmp_path: Path) -> None:
    lines = [
        json.dumps({"id": "0", "contents": "A\na"}),
        "{broken",
        json.dumps({"id": "1", "contents": ""}),
        json.dumps({"id": "2", "contents": "B\nb"}),
    ]
    store, scan = _store(tmp_path, lines, skip_malformed=True)
    assert scan.passages == 2
    assert scan.skipped_lines == 2
    assert any(":2:" in example for example in scan.skipped_examples)
    assert [store.get(i)["id"] for i in range(len(store))] == ["0", "2"]
    assert list(iter_passages(tmp_path / "corpus.jsonl", skip_malformed=True)) == [
        ("0", "A\na"),
        ("2", "B\nb"),
    ]


def test_empty_corpus_is_an_error(tmp_path: Path) -> None:
    corpus = _write(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(CorpusError, match="no passages"):
        scan_corpus(corpus, tmp_path / "offsets.npy")


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="not found"):
        scan_corpus(tmp_path / "nope.jsonl", tmp_path / "offsets.npy")


def test_offsets_lookups_equal_the_files_rows(tmp_path: Path) -> None:
    for source in (DEMO_CORPUS, WIKI18_SAMPLE):
        offsets = tmp_path / f"{source.stem}.npy"
        scan = scan_corpus(source, offsets)
        rows = [json.loads(line) for line in source.read_text("utf-8").splitlines() if line.strip()]
        store = DocumentStore(source, offsets)
        assert scan.passages == len(store) == len(rows)
        for i in [0, 1, len(rows) // 2, len(rows) - 1]:
            assert store.get(i) == {"id": str(rows[i]["id"]), "contents": rows[i]["contents"]}
        # Every row, not just a sample: offsets land exactly on each line's start.
        assert [store.get(i)["id"] for i in range(len(rows))] == [str(r["id"]) for r in rows]
        store.close()


def test_wiki18_sample_has_quoted_and_bare_titles_served_verbatim(tmp_path: Path) -> None:
    scan_corpus(WIKI18_SAMPLE, tmp_path / "o.npy")
    store = DocumentStore(WIKI18_SAMPLE, tmp_path / "o.npy")
    firsts = [store.get(i)["contents"].split("\n", 1)[0] for i in range(len(store))]
    quoted = sum(first.startswith('"') and first.endswith('"') for first in firsts)
    assert (quoted, len(firsts) - quoted) == (879, 121)


def test_offsets_table_is_int64_npy_and_memory_mapped(tmp_path: Path) -> None:
    scan_corpus(DEMO_CORPUS, tmp_path / "offsets.npy")
    table = np.load(tmp_path / "offsets.npy")
    assert table.dtype == np.int64 and table.ndim == 1 and table[0] == 0
    assert np.all(np.diff(table) > 0)
    store = DocumentStore(DEMO_CORPUS, tmp_path / "offsets.npy")
    assert isinstance(store.offsets, np.memmap)


def test_lookup_out_of_range_raises(tmp_path: Path) -> None:
    store, _ = _store(tmp_path, [json.dumps({"id": "1", "contents": "A\na"})])
    with pytest.raises(IndexError):
        store.get(1)


def test_scan_records_hashes_and_counts(tmp_path: Path) -> None:
    scan = scan_corpus(DEMO_CORPUS, tmp_path / "o.npy")
    assert scan.sha256 == file_sha256(DEMO_CORPUS)
    assert scan.fingerprint == corpus_fingerprint(DEMO_CORPUS)
    assert scan.size_bytes == DEMO_CORPUS.stat().st_size
    assert scan.to_manifest()["passages"] == 4858


def test_parse_row_last_line_without_newline(tmp_path: Path) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(
        json.dumps({"id": "1", "contents": "A\na"}) + "\n" + json.dumps({"id": "2", "contents": "B\nb"})
    )
    scan_corpus(corpus, tmp_path / "o.npy")
    assert DocumentStore(corpus, tmp_path / "o.npy").get(1) == {"id": "2", "contents": "B\nb"}
    assert parse_row(b'{"id": 3, "contents": "C\\nc"}\r\n') == ("3", "C\nc")
