"""Adopting a FAISS index built elsewhere: `retriever-server build --import-faiss FILE`.

Search-R1 / AutoRefine users already hold wiki-18 e5 indexes (`e5_Flat.index`, an IndexFlatIP over 21M
e5-base-v2 passage vectors in corpus order; `e5_HNSW64.index`); encoding 21M passages again takes hours
of GPU time. An import scans the corpus as a build does, checks the file against the corpus and the
encoder (count, dimension, inner-product metric, and a spot check that a few passages encode to the
vectors at their rows), and writes a manifest, so `serve` loads it like an index we built.

Reading the file without loading it: opened like `serve` opens indexes (`indexes.mmap_flags`, which
documents what FAISS can map). `IO_FLAG_ONDISK_SAME_DIR` concerns IVF lists kept in a separate
`.ivfdata` file only, and `IO_FLAG_MMAP | IO_FLAG_MMAP_IFC` fails on IVF files.

Placing the file (`--import-mode`): `auto` hard-links it into the index directory as `index.faiss` (no
copy; the directory stays self-contained) or, where no hard link can be made (another filesystem),
records its absolute path; `reference` always records the path; `copy` copies it. In every mode the
file's size and fingerprint go into the manifest, and `serve` checks them as it checks the corpus.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from autorefine.files import atomic_path
from retriever_server.build import (
    BuildError,
    BuildResult,
    check_existing,
    encoder_manifest,
    imported_identity,
    progress_bar,
    requested_config,
)
from retriever_server.corpus import OFFSETS_FILE, DocumentStore, corpus_fingerprint, scan_corpus
from retriever_server.encoders import BM25, DenseEncoder, resolve_encoder_spec
from retriever_server.indexes import FAISS_FILE, configure_threads, mmap_flags
from retriever_server.manifest import MANIFEST_FILE, new_manifest, read_manifest, write_manifest

logger = logging.getLogger(__name__)

IMPORT_MODES = ("auto", "reference", "copy")
DEFAULT_VERIFY_ROWS = 16
# Same passage, same encoder: cosine ~1 (fp16 vs fp32 moves it by ~1e-3, a different truncation length
# by a few 1e-2 on the rare long passage); another passage, or a missing "passage: " prefix, lands lower.
_MIN_COSINE = 0.95
_NORM_TOLERANCE = 0.02
# Which search-time parameters each imported kind can take (everything else is fixed by the file).
_SEARCH_PARAMS = {"flat": (), "hnsw": ("efSearch",), "ivfpq": ("nprobe", "k_factor"), "ivf": ("nprobe",)}


@dataclass(frozen=True)
class ForeignIndex:
    """A FAISS file opened with its vectors memory-mapped, and what it holds."""

    path: Path
    faiss_class: str
    kind: str
    dim: int
    ntotal: int
    metric_type: int
    params: dict[str, Any]
    index: Any


def _faiss_reason(err: Exception) -> str:
    # FAISS errors read "Error in <signature> at <file>:<line>: Error: '<check>' failed: <reason>".
    text = str(err).strip()
    return text.rsplit("Error: ", 1)[-1].splitlines()[0] if text else type(err).__name__


def open_foreign_index(path: str | os.PathLike[str]) -> ForeignIndex:
    """Open a FAISS index file memory-mapped where FAISS allows; detect its kind and parameters."""
    import faiss

    path = Path(path)
    if not path.is_file():
        raise BuildError(f"FAISS index file not found: {path}")
    try:
        index = faiss.read_index(str(path), mmap_flags())
    except RuntimeError as err:
        raise BuildError(
            f"{path} is not a FAISS index that faiss {faiss.__version__} can read ({_faiss_reason(err)})"
        ) from None
    top = faiss.downcast_index(index)
    kind, params = _kind_and_params(top, path)
    return ForeignIndex(
        path=path,
        faiss_class=type(top).__name__,
        kind=kind,
        dim=int(top.d),
        ntotal=int(top.ntotal),
        metric_type=int(top.metric_type),
        params=params,
        index=index,  # the owner: `top` is a view that dies with it
    )


def _kind_and_params(top: Any, path: Path) -> tuple[str, dict[str, Any]]:
    import faiss

    name = type(top).__name__
    if isinstance(top, faiss.IndexIDMap | faiss.IndexIDMap2):
        raise BuildError(
            f"{path} is an {name}: it answers with its own ids, not corpus row numbers; "
            "import the index it wraps (faiss.downcast_index(index.index)) instead"
        )
    if isinstance(top, faiss.IndexFlat):
        return "flat", {}
    if isinstance(top, faiss.IndexHNSW):
        hnsw = top.hnsw
        # Level 0 keeps 2·M neighbours per node (FAISS's HNSW(M) layout).
        m = int(faiss.vector_to_array(hnsw.cum_nneighbor_per_level)[1]) // 2
        return "hnsw", {"M": m, "efConstruction": int(hnsw.efConstruction), "efSearch": int(hnsw.efSearch)}
    try:
        ivf = faiss.downcast_index(faiss.extract_index_ivf(top))
    except RuntimeError:
        raise BuildError(
            f"{path}: {name} indexes cannot be imported; supported are flat (IndexFlatIP), "
            "HNSW (IndexHNSW*) and IVF (IndexIVF*, optionally inside IndexRefine)"
        ) from None
    params: dict[str, Any] = {"nlist": int(ivf.nlist), "nprobe": int(ivf.nprobe)}
    plain = isinstance(top, faiss.IndexIVF | faiss.IndexRefine)  # not inside an IndexPreTransform
    if not (plain and isinstance(ivf, faiss.IndexIVFPQ)):
        return "ivf", params
    params.update(m=int(ivf.pq.M), nbits=int(ivf.pq.nbits), refine="none")
    if isinstance(top, faiss.IndexRefine):
        params["refine"] = _refine_name(top.refine_index)
        k_factor = float(top.k_factor)
        params["k_factor"] = int(k_factor) if k_factor.is_integer() else k_factor
    return "ivfpq", params


def _refine_name(refine: Any) -> str:
    import faiss

    refine = faiss.downcast_index(refine)
    if isinstance(refine, faiss.IndexFlat):
        return "flat"
    if isinstance(refine, faiss.IndexScalarQuantizer) and refine.sq.qtype == faiss.ScalarQuantizer.QT_8bit:
        return "sq8"
    return type(refine).__name__


def check_metric(foreign: ForeignIndex, encoder_name: str) -> None:
    """Refuse anything but inner product: the encoders' vectors are L2-normalized and scored by dot product."""
    import faiss

    if foreign.metric_type == faiss.METRIC_INNER_PRODUCT:
        return
    metric = "L2" if foreign.metric_type == faiss.METRIC_L2 else f"type {foreign.metric_type}"
    raise BuildError(
        f"{foreign.path} uses the {metric} metric; the {encoder_name} vectors are L2-normalized and "
        "searched by inner product, so only METRIC_INNER_PRODUCT indexes (e.g. IndexFlatIP, or "
        "faiss.index_factory(d, 'HNSW64', faiss.METRIC_INNER_PRODUCT)) can be imported"
    )


def search_params_for(foreign: ForeignIndex, given: dict[str, Any] | None) -> dict[str, Any]:
    """The file's parameters with search-time overrides; any other parameter is an error."""
    allowed = _SEARCH_PARAMS[foreign.kind]
    if foreign.kind == "ivfpq" and "k_factor" not in foreign.params:
        allowed = ("nprobe",)
    params = dict(foreign.params)
    for name, value in (given or {}).items():
        if value is None:
            continue
        if name not in allowed:
            raise BuildError(
                f"{name} cannot be set for an imported {foreign.kind} index, whose structure the file "
                f"fixes (search-time parameters it takes: {', '.join(allowed) or 'none'})"
            )
        params[name] = value
    return params


def spot_check(
    foreign: ForeignIndex, store: DocumentStore, encoder: DenseEncoder, n_rows: int
) -> dict[str, Any] | None:
    """Encode `n_rows` passages spread over the corpus; each must match the vector at its row.

    Catches another corpus order, another encoder and other conventions (prefix, pooling, truncation).
    Only indexes that store vectors exactly (flat, HNSW) can be checked; None for the others.
    """
    if n_rows <= 0 or foreign.kind not in ("flat", "hnsw"):
        return None
    rows = np.unique(np.linspace(0, len(store) - 1, min(n_rows, len(store))).round().astype(np.int64))
    try:
        # Reads only these rows' pages of a memory-mapped file.
        theirs = np.stack([foreign.index.reconstruct(int(row)) for row in rows])
    except RuntimeError as err:
        logger.warning("not spot-checking %s: %s", foreign.path, _faiss_reason(err))
        return None
    mine = encoder.encode_passages([store.get(int(row))["contents"] for row in rows])
    norms = np.linalg.norm(theirs, axis=1)
    cosines = np.sum(mine * theirs, axis=1) / np.maximum(norms * np.linalg.norm(mine, axis=1), 1e-12)
    worst = int(np.argmin(cosines))
    if cosines[worst] < _MIN_COSINE:
        raise BuildError(
            f"{foreign.path} does not hold this corpus's passages as {encoder.spec.name} encodes them: "
            f"passage row {int(rows[worst])} (id {store.get(int(rows[worst]))['id']}) encodes to a vector "
            f"with cosine {cosines[worst]:.3f} to the index's row {int(rows[worst])} "
            f"({int(np.sum(cosines < _MIN_COSINE))} of {len(rows)} checked rows below {_MIN_COSINE}); "
            "check the corpus file and its order, the encoder and its conventions (--family, --pooling, "
            "--max-length), or skip the check with --verify-rows 0"
        )
    off = int(np.argmax(np.abs(norms - 1)))
    if abs(norms[off] - 1) > _NORM_TOLERANCE:
        raise BuildError(
            f"{foreign.path} holds vectors that are not L2-normalized (row {int(rows[off])} has norm "
            f"{norms[off]:.3f}); {encoder.spec.name} queries are normalized, so inner products would not rank "
            "as the index's builder intended"
        )
    return {"rows": len(rows), "min_cosine": round(float(cosines.min()), 6)}


def place_index_file(source: Path, out: Path, mode: str) -> tuple[str, str]:
    """Put the foreign file where `serve` will find it; return (manifest path, mode used)."""
    target = out / FAISS_FILE
    if target.exists() and source.exists() and os.path.samefile(source, target):
        return FAISS_FILE, "in place"
    target.unlink(missing_ok=True)  # a previous build's index, replaced (the caller checked --force)
    if mode == "copy":
        with atomic_path(target) as partial:
            shutil.copyfile(source, partial)
        return FAISS_FILE, "copy"
    if mode == "auto":
        try:
            os.link(source, target)
            return FAISS_FILE, "hardlink"
        except OSError as err:  # EXDEV across filesystems; some filesystems have no hard links
            logger.info("cannot hard-link %s into %s (%s); referencing it by path", source, out, err)
    return str(source.resolve()), "reference"


def import_faiss_index(
    corpus: str | Path,
    out: str | Path,
    faiss_file: str | Path,
    *,
    encoder: str | None = None,
    family: str | None = None,
    pooling: str | None = None,
    max_length: int = 256,
    index_type: str | None = None,
    search_params: dict[str, Any] | None = None,
    mode: str = "auto",
    verify_rows: int = DEFAULT_VERIFY_ROWS,
    batch_size: int = 64,
    force: bool = False,
    threads: int | None = None,
    progress: bool = True,
) -> BuildResult:
    """Make `out` an index directory serving `faiss_file` over `corpus` (see the module docstring)."""
    started = time.perf_counter()
    corpus, out, source = Path(corpus), Path(out), Path(faiss_file)
    if mode not in IMPORT_MODES:
        raise BuildError(f"unknown import mode {mode!r} (choose from {', '.join(IMPORT_MODES)})")
    if not corpus.is_file():
        raise BuildError(f"corpus file not found: {corpus}")
    if (encoder or "").lower() == BM25 or index_type == BM25:
        raise BuildError("--import-faiss needs the dense encoder the FAISS index was built with, not bm25")
    spec = resolve_encoder_spec(encoder, family=family, pooling=pooling, max_length=max_length)
    foreign = open_foreign_index(source)
    if index_type is not None and index_type != foreign.kind:
        raise BuildError(f"{source} is a {foreign.kind} index ({foreign.faiss_class}), not {index_type}")
    check_metric(foreign, spec.name)
    params = search_params_for(foreign, search_params)
    given = {k: v for k, v in (search_params or {}).items() if v is not None}
    imported = {
        "source": str(source.resolve()),
        "size_bytes": source.stat().st_size,
        "fingerprint": corpus_fingerprint(source),
        "faiss_class": foreign.faiss_class,
    }
    out.mkdir(parents=True, exist_ok=True)
    requested = requested_config(corpus, spec, foreign.kind, given, False, imported_identity(imported))
    if check_existing(out, corpus, requested, given, force):
        logger.info("%s is up to date", out)
        return BuildResult(manifest=read_manifest(out), up_to_date=True)
    (out / MANIFEST_FILE).unlink(missing_ok=True)
    configure_threads(threads)

    dense = DenseEncoder(spec, batch_size=batch_size)  # loaded first: a wrong dimension fails in seconds
    if dense.dim != foreign.dim:
        raise BuildError(
            f"{source} holds {foreign.dim}-dimensional vectors but encoder {spec.name} makes "
            f"{dense.dim}-dimensional ones; name the encoder the index was built with (--encoder)"
        )
    scan_bar = progress_bar(corpus.stat().st_size, "scanning corpus", "B", progress)
    try:
        scan = scan_corpus(corpus, out / OFFSETS_FILE, progress=scan_bar.update)
    finally:
        scan_bar.close()
    if foreign.ntotal != scan.passages:
        raise BuildError(
            f"{source} holds {foreign.ntotal} vectors but corpus {corpus} has {scan.passages} passages; "
            "the index's rows must be the corpus's passages, in file order"
        )
    store = DocumentStore(corpus, out / OFFSETS_FILE)
    try:
        checked = spot_check(foreign, store, dense, verify_rows)
    finally:
        store.close()
    path, placed = place_index_file(source, out, mode)
    index_info = {
        "type": foreign.kind,
        "params": params,
        "path": path,
        "ntotal": foreign.ntotal,
        "metric": "inner_product",
        "size_bytes": imported["size_bytes"],
        "fingerprint": imported["fingerprint"],
        "imported": {**imported, "mode": placed, "spot_check": checked},
    }
    manifest = new_manifest(
        scan, encoder_manifest(dense.spec), index_info, False, time.perf_counter() - started
    )
    write_manifest(out, manifest)
    return BuildResult(manifest=manifest)
