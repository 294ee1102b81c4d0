"""Writing files so that a crash never leaves one that looks complete, and hashing them for provenance."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, suffix: str = ".partial") -> Iterator[Path]:
    """A sibling path to write a file or folder into; renamed onto `path` only when the block succeeds.

    The rename replaces what was at `path` in one step, so readers see the old content or the new, never a
    half-written one; on an exception the partial copy is removed and `path` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + suffix)
    _remove(partial)
    try:
        yield partial
        if partial.is_dir() and path.is_dir():
            shutil.rmtree(path)  # os.replace cannot put a folder over a non-empty one
        os.replace(partial, path)
    except BaseException:
        _remove(partial)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """Open a partial file for writing; flushed to disk and renamed onto `path` when the block succeeds."""
    encoding = None if "b" in mode else "utf-8"
    with atomic_path(path) as partial, partial.open(mode, encoding=encoding) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write JSON (indented) atomically."""
    with atomic_open(path) as f:
        f.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    """A JSON file's content."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]]) -> int:
    """Write rows as JSON lines atomically; returns how many."""
    count = 0
    with atomic_open(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (a rename into it, a new file) to disk, so they outlast a power loss."""
    if os.name != "posix":  # only POSIX can open a folder to fsync it
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes (provenance of question files, corpora and models)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
