"""Search indexes behind one interface: FAISS inner-product flat / HNSW / IVF-PQ, and BM25 (bm25s).

`search(queries, k) -> (scores, rows)`: `queries` are embeddings (n, dim) for FAISS and strings for BM25;
both outputs are (n, k') arrays, best first, with k' = min(k, corpus size). Rows index the corpus's
offsets table. FAISS indexes go to all visible GPUs when there are any (HNSW stays on CPU).

FAISS files are opened memory-mapped (`IO_FLAG_MMAP_IFC`; faiss-cpu 1.15 measured): the vectors of flat
indexes, HNSW storage and graph, IVF inverted lists and refinement codes stay in the page cache instead of
anonymous memory (a 73 MB IndexFlatIP opens with +0.0 MB anonymous RSS), so a 62 GB flat index does not
need 62 GB of free RAM to open, and sharding it to GPUs copies each GPU's slice straight from the mapping.
What the mapping cannot do: an index opened so is read-only (FAISS aborts the process on `add`), CPU
search of a flat index still touches every page (serving flat on CPU wants its size in page cache), and
`IO_FLAG_MMAP` alone maps IVF lists only (flat and HNSW files are read whole).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from autorefine.files import atomic_path

logger = logging.getLogger(__name__)

FAISS_TYPES = ("flat", "hnsw", "ivfpq")
INDEX_TYPES = (*FAISS_TYPES, "bm25")
# "ivf": any other inverted-file index (IVF-Flat, IVF-SQ, …); imported (`--import-faiss`), never built.
IVF_TYPES = ("ivfpq", "ivf")
FAISS_FILE = "index.faiss"
BM25_DIR = "bm25"

# Tuning knobs per index type; `None` means "derive from corpus size and dim" (see default_params).
_PARAM_NAMES: dict[str, tuple[str, ...]] = {
    "flat": (),
    "hnsw": ("M", "efConstruction", "efSearch"),
    "ivfpq": ("nlist", "m", "nbits", "nprobe", "refine", "k_factor"),
    "bm25": ("k1", "b"),
}
# What each parameter may change after the build: search-time knobs can be overridden when serving.
SEARCH_TIME_PARAMS = ("efSearch", "nprobe", "k_factor")
# Which of them each kind takes ("ivf": another inverted-file index, perhaps inside an IndexRefine).
_SEARCH_PARAMS_OF = {"hnsw": ("efSearch",), "ivfpq": ("nprobe", "k_factor"), "ivf": ("nprobe", "k_factor")}
# Their names in faiss.ParameterSpace, which calls IndexRefine's k_factor "k_factor_rf".
_PARAMETER_SPACE_NAMES = {"efSearch": "efSearch", "nprobe": "nprobe", "k_factor": "k_factor_rf"}
REFINE_CHOICES = ("flat", "sq8", "none")
_GPU_PQ_M = (1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96)


def mmap_flags() -> int:
    """`read_index` flags that memory-map what this FAISS can map (IVF lists only before `IO_FLAG_MMAP_IFC`)."""
    import faiss

    return getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP)


def _nprobe(cpu_index: Any) -> int:
    """The inverted lists an IVF index visits per query, as set on the CPU index."""
    import faiss

    return int(faiss.extract_index_ivf(cpu_index).nprobe)


class IndexBuildError(ValueError):
    """An index cannot be built or loaded with the given parameters."""


class SearchIndex(Protocol):
    """What the server needs from any index."""

    kind: str
    ntotal: int

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k `(scores, rows)` per query, best first."""
        ...


def available_cores() -> int:
    """CPU cores this process may run on (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def configure_threads(threads: int | None = None, *, torch_threads: bool = True) -> int:
    """Size FAISS's OpenMP pool (and torch's, when asked) to `threads`, default the available cores."""
    import faiss

    n = threads or available_cores()
    faiss.omp_set_num_threads(n)
    if torch_threads:
        import torch

        torch.set_num_threads(n)
    return n


def default_params(kind: str, n: int, dim: int) -> dict[str, Any]:
    """Sensible parameters for an index over `n` vectors of `dim` dimensions."""
    if kind == "flat":
        return {}
    if kind == "hnsw":
        return {"M": 32, "efConstruction": 200, "efSearch": 128}
    if kind == "ivfpq":
        # ~4·sqrt(n) lists, but at least 39 training points per centroid (FAISS's own lower bound).
        nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
        # Sub-quantizers of >= 4 dimensions, among the code sizes GPU IVF-PQ supports (384 → 96, 768 → 96).
        m = max((c for c in _GPU_PQ_M if dim % c == 0 and c <= max(1, dim // 4)), default=1)
        # 2^nbits centroids per sub-quantizer, again with >= 39 training points each.
        nbits = max(1, min(8, int(math.log2(max(2, n // 39)))))
        return {
            "nlist": nlist,
            "m": m,
            "nbits": nbits,
            "nprobe": min(nlist, max(32, nlist // 32)),
            "refine": "sq8",
            "k_factor": 8,
        }
    if kind == "bm25":
        return {"k1": 1.5, "b": 0.75}
    raise IndexBuildError(f"unknown index type {kind!r} (choose from {', '.join(INDEX_TYPES)})")


def param_names(kind: str) -> tuple[str, ...]:
    """The build parameters an index type takes."""
    return _PARAM_NAMES.get(kind, ())


def resolve_params(kind: str, n: int, dim: int, given: dict[str, Any] | None = None) -> dict[str, Any]:
    """Defaults for `kind` updated with `given`; unknown names and invalid values are errors."""
    params = default_params(kind, n, dim)
    for name, value in (given or {}).items():
        if name not in _PARAM_NAMES[kind]:
            allowed = ", ".join(_PARAM_NAMES[kind]) or "none"
            raise IndexBuildError(f"index type {kind!r} has no parameter {name!r} (allowed: {allowed})")
        if value is not None:
            params[name] = value
    if kind == "ivfpq":
        if dim % params["m"]:
            raise IndexBuildError(f"ivfpq: m={params['m']} must divide the embedding dimension {dim}")
        if params["refine"] not in REFINE_CHOICES:
            raise IndexBuildError(f"ivfpq: refine must be one of {', '.join(REFINE_CHOICES)}")
        if params["nlist"] > n:
            raise IndexBuildError(f"ivfpq: nlist={params['nlist']} exceeds the {n} vectors to cluster")
    for name in ("M", "efConstruction", "efSearch", "nlist", "m", "nbits", "nprobe", "k_factor"):
        if name in params and (not isinstance(params[name], int) or params[name] <= 0):
            raise IndexBuildError(f"{kind}: {name} must be a positive integer, got {params[name]!r}")
    return params


def factory_string(kind: str, params: dict[str, Any]) -> str:
    """The `faiss.index_factory` description of the `kind` index we build with `params`."""
    if kind == "flat":
        return "Flat"
    if kind == "hnsw":
        return f"HNSW{params['M']}"
    if kind == "ivfpq":
        # "np": no polysemous training, which the factory adds by default and IndexIVFPQ itself does not.
        # Refinement re-scores the k·k_factor PQ candidates with better vectors, restoring the recall that
        # coarse PQ codes lose; per vector it costs dim bytes (sq8) or 4·dim bytes (flat) on top of the
        # m·nbits/8 bytes of PQ code.
        refine = {"none": "", "flat": ",Refine(Flat)", "sq8": ",Refine(SQ8)"}[params["refine"]]
        return f"IVF{params['nlist']},PQ{params['m']}x{params['nbits']}np{refine}"
    raise IndexBuildError(f"not a FAISS index type: {kind!r}")


def index_factory(info: dict[str, Any]) -> str | None:
    """The factory string of a manifest's `index` section; None for BM25 and imported FAISS files."""
    if info["type"] not in FAISS_TYPES or "imported" in info:
        return None
    # Manifests written before the factory string was recorded hold the parameters it derives from.
    return info.get("factory") or factory_string(info["type"], info["params"])


def set_search_params(index: Any, kind: str, params: dict[str, Any]) -> None:
    """Apply the search-time parameters `kind` takes (efSearch, nprobe, k_factor) to a CPU index."""
    import faiss

    space = faiss.ParameterSpace()
    for name in _SEARCH_PARAMS_OF.get(kind, ()):
        value = params.get(name)
        if not value:
            continue
        if name == "k_factor":
            if not isinstance(index, faiss.IndexRefine):
                continue  # IVF-PQ without refinement: nothing re-ranks
            if not float(value).is_integer():
                # ParameterSpace rounds k_factor down to an integer; an imported file may hold a fraction.
                index.k_factor = float(value)
                continue
        space.set_index_parameter(index, _PARAMETER_SPACE_NAMES[name], value)


def build_faiss_index(
    kind: str,
    dim: int,
    params: dict[str, Any],
    batches: Callable[[], Iterator[np.ndarray]],
    train_sample: Callable[[], np.ndarray] | None = None,
) -> Any:
    """Create (see `factory_string`), train (IVF-PQ) and fill a CPU FAISS index from re-iterable batches."""
    import faiss

    index = faiss.index_factory(dim, factory_string(kind, params), faiss.METRIC_INNER_PRODUCT)
    if kind == "hnsw":
        faiss.ParameterSpace().set_index_parameter(index, "efConstruction", params["efConstruction"])
    if not index.is_trained:
        if train_sample is None:
            raise IndexBuildError(f"{kind} needs a training sample")
        # Trains the coarse quantizer and PQ codebooks, and the 8-bit ranges of an SQ8 refinement.
        index.train(np.ascontiguousarray(train_sample(), dtype=np.float32))
    set_search_params(index, kind, params)
    for batch in batches():
        index.add(np.ascontiguousarray(batch, dtype=np.float32))
    return index


class FaissIndex:
    """A FAISS inner-product index (CPU or all visible GPUs) with its build parameters."""

    def __init__(self, index: Any, kind: str, params: dict[str, Any]) -> None:
        self.index = index
        self.kind = kind
        self.params = dict(params)
        self.ntotal = int(index.ntotal)
        self.dim = int(index.d)
        self.on_gpu = False
        self._keep: list[Any] = []  # SWIG objects the GPU wrapper points into
        self.search_seconds = 0.0

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], kind: str, params: dict[str, Any], *, use_gpu: bool = True
    ) -> FaissIndex:
        """Open an index file memory-mapped; apply search-time parameters; clone it to the GPUs if any."""
        import faiss

        if not Path(path).is_file():
            raise IndexBuildError(f"index file not found: {path}")
        loaded = cls(faiss.read_index(str(path), mmap_flags()), kind, params)
        set_search_params(loaded.index, kind, params)
        if use_gpu and kind != "hnsw" and faiss.get_num_gpus() > 0:
            loaded._to_all_gpus()
        return loaded

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the (CPU) index atomically."""
        import faiss

        with atomic_path(path) as partial:
            faiss.write_index(self.index, str(partial))

    def _to_all_gpus(self) -> None:
        """Clone the index onto all visible GPUs, or leave it exactly as it was on CPU if any step fails."""
        # Thin wrapper over FAISS's documented multi-GPU cloner: vectors sharded over the GPUs, fp16
        # storage / lookup tables (scores then carry fp16 rounding). Everything is built in locals and
        # swapped in at the end, so a failure half way (CUDA out of memory, a type the GPU cloner refuses)
        # leaves the CPU index, its parameters and `on_gpu` untouched.
        import faiss

        try:
            options = faiss.GpuMultipleClonerOptions()
            options.shard = True
            options.useFloat16 = True
            cpu = self.index
            if isinstance(cpu, faiss.IndexRefine):
                # The GPU cloner cannot copy IndexRefine: IVF-PQ goes to the GPUs, refinement stays on CPU.
                cpu_base = faiss.downcast_index(cpu.base_index)
                base = faiss.index_cpu_to_all_gpus(cpu_base, co=options)
                faiss.GpuParameterSpace().set_index_parameter(base, "nprobe", _nprobe(cpu_base))
                gpu = faiss.IndexRefine(base, faiss.downcast_index(cpu.refine_index))
                gpu.k_factor = cpu.k_factor
                keep = [cpu, base]  # the wrapper does not own its parts: keep their owners alive
            else:
                gpu = faiss.index_cpu_to_all_gpus(cpu, co=options)
                if self.kind in IVF_TYPES:
                    faiss.GpuParameterSpace().set_index_parameter(gpu, "nprobe", _nprobe(cpu))
                keep = []  # the mapped CPU index is released: the GPUs hold their own copies
        except (RuntimeError, AttributeError) as err:
            # RuntimeError: FAISS's C++ exceptions (e.g. GPU IVF-PQ wants nbits == 8; small demo indexes use
            # fewer). AttributeError: a FAISS build without the GPU API although get_num_gpus() > 0.
            logger.warning("keeping the %s index on CPU: the GPU clone failed (%s)", self.kind, err)
            return
        self.index, self._keep, self.on_gpu = gpu, keep, True

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k inner products for L2-normalized query embeddings."""
        import time

        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, self.ntotal)
        if len(queries) == 0 or k <= 0:
            return np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
        start = time.perf_counter()
        scores, rows = self.index.search(queries, k)
        self.search_seconds += time.perf_counter() - start
        return scores, rows


class BM25Index:
    """BM25 (bm25s) over the corpus; queries are raw strings."""

    kind = "bm25"

    def __init__(self, retriever: Any, params: dict[str, Any]) -> None:
        self.retriever = retriever
        self.params = dict(params)
        self.ntotal = int(retriever.scores["num_docs"])
        self.search_seconds = 0.0

    @classmethod
    def build(cls, texts: Iterator[str], params: dict[str, Any], *, show_progress: bool = False) -> BM25Index:
        """Tokenize and index passages (bm25s keeps the token lists in memory while indexing)."""
        import bm25s

        from retriever_server.encoders import bm25_tokenize

        tokens: list[list[str]] = []
        chunk: list[str] = []
        for text in texts:
            chunk.append(text)
            if len(chunk) == 10_000:
                tokens.extend(bm25_tokenize(chunk))
                chunk = []
        tokens.extend(bm25_tokenize(chunk))
        retriever = bm25s.BM25(k1=params["k1"], b=params["b"])
        retriever.index(tokens, show_progress=show_progress)
        return cls(retriever, params)

    @classmethod
    def load(cls, directory: str | os.PathLike[str], params: dict[str, Any]) -> BM25Index:
        """Load a saved index, memory-mapping its score matrix."""
        import bm25s

        if not Path(directory).is_dir():
            raise IndexBuildError(f"BM25 index directory not found: {directory}")
        return cls(bm25s.BM25.load(str(directory), mmap=True, show_progress=False, verbosity=0), params)

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write the index files into `directory`."""
        self.retriever.save(str(directory), show_progress=False)

    def search(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k BM25 scores per query string."""
        import time

        from retriever_server.encoders import bm25_tokenize

        k = min(k, self.ntotal)
        if not queries or k <= 0:
            return np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
        start = time.perf_counter()
        rows, scores = self.retriever.retrieve(bm25_tokenize(queries), k=k, show_progress=False)
        self.search_seconds += time.perf_counter() - start
        return np.asarray(scores, dtype=np.float32), np.asarray(rows, dtype=np.int64)
