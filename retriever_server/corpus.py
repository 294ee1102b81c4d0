"""FlashRAG JSONL corpora: streaming validation, a byte-offset table, and lookups that read from disk.

Two row layouts are accepted: `{"id", "contents"}` (title on the first line of `contents`, quoted or
not) and `{"id", "title", "text"}`, normalized to the contents `"Title"\\ntext`. Nothing but the offsets
table (8 bytes per passage, memory-mapped when serving) is kept in memory, so wiki-18 (21M passages,
~14 GB) is served in bounded RAM.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from autorefine.files import atomic_open

OFFSETS_FILE = "offsets.npy"
# The quick fingerprint hashes the size plus the first and last MiB: cheap on a 14 GB file, and it
# catches the usual accidents (another corpus, a truncated copy, appended rows).
_FINGERPRINT_SPAN = 1 << 20
_READ_CHUNK = 1 << 24
_MAX_SKIPPED_EXAMPLES = 20


class CorpusError(ValueError):
    """A corpus file cannot be used as given (malformed row, missing file, stale offsets)."""


@dataclass(frozen=True)
class CorpusScan:
    """What one validating pass over a corpus file found."""

    path: str
    size_bytes: int
    sha256: str
    fingerprint: str
    passages: int
    skipped_lines: int
    skipped_examples: list[str] = field(default_factory=list)

    def to_manifest(self) -> dict[str, Any]:
        """The manifest's `corpus` section."""
        return {
            "path": self.path,
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
            "fingerprint": self.fingerprint,
            "passages": self.passages,
            "skipped_lines": self.skipped_lines,
            "skipped_examples": self.skipped_examples,
        }


def parse_row(
    line: bytes | str, path: str | os.PathLike[str] = "<corpus>", lineno: int = 0
) -> tuple[str, str]:
    """Parse one corpus line into `(id, contents)`; raise CorpusError naming file and line when malformed."""
    return _parse(line, f"{path}:{lineno}" if lineno > 0 else str(path))


def _parse(line: bytes | str, where: str) -> tuple[str, str]:
    try:
        row = json.loads(line)
    except (ValueError, UnicodeDecodeError) as err:
        raise CorpusError(f"{where}: not valid JSON ({err})") from None
    if not isinstance(row, dict):
        raise CorpusError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "id" not in row:
        raise CorpusError(f"{where}: missing field 'id'")
    doc_id = row["id"]
    # bool is an int subclass, but `true` is never a meaningful passage id.
    if isinstance(doc_id, bool) or not isinstance(doc_id, str | int):
        raise CorpusError(f"{where}: field 'id' must be a string or an integer, got {type(doc_id).__name__}")
    if "contents" in row:
        contents = row["contents"]
        if not isinstance(contents, str):
            raise CorpusError(f"{where}: field 'contents' must be a string, got {type(contents).__name__}")
    elif "text" in row:
        title, text = row.get("title", ""), row["text"]
        if not isinstance(title, str) or not isinstance(text, str):
            raise CorpusError(f"{where}: fields 'title' and 'text' must be strings")
        if not text.strip():
            raise CorpusError(f"{where}: field 'text' is empty")
        contents = f'"{title}"\n{text}'
    else:
        raise CorpusError(f"{where}: missing field 'contents' (or 'title' + 'text')")
    if not contents.strip():
        raise CorpusError(f"{where}: field 'contents' is empty")
    return str(doc_id), contents


def _iter_lines(path: Path, hasher: Any | None = None) -> Iterator[tuple[int, int, bytes]]:
    """Yield `(line number, byte offset, line)` of every line, feeding each byte to `hasher`."""
    offset = 0
    with path.open("rb") as fh:
        for lineno, line in enumerate(fh, start=1):
            if hasher is not None:
                hasher.update(line)
            yield lineno, offset, line
            offset += len(line)


def iter_passages(path: str | os.PathLike[str], *, skip_malformed: bool = False) -> Iterator[tuple[str, str]]:
    """Stream `(id, contents)` for every passage of a corpus file, in file order."""
    path = Path(path)
    for lineno, _, line in _iter_lines(path):
        if not line.strip():
            continue
        try:
            yield parse_row(line, path, lineno)
        except CorpusError:
            if not skip_malformed:
                raise


def scan_corpus(
    path: str | os.PathLike[str],
    offsets_out: str | os.PathLike[str],
    *,
    skip_malformed: bool = False,
    progress: Callable[[int], None] | None = None,
) -> CorpusScan:
    """Validate a corpus in one streaming pass; write its row → byte-offset table to `offsets_out` (.npy).

    `progress(n)` is called now and then with the number of bytes read since its last call.
    """
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"corpus file not found: {path}")
    hasher = hashlib.sha256()
    offsets = array("q")  # 8 bytes per passage; a Python list would cost ~36
    skipped: list[str] = []
    n_skipped = 0
    reported = 0
    for lineno, offset, line in _iter_lines(path, hasher):
        if progress is not None and offset - reported >= _READ_CHUNK:
            progress(offset - reported)
            reported = offset
        if not line.strip():
            continue
        try:
            parse_row(line, path, lineno)
        except CorpusError as err:
            if not skip_malformed:
                raise
            n_skipped += 1
            if len(skipped) < _MAX_SKIPPED_EXAMPLES:
                skipped.append(str(err))
            continue
        offsets.append(offset)
    size = path.stat().st_size
    if progress is not None:
        progress(size - reported)
    if not offsets:
        raise CorpusError(f"{path}: no passages")
    with atomic_open(offsets_out, "wb") as fh:
        np.save(fh, np.frombuffer(offsets, dtype=np.int64))
    return CorpusScan(
        path=str(path.resolve()),
        size_bytes=size,
        sha256=hasher.hexdigest(),
        fingerprint=corpus_fingerprint(path),
        passages=len(offsets),
        skipped_lines=n_skipped,
        skipped_examples=skipped,
    )


def corpus_fingerprint(path: str | os.PathLike[str]) -> str:
    """A quick identity check: sha256 of the file size and its first and last MiB."""
    path = Path(path)
    size = path.stat().st_size
    hasher = hashlib.sha256(str(size).encode())
    with path.open("rb") as fh:
        hasher.update(fh.read(_FINGERPRINT_SPAN))
        if size > _FINGERPRINT_SPAN:
            fh.seek(max(_FINGERPRINT_SPAN, size - _FINGERPRINT_SPAN))
            hasher.update(fh.read(_FINGERPRINT_SPAN))
    return hasher.hexdigest()


class DocumentStore:
    """Row-indexed access to a corpus file through its offsets table; documents are parsed on lookup."""

    def __init__(self, corpus_path: str | os.PathLike[str], offsets_path: str | os.PathLike[str]) -> None:
        self.path = Path(corpus_path)
        self.offsets = np.load(offsets_path, mmap_mode="r")
        if self.offsets.ndim != 1 or self.offsets.dtype != np.int64:
            raise CorpusError(f"{offsets_path}: not a 1-D int64 offsets table")
        self._fh = self.path.open("rb")
        # One shared handle: seek + readline must not interleave between threads.
        self._lock = threading.Lock()
        size = self.path.stat().st_size
        if len(self.offsets) and int(self.offsets[-1]) >= size:
            raise CorpusError(f"offsets table {offsets_path} points past the end of {self.path}")

    def __len__(self) -> int:
        return len(self.offsets)

    def read_line(self, row: int) -> bytes:
        """The raw line of passage `row`."""
        if not 0 <= row < len(self.offsets):
            raise IndexError(f"passage row {row} out of range (corpus has {len(self.offsets)})")
        with self._lock:
            self._fh.seek(int(self.offsets[row]))
            return self._fh.readline()

    def get(self, row: int) -> dict[str, str]:
        """Passage `row` as `{"id": str, "contents": str}`."""
        doc_id, contents = _parse(self.read_line(row), f"{self.path} (passage row {row})")
        return {"id": doc_id, "contents": contents}

    def get_many(self, rows: Sequence[int]) -> list[dict[str, str]]:
        """Several passages, in the given order."""
        return [self.get(int(row)) for row in rows]

    def iter_range(self, start: int, stop: int) -> Iterator[str]:
        """Contents of rows `start..stop-1`, read sequentially (the build's encoding pass)."""
        for row in range(start, stop):
            yield self.get(row)["contents"]

    def close(self) -> None:
        """Close the corpus file."""
        self._fh.close()
