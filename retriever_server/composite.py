"""Composite index folders: hybrid (a BM25 and a dense index over the same rows) and chunked (an index over
chunks of the passages, mapped back to their parents).

    hybrid/      manifest.json (type hybrid), offsets.npy, member-bm25/ and member-dense/ (whole indexes)
    chunked/     manifest.json (type chunked), offsets.npy, chunks.jsonl, chunk_parents.npy, chunk-index/

Members are ordinary index folders built by `build_index` (so each resumes and checks itself); the outer
manifest records what they are and is written last.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from autorefine.files import atomic_open
from retriever_server.corpus import OFFSETS_FILE, DocumentStore, scan_corpus
from retriever_server.encoders import BM25, model_path, resolve_encoder_spec
from retriever_server.manifest import MANIFEST_FILE, new_manifest, read_manifest, write_manifest
from retriever_server.search import CHUNK_CORPUS, CHUNK_INDEX, CHUNK_PARENTS, CHUNKED, HYBRID, HYBRID_MEMBERS

# A chunk shorter than this many encoder tokens cannot hold a typical word with its word pieces.
MIN_CHUNK_TOKENS = 8
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[A-Z0-9])")


def split_title(contents: str) -> tuple[str, str]:
    """`"Title"\\ntext` → (title line, text); no title line → ("", contents)."""
    first, _, rest = contents.partition("\n")
    return (first, rest) if rest else ("", contents)


def chunk_text(text: str, budget: int, count: Any) -> list[str]:
    """Whole sentences packed up to `budget` tokens; a longer sentence is cut between words."""
    pieces: list[str] = []
    for sentence in _SENTENCE_END.split(text.strip()):
        if count(sentence) <= budget:
            pieces.append(sentence)
            continue
        words: list[str] = []
        for word in sentence.split():
            if words and count(" ".join([*words, word])) > budget:
                pieces.append(" ".join(words))
                words = []
            words.append(word)  # a single word over the budget stays whole: never split inside a word
        if words:
            pieces.append(" ".join(words))
    chunks: list[str] = []
    for piece in pieces:
        if chunks and count(f"{chunks[-1]} {piece}") <= budget:
            chunks[-1] = f"{chunks[-1]} {piece}"
        else:
            chunks.append(piece)
    return chunks or [text]


def token_counter(encoder: str | None) -> Any:
    """Tokens of a text for the dense encoder's tokenizer (the embedded MiniLM's for BM25)."""
    from transformers import AutoTokenizer

    name = None if encoder is None or encoder.lower() in (BM25, HYBRID) else encoder
    tokenizer = AutoTokenizer.from_pretrained(model_path(resolve_encoder_spec(name).name))
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False))


def write_chunks(store: DocumentStore, out: Path, chunk_tokens: int, count: Any) -> int:
    """Write chunks.jsonl (each chunk under its passage's title) and chunk_parents.npy; return chunk count."""
    parents: list[int] = []
    with atomic_open(out / CHUNK_CORPUS, "w") as fh:
        for row in range(len(store)):
            doc = store.get(row)
            title, text = split_title(doc["contents"])
            for j, chunk in enumerate(chunk_text(text, chunk_tokens, count)):
                contents = f"{title}\n{chunk}" if title else chunk
                fh.write(
                    json.dumps({"id": f"{doc['id']}#{j}", "contents": contents}, ensure_ascii=False) + "\n"
                )
                parents.append(row)
    with atomic_open(out / CHUNK_PARENTS, "wb") as fh:
        np.save(fh, np.asarray(parents, dtype=np.int64))
    return len(parents)


def build_composite(
    corpus: Path,
    out: Path,
    *,
    encoder: str | None,
    dense_encoder: str | None,
    index_type: str,
    chunk_tokens: int | None,
    build_member: Any,
    member_args: dict[str, Any],
) -> dict[str, Any]:
    """Build a hybrid and/or chunked index folder; `build_member(corpus, out, encoder=, index_type=)` builds
    the ordinary indexes inside it. Returns the outer manifest."""
    started = time.perf_counter()
    hybrid = (encoder or "").lower() == HYBRID
    if chunk_tokens is not None and chunk_tokens < MIN_CHUNK_TOKENS:
        raise ValueError(
            f"--chunk-tokens {chunk_tokens} cannot hold a word: a word takes up to several encoder tokens; "
            f"use at least {MIN_CHUNK_TOKENS} (sentences are kept whole up to the budget)"
        )
    if dense_encoder is not None and not hybrid:
        raise ValueError("--dense-encoder goes with --encoder hybrid (name the dense member there)")
    if hybrid and (dense_encoder or "").lower() in (BM25, HYBRID):
        raise ValueError(f"--dense-encoder must be a dense model, not {dense_encoder!r}")
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_FILE).unlink(missing_ok=True)
    scan = scan_corpus(corpus, out / OFFSETS_FILE, skip_malformed=member_args.get("skip_malformed", False))
    if chunk_tokens is not None:
        store = DocumentStore(corpus, out / OFFSETS_FILE)
        try:
            chunks = write_chunks(store, out, chunk_tokens, token_counter(dense_encoder or encoder))
        finally:
            store.close()
        inner = build_composite_or_plain(
            out / CHUNK_CORPUS,
            out / CHUNK_INDEX,
            encoder=encoder,
            dense_encoder=dense_encoder,
            index_type=index_type,
            build_member=build_member,
            member_args=member_args,
        )
        index = {
            "type": CHUNKED,
            "params": {"chunk_tokens": chunk_tokens},
            "inner": CHUNK_INDEX,
            "corpus": CHUNK_CORPUS,
            "parents": CHUNK_PARENTS,
            "chunks": chunks,
            "ntotal": scan.passages,
        }
        encoder_info = inner["encoder"]
        dim = inner.get("dim")
    else:
        members = {}
        for role, sub in HYBRID_MEMBERS.items():
            name = BM25 if role == "bm25" else dense_encoder
            kind = BM25 if role == "bm25" else index_type
            members[role] = build_member(corpus, out / sub, encoder=name, index_type=kind, **member_args)
        index = {
            "type": HYBRID,
            "params": {},
            "members": dict(HYBRID_MEMBERS),
            "dense_index": members["dense"]["index"]["type"],
            "ntotal": scan.passages,
        }
        encoder_info = {**members["dense"]["encoder"], "hybrid_with": BM25}
        dim = members["dense"].get("dim")
    manifest = new_manifest(scan, encoder_info, index, False, time.perf_counter() - started)
    manifest["dim"] = dim
    write_manifest(out, manifest)
    return manifest


def build_composite_or_plain(
    corpus: Path,
    out: Path,
    *,
    encoder: str | None,
    dense_encoder: str | None,
    index_type: str,
    build_member: Any,
    member_args: dict[str, Any],
) -> dict[str, Any]:
    """The inner index of a chunked folder: hybrid, or an ordinary one."""
    if (encoder or "").lower() == HYBRID:
        return build_composite(
            corpus,
            out,
            encoder=encoder,
            dense_encoder=dense_encoder,
            index_type=index_type,
            chunk_tokens=None,
            build_member=build_member,
            member_args=member_args,
        )
    bm25 = (encoder or "").lower() == BM25
    build_member(corpus, out, encoder=encoder, index_type=BM25 if bm25 else index_type, **member_args)
    return read_manifest(out)
