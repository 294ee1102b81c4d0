"""FAISS and BM25 indexes, and the resumable index builder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest

from autorefine.files import file_sha256
from retriever_server.build import BuildError, build_index
from retriever_server.corpus import CorpusError, DocumentStore
from retriever_server.encoders import DenseEncoder
from retriever_server.indexes import (
    BM25Index,
    FaissIndex,
    IndexBuildError,
    build_faiss_index,
    configure_threads,
    default_params,
    factory_string,
    index_factory,
    resolve_params,
)
from retriever_server.manifest import read_manifest

DEMO_DIR = Path(__file__).resolve().parent.parent / "data" / "demo"


def _unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _numpy_topk(corpus: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries @ corpus.T
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, rows, axis=1), rows


def _faiss(kind: str, x: np.ndarray, **given: Any) -> FaissIndex:
    params = resolve_params(kind, len(x), x.shape[1], given)
    return FaissIndex(
        build_faiss_index(kind, x.shape[1], params, lambda: iter([x[:300], x[300:]]), lambda: x), kind, params
    )


def test_flat_equals_numpy_brute_force() -> None:
    x, q = _unit_vectors(1000, 64, 0), _unit_vectors(50, 64, 1)
    scores, rows = _faiss("flat", x).search(q, 5)
    expected_scores, expected_rows = _numpy_topk(x, q, 5)
    np.testing.assert_array_equal(rows, expected_rows)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)


def test_flat_on_real_embeddings_equals_numpy(wiki200_flat_index: Path, minilm_encoder: DenseEncoder) -> None:
    shards = sorted((wiki200_flat_index / "embeddings").glob("emb_*.npy"))
    x = np.concatenate([np.load(p) for p in shards])
    q = minilm_encoder.encode_queries(
        ["who was a lobbyist for Genentech", "Algonkin vocabulary", "football club"]
    )
    index = FaissIndex.load(wiki200_flat_index / "index.faiss", "flat", {})
    scores, rows = index.search(q, 10)
    np.testing.assert_array_equal(rows, _numpy_topk(x, q, 10)[1])
    np.testing.assert_allclose(scores, _numpy_topk(x, q, 10)[0], atol=1e-5)


def test_k_larger_than_corpus_is_clamped() -> None:
    x = _unit_vectors(7, 16, 2)
    scores, rows = _faiss("flat", x).search(x[:2], 50)
    assert rows.shape == scores.shape == (2, 7)
    assert sorted(rows[0].tolist()) == list(range(7))


def test_save_load_round_trip(tmp_path: Path) -> None:
    x = _unit_vectors(500, 32, 3)
    index = _faiss("hnsw", x, M=8, efConstruction=40, efSearch=32)
    index.save(tmp_path / "i.faiss")
    loaded = FaissIndex.load(tmp_path / "i.faiss", "hnsw", {**index.params, "efSearch": 64})
    assert faiss.downcast_index(loaded.index).hnsw.efSearch == 64
    np.testing.assert_array_equal(loaded.search(x[:20], 3)[1], index.search(x[:20], 3)[1])


def test_indexes_are_built_from_factory_strings_with_their_parameters() -> None:
    x = _unit_vectors(2000, 32, 10)
    flat = _faiss("flat", x).index
    assert type(flat) is faiss.IndexFlat and flat.metric_type == faiss.METRIC_INNER_PRODUCT
    hnsw = _faiss("hnsw", x, M=8, efConstruction=40, efSearch=24)
    assert factory_string("hnsw", hnsw.params) == "HNSW8" and type(hnsw.index) is faiss.IndexHNSWFlat
    assert (hnsw.index.hnsw.efConstruction, hnsw.index.hnsw.efSearch) == (40, 24)
    refines = {"sq8": faiss.IndexScalarQuantizer, "flat": faiss.IndexFlat, "none": None}
    for refine, refine_class in refines.items():
        built = _faiss("ivfpq", x, nlist=16, m=8, nbits=4, nprobe=5, refine=refine, k_factor=6)
        suffix = {"sq8": ",Refine(SQ8)", "flat": ",Refine(Flat)", "none": ""}[refine]
        assert factory_string("ivfpq", built.params) == f"IVF16,PQ8x4np{suffix}"
        ivf = faiss.downcast_index(faiss.extract_index_ivf(built.index))
        assert type(ivf) is faiss.IndexIVFPQ and ivf.metric_type == faiss.METRIC_INNER_PRODUCT
        assert (ivf.nlist, ivf.pq.M, ivf.pq.nbits, ivf.nprobe) == (16, 8, 4, 5)
        assert not ivf.do_polysemous_training  # as IndexIVFPQ() builds it, hence "np" in the string
        if refine_class is None:
            assert type(built.index) is faiss.IndexIVFPQ
        else:
            assert type(built.index) is faiss.IndexRefine and built.index.k_factor == 6
            assert type(faiss.downcast_index(built.index.refine_index)) is refine_class


def test_search_parameters_are_applied_when_loading(tmp_path: Path) -> None:
    x = _unit_vectors(2000, 32, 11)
    built = _faiss("ivfpq", x, nlist=16, m=8, nbits=4, nprobe=5, refine="sq8", k_factor=6)
    built.save(tmp_path / "ivfpq.faiss")
    for k_factor in (3, 2.5):  # a fraction comes from an imported file's own IndexRefine
        loaded = FaissIndex.load(
            tmp_path / "ivfpq.faiss", "ivfpq", {**built.params, "nprobe": 7, "k_factor": k_factor}
        )
        assert faiss.extract_index_ivf(loaded.index).nprobe == 7 and loaded.index.k_factor == k_factor


def test_manifests_without_a_factory_string_derive_it_from_their_parameters() -> None:
    ivfpq = {"nlist": 76, "m": 16, "nbits": 6, "nprobe": 32, "refine": "flat", "k_factor": 8}
    assert index_factory({"type": "ivfpq", "params": ivfpq}) == "IVF76,PQ16x6np,Refine(Flat)"
    assert (
        index_factory({"type": "hnsw", "params": {"M": 32, "efConstruction": 200, "efSearch": 128}})
        == "HNSW32"
    )
    assert index_factory({"type": "flat", "factory": "Flat", "params": {}}) == "Flat"
    assert index_factory({"type": "flat", "params": {}, "imported": {"faiss_class": "IndexFlatIP"}}) is None
    assert index_factory({"type": "bm25", "params": {"k1": 1.5, "b": 0.75}}) is None


def _anonymous_rss_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("RssAnon:")).split()[1]) / 1024


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc (Linux)")
def test_faiss_files_are_opened_memory_mapped(tmp_path: Path) -> None:
    x, q = _unit_vectors(2000, 64, 4), _unit_vectors(20, 64, 5)
    for kind in ("flat", "hnsw", "ivfpq"):
        built = _faiss(kind, x)
        path = tmp_path / f"{kind}.faiss"
        built.save(path)
        loaded = FaissIndex.load(path, kind, built.params)
        assert str(path) in Path("/proc/self/maps").read_text(), kind  # the file is mapped, not copied
        np.testing.assert_array_equal(loaded.search(q, 5)[1], built.search(q, 5)[1])
    # A flat index does not take its size in anonymous memory to open (62 GB for wiki-18 with e5-base).
    big = faiss.IndexFlatIP(256)
    big.add(_unit_vectors(60_000, 256, 6))  # 61 MB
    faiss.write_index(big, str(tmp_path / "big.faiss"))
    del big
    before = _anonymous_rss_mb()
    opened = FaissIndex.load(tmp_path / "big.faiss", "flat", {})
    assert _anonymous_rss_mb() - before < 15, "the vectors were read into anonymous memory"
    assert opened.ntotal == 60_000 and opened.search(q[:1, :1].repeat(256, axis=1) / 16, 1)[1].shape == (1, 1)


# --- the GPU clone, with FAISS's GPU entry points faked (no GPU here) ------------------------------------
#
# faiss-cpu has the Python helper `index_cpu_to_all_gpus` (faiss/gpu_wrappers.py) but not the SWIG GPU API
# it calls. The fakes below stand in for exactly those names, with faiss-gpu's signatures: the real helper
# runs, `StandardGpuResources()` per GPU, `index_cpu_to_gpu_multiple(GpuResourcesVector, Int32Vector,
# index, GpuMultipleClonerOptions)`, `GpuParameterSpace().set_index_parameter(index, name, value)`. A CPU
# clone stands in for the GPU index. Failures raise RuntimeError, as FAISS's C++ exceptions do.

CUDA_OOM = (
    "Error in virtual void* faiss::gpu::StandardGpuResourcesImpl::allocMemory(const faiss::gpu::AllocRequest&) "
    "at /project/faiss/faiss/gpu/StandardGpuResources.cpp:570: Error: 'err == cudaSuccess' failed: "
    "StandardGpuResources: alloc fail type TemporaryMemoryBuffer dev 0 space Device stream 0x0 size "
    "1610612736 bytes (cudaMalloc error out of memory [2])"
)


class FakeGpuMultipleClonerOptions:
    """faiss.GpuMultipleClonerOptions: a struct of cloning options (the fields FAISS defines)."""

    def __init__(self) -> None:
        self.indicesOptions = 1
        self.useFloat16CoarseQuantizer = False
        self.useFloat16 = False
        self.usePrecomputed = False
        self.reserveVecs = 0
        self.storeTransposed = False
        self.verbose = False
        self.use_cuvs = False
        self.allowCpuCoarseQuantizer = False
        self.shard = False
        self.shard_type = 1
        self.common_ivf_quantizer = False


class FakeGpu:
    """Installs the fake GPU API on the faiss module; `fail` names the step that raises."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, gpus: int = 2, fail: str | None = None) -> None:
        self.fail = fail
        self.clones: list[tuple[list[int], Any, FakeGpuMultipleClonerOptions]] = []
        self.parameters: list[tuple[Any, str, Any]] = []
        self.gpu_indexes: list[Any] = []  # what the fake cloner returned
        fake = self

        class StandardGpuResources:
            def __init__(self) -> None:
                if fake.fail == "resources":
                    raise RuntimeError(CUDA_OOM)

        class GpuResourcesVector(list):
            def push_back(self, item: Any) -> None:
                self.append(item)

        def index_cpu_to_gpu_multiple(resources: Any, devices: Any, index: Any, options: Any) -> Any:
            if fake.fail == "clone":
                raise RuntimeError(
                    "Error in faiss::Index* faiss::gpu::ToGpuCloner::clone_Index: This index type is not implemented on GPU."
                )
            fake.clones.append(([devices.at(i) for i in range(devices.size())], index, options))
            fake.gpu_indexes.append(faiss.clone_index(index))
            return fake.gpu_indexes[-1]

        class GpuParameterSpace:
            def set_index_parameter(self, index: Any, name: str, value: Any) -> None:
                if fake.fail == "nprobe":
                    raise RuntimeError("Error in GpuParameterSpace::set_index_parameter: unknown parameter")
                fake.parameters.append((index, name, value))

        for module in (faiss, faiss.gpu_wrappers):
            monkeypatch.setattr(module, "get_num_gpus", lambda: gpus)
            monkeypatch.setattr(module, "StandardGpuResources", StandardGpuResources, raising=False)
            monkeypatch.setattr(module, "GpuResourcesVector", GpuResourcesVector, raising=False)
            monkeypatch.setattr(module, "index_cpu_to_gpu_multiple", index_cpu_to_gpu_multiple, raising=False)
        monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", FakeGpuMultipleClonerOptions, raising=False)
        monkeypatch.setattr(faiss, "GpuParameterSpace", GpuParameterSpace, raising=False)


def _saved(tmp_path: Path, kind: str, **given: Any) -> tuple[Path, FaissIndex]:
    x = _unit_vectors(3000, 64, 7)
    if kind == "ivf":  # another IVF index imported as is (IVF-Flat): no build parameters recorded
        quantizer = faiss.IndexFlatIP(64)
        raw = faiss.IndexIVFFlat(quantizer, 64, 16, faiss.METRIC_INNER_PRODUCT)
        raw.train(x)
        raw.add(x)
        raw.nprobe = 5
        index = FaissIndex(raw, "ivf", {})
    else:
        index = _faiss(kind, x, **given)
    path = tmp_path / f"{kind}.faiss"
    index.save(path)
    return path, index


CLONED_KINDS = [("flat", {}), ("ivfpq", {"refine": "sq8"}), ("ivfpq", {"refine": "none"}), ("ivf", {})]


FAILURES = [
    pytest.param(kind, given, fail, id=f"{name}-{fail}")
    for (kind, given), name in zip(CLONED_KINDS, ["flat", "ivfpq-sq8", "ivfpq", "ivf"], strict=True)
    for fail in ("resources", "clone", "nprobe")
    if not (kind == "flat" and fail == "nprobe")  # a flat index has no nprobe to set
]


@pytest.mark.parametrize(("kind", "given", "fail"), FAILURES)
def test_a_failed_gpu_clone_leaves_the_cpu_index_as_it_was(
    kind: str,
    given: dict[str, Any],
    fail: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path, built = _saved(tmp_path, kind, **given)
    q = _unit_vectors(30, 64, 8)
    params = {**built.params, "nprobe": 3} if kind != "flat" else {}
    on_cpu = FaissIndex.load(path, kind, params, use_gpu=False)
    gpu = FakeGpu(monkeypatch, fail=fail)
    loaded = FaissIndex.load(path, kind, params)
    assert (loaded.on_gpu, loaded._keep) == (False, [])
    assert type(loaded.index) is type(on_cpu.index)
    assert all(loaded.index is not clone for clone in gpu.gpu_indexes)  # not a half-configured GPU index
    if kind != "flat":
        assert faiss.extract_index_ivf(loaded.index).nprobe == 3
    if isinstance(on_cpu.index, faiss.IndexRefine):
        assert loaded.index.k_factor == on_cpu.index.k_factor
    for k in (1, 5):
        np.testing.assert_array_equal(loaded.search(q, k)[1], on_cpu.search(q, k)[1])
    assert "keeping the" in caplog.text and "on CPU: the GPU clone failed" in caplog.text


@pytest.mark.parametrize(("kind", "given"), CLONED_KINDS, ids=["flat", "ivfpq-sq8", "ivfpq", "ivf"])
def test_gpu_clone_shards_over_every_gpu_in_fp16_and_keeps_search_parameters(
    kind: str, given: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, built = _saved(tmp_path, kind, **given)
    q = _unit_vectors(30, 64, 9)
    params = {**built.params, "nprobe": 3} if kind != "flat" else {}
    on_cpu = FaissIndex.load(path, kind, params, use_gpu=False)
    gpu = FakeGpu(monkeypatch, gpus=2)
    loaded = FaissIndex.load(path, kind, params)
    assert loaded.on_gpu
    [(devices, cloned, options)] = gpu.clones
    assert devices == [0, 1] and options.shard and options.useFloat16
    refine = isinstance(on_cpu.index, faiss.IndexRefine)
    assert type(cloned).__name__ == ("IndexIVFPQ" if refine else type(on_cpu.index).__name__)
    if kind == "flat":
        assert gpu.parameters == []
    else:  # the GPU index visits as many lists as the CPU one was told to
        assert [(name, value) for _, name, value in gpu.parameters] == [("nprobe", 3)]
    if refine:  # IVF-PQ on the GPUs, its refinement on CPU, the parts' owners kept alive
        assert isinstance(loaded.index, faiss.IndexRefine) and loaded.index.k_factor == on_cpu.index.k_factor
    else:
        assert loaded.index is gpu.gpu_indexes[0]
    np.testing.assert_array_equal(loaded.search(q, 5)[1], on_cpu.search(q, 5)[1])


def test_ivfpq_defaults_follow_corpus_size_and_dim() -> None:
    small, large = default_params("ivfpq", 4858, 384), default_params("ivfpq", 21_000_000, 768)
    assert small["nlist"] * 39 <= 4858 and 2 ** small["nbits"] * 39 <= 4858
    assert 384 % small["m"] == 0 and 768 % large["m"] == 0
    assert large["nbits"] == 8 and large["nlist"] > 10_000
    assert 1 <= small["nprobe"] <= small["nlist"]


def test_bad_parameters_are_errors() -> None:
    with pytest.raises(IndexBuildError, match="has no parameter 'nlist'"):
        resolve_params("hnsw", 100, 32, {"nlist": 4})
    with pytest.raises(IndexBuildError, match="must divide"):
        resolve_params("ivfpq", 10_000, 384, {"m": 7})
    with pytest.raises(IndexBuildError, match="positive integer"):
        resolve_params("hnsw", 100, 32, {"M": 0})
    with pytest.raises(IndexBuildError, match="unknown index type"):
        resolve_params("lsh", 100, 32, {})


def test_configure_threads_sets_faiss_pool() -> None:
    assert configure_threads(1, torch_threads=False) == 1
    assert faiss.omp_get_max_threads() == 1
    configure_threads(None, torch_threads=False)


def _recall_at_3(index_dir: Path, flat_dir: Path, queries: np.ndarray) -> float:
    def rows(directory: Path) -> np.ndarray:
        manifest = read_manifest(directory)
        info = manifest["index"]
        return FaissIndex.load(directory / info["path"], info["type"], info["params"]).search(queries, 3)[1]

    approx, exact = rows(index_dir), rows(flat_dir)
    return float(np.mean([len(set(a) & set(b)) / 3 for a, b in zip(approx, exact, strict=True)]))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_approximate_indexes_reach_recall_at_3(
    kind: str, demo_flat_index: Path, minilm_encoder: DenseEncoder, tmp_path: Path
) -> None:
    # The flat index's embedding shards are reused: no passage is encoded again.
    result = build_index(
        DEMO_DIR / "corpus.jsonl",
        tmp_path / kind,
        index_type=kind,
        shard_size=1024,
        shards_dir=demo_flat_index / "embeddings",
        progress=False,
    )
    assert result.shards_encoded == [] and len(result.shards_reused) == 5
    questions = [
        json.loads(line)["question"]
        for name in ("hotpotqa_dev.jsonl", "hotpotqa_train.jsonl")
        for line in (DEMO_DIR / name).read_text("utf-8").splitlines()
    ]
    recall = _recall_at_3(tmp_path / kind, demo_flat_index, minilm_encoder.encode_queries(questions))
    assert recall >= 0.95, f"{kind} recall@3 {recall:.3f} against flat"


def test_bm25_build_and_search(demo_bm25_index: Path) -> None:
    manifest = read_manifest(demo_bm25_index)
    assert manifest["index"]["type"] == "bm25" and manifest["encoder"]["family"] == "bm25"
    index = BM25Index.load(demo_bm25_index / "bm25", manifest["index"]["params"])
    store = DocumentStore(manifest["corpus"]["path"], demo_bm25_index / "offsets.npy")
    scores, rows = index.search(
        ["Corliss Archer radio program Golden Age", "Shirley Temple Black actress diplomat"], 3
    )
    assert rows.shape == (2, 3) and np.all(np.diff(scores, axis=1) <= 0)
    assert store.get(int(rows[0, 0]))["contents"].startswith('"Meet Corliss Archer"')
    assert store.get(int(rows[1, 0]))["contents"].startswith('"Shirley Temple"')


def test_bm25_query_of_unknown_words_still_answers(demo_bm25_index: Path) -> None:
    index = BM25Index.load(demo_bm25_index / "bm25", {})
    scores, rows = index.search(["zzzqqq xxyyzz", "the of and"], 2)
    assert rows.shape == (2, 2) and np.all(scores == 0)


def test_bm25_small_corpus_in_memory(tmp_path: Path) -> None:
    index = BM25Index.build(iter(["alpha beta", "beta gamma", "gamma delta"]), {"k1": 1.5, "b": 0.75})
    index.save(tmp_path / "bm25")
    loaded = BM25Index.load(tmp_path / "bm25", {})
    scores, rows = loaded.search(["delta"], 10)
    assert rows.shape == (1, 3) and rows[0, 0] == 2 and scores[0, 0] > 0


# ---- the builder -------------------------------------------------------------------------------------


@pytest.fixture
def corpus48(wiki200_corpus: Path, tmp_path: Path) -> Path:
    path = tmp_path / "c48.jsonl"
    path.write_bytes(b"".join(wiki200_corpus.read_bytes().splitlines(keepends=True)[:48]))
    return path


class _Crash(RuntimeError):
    pass


def _count_encodes(monkeypatch: pytest.MonkeyPatch, crash_on_call: int | None = None) -> list[int]:
    calls: list[int] = []
    original = DenseEncoder.encode_passages

    def counting(self: DenseEncoder, passages: list[str], batch_size: int | None = None) -> np.ndarray:
        calls.append(len(passages))
        if crash_on_call is not None and len(calls) == crash_on_call:
            raise _Crash("simulated crash")
        return original(self, passages, batch_size)

    monkeypatch.setattr(DenseEncoder, "encode_passages", counting)
    return calls


def test_interrupted_build_resumes_from_completed_shards(
    corpus48: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "resumed"
    calls = _count_encodes(monkeypatch, crash_on_call=2)
    with pytest.raises(_Crash):
        build_index(corpus48, out, shard_size=16, progress=False)
    assert not (out / "manifest.json").exists()  # an unfinished index is never mistaken for a finished one
    first = out / "embeddings" / "emb_000000.npy"
    assert first.is_file() and not (out / "embeddings" / "emb_000001.npy").exists()
    first_mtime = first.stat().st_mtime_ns

    monkeypatch.undo()
    calls = _count_encodes(monkeypatch)
    result = build_index(corpus48, out, shard_size=16, progress=False)
    assert result.shards_reused == [0] and result.shards_encoded == [1, 2]
    assert calls == [16, 16]  # only the two missing shards were encoded
    assert first.stat().st_mtime_ns == first_mtime

    fresh = build_index(corpus48, tmp_path / "fresh", shard_size=16, progress=False)
    assert fresh.shards_encoded == [0, 1, 2]
    for i in range(3):
        name = f"emb_{i:06d}.npy"
        np.testing.assert_allclose(
            np.load(out / "embeddings" / name), np.load(tmp_path / "fresh" / "embeddings" / name), atol=1e-6
        )
    a = FaissIndex.load(out / "index.faiss", "flat", {})
    b = FaissIndex.load(tmp_path / "fresh" / "index.faiss", "flat", {})
    probe = np.load(out / "embeddings" / "emb_000002.npy")
    np.testing.assert_array_equal(a.search(probe, 5)[1], b.search(probe, 5)[1])
    assert result.manifest["corpus"]["passages"] == fresh.manifest["corpus"]["passages"] == 48


def test_shards_of_another_encoder_are_not_reused(
    corpus48: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "idx"
    build_index(corpus48, out, shard_size=16, progress=False)
    calls = _count_encodes(monkeypatch)
    result = build_index(corpus48, out, shard_size=16, family="e5", force=True, progress=False)
    assert result.shards_encoded == [0, 1, 2] and calls == [16, 16, 16]
    assert result.manifest["encoder"]["passage_prefix"] == "passage: "


def test_finished_index_not_overwritten_without_force(corpus48: Path, tmp_path: Path) -> None:
    out = tmp_path / "idx"
    build_index(corpus48, out, index_type="bm25", progress=False)
    again = build_index(corpus48, out, index_type="bm25", progress=False)
    assert again.up_to_date
    with pytest.raises(BuildError, match=r"different configuration \(index.params differ\).*--force"):
        build_index(corpus48, out, index_type="bm25", index_params={"k1": 0.9}, progress=False)
    rebuilt = build_index(
        corpus48, out, index_type="bm25", index_params={"k1": 0.9}, force=True, progress=False
    )
    assert rebuilt.manifest["index"]["params"]["k1"] == 0.9


def test_changed_corpus_is_not_up_to_date(corpus48: Path, tmp_path: Path) -> None:
    out = tmp_path / "idx"
    build_index(corpus48, out, index_type="bm25", progress=False)
    corpus48.write_bytes(corpus48.read_bytes().replace(b"Evan", b"Ivan", 1))  # same size, new content
    with pytest.raises(BuildError, match="corpus"):
        build_index(corpus48, out, index_type="bm25", progress=False)


def test_manifest_records_corpus_encoder_index_and_versions(
    wiki200_flat_index: Path, wiki200_corpus: Path
) -> None:
    manifest = read_manifest(wiki200_flat_index)
    assert manifest["corpus"]["sha256"] == file_sha256(wiki200_corpus)
    assert manifest["corpus"]["size_bytes"] == wiki200_corpus.stat().st_size
    assert (manifest["corpus"]["passages"], manifest["corpus"]["skipped_lines"]) == (200, 0)
    encoder = manifest["encoder"]
    assert {
        k: encoder[k] for k in ("family", "pooling", "query_prefix", "passage_prefix", "query_instruction")
    } == {
        "family": "sentence-transformers",
        "pooling": "mean",
        "query_prefix": "",
        "passage_prefix": "",
        "query_instruction": "",
    }
    assert encoder["max_length"] == 256 and manifest["dim"] == encoder["dim"] == 384
    assert manifest["index"] == {
        "type": "flat",
        "factory": "Flat",
        "params": {},
        "path": "index.faiss",
        "ntotal": 200,
        "metric": "inner_product",
    }
    assert manifest["build"]["seconds"] > 0 and {"faiss-cpu", "torch", "numpy"} <= set(manifest["versions"])


def test_skip_malformed_count_in_manifest(tmp_path: Path) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(
        '{"id": 1, "contents": "A\\nalpha"}\n{oops\n\n{"id": 2, "title": "B", "text": "beta"}\n'
    )
    with pytest.raises(CorpusError, match=r"c\.jsonl:2"):
        build_index(corpus, tmp_path / "strict", index_type="bm25", progress=False)
    manifest = build_index(
        corpus, tmp_path / "lenient", index_type="bm25", skip_malformed=True, progress=False
    ).manifest
    assert (manifest["corpus"]["passages"], manifest["corpus"]["skipped_lines"]) == (2, 1)
