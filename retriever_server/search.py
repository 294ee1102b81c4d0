"""Searchers: one index, a hybrid (BM25 + dense fused by reciprocal rank), or chunks mapped to parent passages.

A searcher turns query strings into `(scores, rows)` over the corpus rows of the index folder it was loaded
from. Queries are encoded once (`encode`) and searched per topk (`search`) so that a batch holding several
topk values encodes each distinct query once. Rows are padded with -1 where fewer than k results exist.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

# Reciprocal-rank fusion (Cormack et al., 2009): score(d) = Σ_m w_m / (RRF_K + rank_m(d)), ranks from 1.
# 60 is the constant of the original paper; larger values flatten the advantage of the very first ranks.
RRF_K = 60
# BM25 : dense weights, chosen on the 400 demo HotpotQA train questions (BENCHMARKS.md "Retrieval quality"):
# MiniLM is the better member there, and leaning towards it won recall@3 and @5 (0.3:0.7 best, 0.7:0.3
# lost 3 points of recall@3 to it). Equal weights can lose to the better member (REFERENCE §7).
DEFAULT_WEIGHTS = (0.3, 0.7)
# Candidates each member contributes before fusion; a document outside both lists gets no fused score.
FUSION_DEPTH = 50
# Chunks searched per parent passage wanted: several chunks of one passage often rank together.
CHUNK_OVERFETCH = 8

HYBRID = "hybrid"
CHUNKED = "chunked"
HYBRID_MEMBERS = {"bm25": "member-bm25", "dense": "member-dense"}
CHUNK_CORPUS = "chunks.jsonl"
CHUNK_PARENTS = "chunk_parents.npy"
CHUNK_INDEX = "chunk-index"


class Searcher(Protocol):
    """What the server needs to search: encode queries once, search them for any k."""

    score_kind: str
    ntotal: int

    def encode(self, queries: list[str]) -> Any:
        """Query keys for `search` (strings for BM25, embeddings for a dense index)."""
        ...

    def search(self, keys: Any, picks: list[int], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k `(scores, rows)` for the queries at positions `picks` of `keys`, best first."""
        ...

    def timings(self) -> dict[str, float]:
        """Cumulative seconds per stage."""
        ...


def pad(scores: list[list[float]], rows: list[list[int]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Ragged per-query results as (n, k) arrays, rows padded with -1 and scores with -inf."""
    out_scores = np.full((len(rows), k), -np.inf, dtype=np.float32)
    out_rows = np.full((len(rows), k), -1, dtype=np.int64)
    for i, (s, r) in enumerate(zip(scores, rows, strict=True)):
        out_scores[i, : len(s)] = s[:k]
        out_rows[i, : len(r)] = r[:k]
    return out_scores, out_rows


class IndexSearcher:
    """One index: BM25 over strings, or FAISS over the dense encoder's query embeddings."""

    def __init__(self, index: Any, encoder: Any | None) -> None:
        self.index = index
        self.encoder = encoder
        self.ntotal = int(index.ntotal)
        self.score_kind = "bm25" if encoder is None else "inner_product"

    def encode(self, queries: list[str]) -> Any:
        """The query strings (BM25) or their embeddings (dense)."""
        return queries if self.encoder is None else self.encoder.encode_queries(queries)

    def search(self, keys: Any, picks: list[int], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of the picked queries."""
        chosen = [keys[i] for i in picks] if self.encoder is None else keys[picks]
        scores, rows = self.index.search(chosen, k)
        if rows.shape[1] < k:  # a corpus smaller than k
            return pad(scores.tolist(), rows.tolist(), k)
        return scores, rows

    def timings(self) -> dict[str, float]:
        """Index search and (dense) encoder seconds."""
        timings = {"search_seconds": self.index.search_seconds}
        if self.encoder is not None:
            timings["tokenize_seconds"] = self.encoder.tokenize_seconds
            timings["encoder_forward_seconds"] = self.encoder.forward_seconds
        return timings


@dataclass
class Fusion:
    """How a hybrid index fuses its members: RRF constant, BM25 and dense weights, candidates per member."""

    rrf_k: float = RRF_K
    bm25_weight: float = DEFAULT_WEIGHTS[0]
    dense_weight: float = DEFAULT_WEIGHTS[1]
    depth: int = FUSION_DEPTH

    def __post_init__(self) -> None:
        if self.rrf_k < 0 or self.bm25_weight < 0 or self.dense_weight < 0:
            raise ValueError("fusion constant and weights must be >= 0")
        if self.bm25_weight + self.dense_weight == 0:
            raise ValueError("fusion weights are both 0: nothing would be ranked")
        if self.depth <= 0:
            raise ValueError(f"fusion depth must be positive, got {self.depth}")


def rrf(ranked: list[tuple[float, np.ndarray]], k: int, rrf_k: float) -> tuple[list[float], list[int]]:
    """Reciprocal-rank fusion of weighted ranked row lists (-1 ignored); top-k (scores, rows)."""
    fused: dict[int, float] = {}
    for weight, rows in ranked:
        if weight == 0:
            continue
        for rank, row in enumerate(rows.tolist(), start=1):
            if row >= 0:
                fused[row] = fused.get(row, 0.0) + weight / (rrf_k + rank)
    # Ties (same fused score) keep the order of first appearance, i.e. the earlier member's ranking.
    best = sorted(fused.items(), key=lambda item: -item[1])[:k]
    return [score for _, score in best], [row for row, _ in best]


class HybridSearcher:
    """BM25 and a dense index over the same rows, fused by weighted reciprocal rank."""

    score_kind = "rrf"

    def __init__(self, bm25: IndexSearcher, dense: IndexSearcher, fusion: Fusion) -> None:
        if bm25.ntotal != dense.ntotal:
            raise ValueError(f"hybrid members differ in size: bm25 {bm25.ntotal}, dense {dense.ntotal}")
        self.bm25, self.dense, self.fusion = bm25, dense, fusion
        self.ntotal = bm25.ntotal
        self.fusion_seconds = 0.0

    def encode(self, queries: list[str]) -> Any:
        """Both members' keys (a member weighted 0 is not searched, so not encoded)."""
        bm25 = self.bm25.encode(queries) if self.fusion.bm25_weight else None
        dense = self.dense.encode(queries) if self.fusion.dense_weight else None
        return bm25, dense

    def search(self, keys: Any, picks: list[int], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Each member's top `max(k, depth)`, fused; scores are fused RRF scores."""
        depth = min(self.ntotal, max(k, self.fusion.depth))
        empty = np.full((len(picks), 0), -1, dtype=np.int64)
        bm25 = self.bm25.search(keys[0], picks, depth)[1] if keys[0] is not None else empty
        dense = self.dense.search(keys[1], picks, depth)[1] if keys[1] is not None else empty
        start = time.perf_counter()
        scores, rows = [], []
        for b, d in zip(bm25, dense, strict=True):
            s, r = rrf([(self.fusion.bm25_weight, b), (self.fusion.dense_weight, d)], k, self.fusion.rrf_k)
            scores.append(s)
            rows.append(r)
        self.fusion_seconds += time.perf_counter() - start
        return pad(scores, rows, k)

    def timings(self) -> dict[str, float]:
        """Per-member timings, prefixed, plus the fusion's."""
        timings = {f"bm25_{key}": value for key, value in self.bm25.timings().items()}
        timings.update({f"dense_{key}": value for key, value in self.dense.timings().items()})
        timings["fusion_seconds"] = self.fusion_seconds
        return timings


class ChunkedSearcher:
    """An index over chunks; results are their parent passages, deduplicated and ranked by best chunk."""

    def __init__(self, inner: Searcher, parents: np.ndarray, n_parents: int) -> None:
        if len(parents) != inner.ntotal:
            raise ValueError(f"{len(parents)} chunk parents for an index of {inner.ntotal} chunks")
        self.inner = inner
        self.parents = parents
        self.ntotal = n_parents
        self.score_kind = f"best_chunk_{inner.score_kind}"

    def encode(self, queries: list[str]) -> Any:
        """The inner index's keys."""
        return self.inner.encode(queries)

    def search(self, keys: Any, picks: list[int], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Search `CHUNK_OVERFETCH`·k chunks, keep each parent's best; all chunks if too few parents."""
        depth = min(self.inner.ntotal, k * CHUNK_OVERFETCH)
        results = self._parents(self.inner.search(keys, picks, depth), k)
        short = [i for i, (_, rows) in enumerate(results) if len(rows) < min(k, self.ntotal)]
        if short and depth < self.inner.ntotal:
            # Rare: one passage's chunks filled the candidates. Search those queries over every chunk.
            again = self._parents(self.inner.search(keys, [picks[i] for i in short], self.inner.ntotal), k)
            for i, result in zip(short, again, strict=True):
                results[i] = result
        return pad([s for s, _ in results], [r for _, r in results], k)

    def _parents(self, found: tuple[np.ndarray, np.ndarray], k: int) -> list[tuple[list[float], list[int]]]:
        results = []
        for scores, rows in zip(*found, strict=True):
            best: dict[int, float] = {}  # insertion order = rank of each parent's best chunk
            for score, row in zip(scores.tolist(), rows.tolist(), strict=True):
                if row >= 0:
                    best.setdefault(int(self.parents[row]), score)
                    if len(best) == k:
                        break
            results.append((list(best.values()), list(best)))
        return results

    def timings(self) -> dict[str, float]:
        """The inner index's timings."""
        return self.inner.timings()


def index_types(manifest: dict[str, Any], index_dir: Path) -> list[str]:
    """The index's type and, for a chunked index, its inner index's type: e.g. ["chunked", "hybrid"]."""
    from retriever_server.manifest import read_manifest

    info = manifest["index"]
    if info["type"] == CHUNKED:
        return [CHUNKED, *index_types(read_manifest(index_dir / info["inner"]), index_dir / info["inner"])]
    return [info["type"]]


def load_searcher(
    index_dir: Path,
    corpus: Path,
    *,
    encoder_spec: Any | None,
    search_params: dict[str, Any],
    batch_size: int,
    max_batch_tokens: int | None,
    fusion: Fusion,
    encoder_dtype: str = "fp32",
) -> Searcher:
    """Load the searcher of an index folder (recursively for hybrid and chunked indexes)."""
    from retriever_server.indexes import BM25Index, FaissIndex
    from retriever_server.manifest import ManifestMismatch, check_corpus, manifest_encoder, read_manifest

    manifest = read_manifest(index_dir)
    info = manifest["index"]

    def member(sub: str, sub_corpus: Path) -> Searcher:
        path = index_dir / sub
        inner = read_manifest(path)
        check_corpus(inner, sub_corpus)
        # A dense member takes the encoder the server was given (perhaps the same model at another path).
        spec = manifest_encoder(inner)
        return load_searcher(
            path,
            sub_corpus,
            encoder_spec=encoder_spec if spec is not None and encoder_spec is not None else spec,
            search_params=search_params,
            batch_size=batch_size,
            max_batch_tokens=max_batch_tokens,
            fusion=fusion,
            encoder_dtype=encoder_dtype,
        )

    if info["type"] == HYBRID:
        bm25 = member(info["members"]["bm25"], corpus)
        dense = member(info["members"]["dense"], corpus)
        assert isinstance(bm25, IndexSearcher) and isinstance(dense, IndexSearcher)
        return HybridSearcher(bm25, dense, fusion)
    if info["type"] == CHUNKED:
        inner = member(info["inner"], index_dir / info["corpus"])
        parents = np.load(index_dir / info["parents"], mmap_mode="r")
        return ChunkedSearcher(inner, parents, manifest["corpus"]["passages"])
    params = {**info["params"], **search_params}
    if encoder_spec is None:
        return IndexSearcher(BM25Index.load(index_dir / info["path"], params), None)
    from retriever_server.encoders import DenseEncoder

    encoder = DenseEncoder(
        encoder_spec, batch_size=batch_size, max_batch_tokens=max_batch_tokens, dtype=encoder_dtype
    )
    if encoder.dim != manifest["dim"]:
        raise ManifestMismatch(
            f"encoder {encoder_spec.name!r} makes {encoder.dim}-d vectors, the index holds {manifest['dim']}-d"
        )
    return IndexSearcher(FaissIndex.load(index_dir / info["path"], info["type"], params), encoder)
