"""`retriever-server build --import-faiss`: adopting FAISS indexes built elsewhere, served like our own."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import faiss
import httpx
import numpy as np
import pytest

from retriever_server.app import Retriever, ServeConfig, plan_serving
from retriever_server.build import BuildError
from retriever_server.imports import import_faiss_index, open_foreign_index
from retriever_server.manifest import ManifestMismatch, read_manifest
from tests.helpers import HOTPOTQA_DEV, REPO_ROOT

QUESTIONS = [json.loads(line)["question"] for line in HOTPOTQA_DEV.read_text("utf-8").splitlines()][:40]
PROBES = ["who was a lobbyist for Genentech", "Algonkin vocabulary", "football club", *QUESTIONS[:5]]


@pytest.fixture(scope="module")
def vectors(wiki200_flat_index: Path) -> np.ndarray:
    """The 200 MiniLM passage vectors our own build encoded, in corpus order."""
    shards = sorted((wiki200_flat_index / "embeddings").glob("emb_*.npy"))
    return np.concatenate([np.load(path) for path in shards])


def _write(index: Any, vectors: np.ndarray, path: Path) -> Path:
    if not index.is_trained:
        index.train(vectors)
    index.add(vectors)
    faiss.write_index(index, str(path))
    return path


@pytest.fixture(scope="module")
def foreign_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("foreign")


@pytest.fixture(scope="module")
def foreign_flat(foreign_dir: Path, vectors: np.ndarray) -> Path:
    """A flat file as Search-R1 writes e5_Flat.index: index_factory "Flat" with inner product."""
    index = faiss.index_factory(vectors.shape[1], "Flat", faiss.METRIC_INNER_PRODUCT)
    return _write(index, vectors, foreign_dir / "e5_Flat.index")


@pytest.fixture(scope="module")
def imported_flat(tmp_path_factory: pytest.TempPathFactory, wiki200_corpus: Path, foreign_flat: Path) -> Path:
    out = tmp_path_factory.mktemp("imported-flat")
    import_faiss_index(wiki200_corpus, out, foreign_flat, progress=False)
    return out


def _retrieve(url: str, queries: list[str], topk: int = 5) -> list[Any]:
    body = {"queries": queries, "topk": topk, "return_scores": True}
    return httpx.post(f"{url}/retrieve", json=body, timeout=120).raise_for_status().json()["result"]


def _ids(result: list[Any]) -> list[list[str]]:
    return [[hit["document"]["id"] for hit in hits] for hits in result]


def test_imported_flat_serves_exactly_what_our_build_serves(
    start_retriever: Any, wiki200_flat_index: Path, imported_flat: Path, foreign_flat: Path
) -> None:
    manifest = read_manifest(imported_flat)
    assert manifest["index"]["type"] == "flat" and manifest["index"]["path"] == "index.faiss"
    assert manifest["index"]["imported"]["mode"] == "hardlink"
    assert (imported_flat / "index.faiss").samefile(foreign_flat)  # no 2nd copy of a 64 GB file
    assert manifest["index"]["imported"]["spot_check"]["min_cosine"] > 0.999
    with start_retriever(wiki200_flat_index) as (own, _), start_retriever(imported_flat) as (imported, _):
        assert _retrieve(imported, PROBES) == _retrieve(own, PROBES)
        health = httpx.get(f"{imported}/health").json()
        assert (health["index_type"], health["corpus_size"], health["dim"]) == ("flat", 200, 384)


def test_imported_hnsw_serves_the_flat_ranking(
    start_retriever: Any,
    wiki200_corpus: Path,
    wiki200_flat_index: Path,
    foreign_dir: Path,
    vectors: np.ndarray,
    tmp_path: Path,
) -> None:
    index = faiss.index_factory(vectors.shape[1], "HNSW16", faiss.METRIC_INNER_PRODUCT)
    foreign = _write(index, vectors, foreign_dir / "e5_HNSW16.index")
    # efSearch 256 over 200 vectors visits them all: the graph search is exact here.
    result = import_faiss_index(
        wiki200_corpus, tmp_path / "hnsw", foreign, search_params={"efSearch": 256}, progress=False
    )
    info = result.manifest["index"]
    assert info["type"] == "hnsw" and info["imported"]["faiss_class"] == "IndexHNSWFlat"
    assert info["params"] == {"M": 16, "efConstruction": 40, "efSearch": 256}
    assert info["imported"]["spot_check"]["rows"] == 16  # HNSW storage returns the stored vectors
    with start_retriever(wiki200_flat_index) as (own, _), start_retriever(tmp_path / "hnsw") as (hnsw, _):
        expected, got = _retrieve(own, PROBES), _retrieve(hnsw, PROBES)
        assert _ids(got) == _ids(expected)
        np.testing.assert_allclose(
            [[h["score"] for h in q] for q in got], [[h["score"] for h in q] for q in expected], atol=1e-5
        )


def test_imported_ivf_takes_nprobe_and_searches_exactly_with_all_lists(
    wiki200_corpus: Path, wiki200_flat_index: Path, foreign_dir: Path, vectors: np.ndarray, tmp_path: Path
) -> None:
    index = faiss.index_factory(vectors.shape[1], "IVF4,Flat", faiss.METRIC_INNER_PRODUCT)
    foreign = _write(index, vectors, foreign_dir / "ivf4.index")
    manifest = import_faiss_index(
        wiki200_corpus, tmp_path / "ivf", foreign, search_params={"nprobe": 4}, progress=False
    ).manifest
    assert manifest["index"]["type"] == "ivf" and manifest["index"]["params"] == {"nlist": 4, "nprobe": 4}
    assert manifest["index"]["imported"]["spot_check"] is None  # IVF files cannot return their vectors
    ivf = Retriever.load(plan_serving(ServeConfig(index_dir=tmp_path / "ivf")))
    flat = Retriever.load(plan_serving(ServeConfig(index_dir=wiki200_flat_index)))
    np.testing.assert_array_equal(ivf.search(PROBES, 5)[1], flat.search(PROBES, 5)[1])


def test_foreign_index_is_opened_memory_mapped(foreign_dir: Path) -> None:
    def resident_bytes() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * 4096

    big = faiss.IndexFlatIP(384)
    big.add(np.random.default_rng(0).standard_normal((100_000, 384)).astype(np.float32))  # 154 MB
    path = foreign_dir / "big.index"
    faiss.write_index(big, str(path))
    del big
    before = resident_bytes()
    foreign = open_foreign_index(path)
    grown = resident_bytes() - before
    assert (foreign.kind, foreign.ntotal, foreign.dim) == ("flat", 100_000, 384)
    assert grown < 30_000_000, f"opening a 154 MB flat index grew RSS by {grown / 1e6:.0f} MB"
    path.unlink()


# ---- refusals ----------------------------------------------------------------------------------------


def test_count_mismatch_is_refused_naming_both_numbers(
    wiki200_corpus: Path, foreign_dir: Path, vectors: np.ndarray, tmp_path: Path
) -> None:
    foreign = _write(faiss.IndexFlatIP(384), vectors[:199], foreign_dir / "short.index")
    with pytest.raises(BuildError, match=r"holds 199 vectors but corpus .* has 200 passages"):
        import_faiss_index(wiki200_corpus, tmp_path / "x", foreign, progress=False)
    assert not (tmp_path / "x" / "manifest.json").exists()


def test_dim_mismatch_is_refused_naming_both_numbers(
    wiki200_corpus: Path, foreign_dir: Path, tmp_path: Path
) -> None:
    other = np.random.default_rng(1).standard_normal((200, 768)).astype(np.float32)
    foreign = _write(faiss.IndexFlatIP(768), other, foreign_dir / "e5dim.index")
    with pytest.raises(
        BuildError, match=r"holds 768-dimensional vectors but encoder .* makes 384-dimensional"
    ):
        import_faiss_index(wiki200_corpus, tmp_path / "x", foreign, progress=False)


def test_l2_index_is_refused(
    wiki200_corpus: Path, foreign_dir: Path, vectors: np.ndarray, tmp_path: Path
) -> None:
    foreign = _write(faiss.IndexFlatL2(384), vectors, foreign_dir / "l2.index")
    with pytest.raises(BuildError, match=r"uses the L2 metric.*METRIC_INNER_PRODUCT"):
        import_faiss_index(wiki200_corpus, tmp_path / "x", foreign, progress=False)


def test_rows_in_another_order_fail_the_spot_check(
    wiki200_corpus: Path, foreign_dir: Path, vectors: np.ndarray, tmp_path: Path
) -> None:
    foreign = _write(faiss.IndexFlatIP(384), vectors[::-1].copy(), foreign_dir / "reversed.index")
    with pytest.raises(
        BuildError, match=r"row (\d+) \(id \1\) encodes to .* cosine -?0\.\d+ .*16 of 16 checked"
    ):
        import_faiss_index(wiki200_corpus, tmp_path / "x", foreign, progress=False)
    # The check can be skipped (the count, dim and metric still are checked).
    result = import_faiss_index(wiki200_corpus, tmp_path / "y", foreign, verify_rows=0, progress=False)
    assert result.manifest["index"]["imported"]["spot_check"] is None


def test_idmap_and_structural_parameters_are_refused(
    wiki200_corpus: Path, foreign_flat: Path, foreign_dir: Path, vectors: np.ndarray, tmp_path: Path
) -> None:
    idmap = faiss.IndexIDMap(faiss.IndexFlatIP(384))
    idmap.add_with_ids(vectors, np.arange(1000, 1200))
    faiss.write_index(idmap, str(foreign_dir / "idmap.index"))
    with pytest.raises(BuildError, match="not corpus row numbers"):
        import_faiss_index(wiki200_corpus, tmp_path / "x", foreign_dir / "idmap.index", progress=False)
    with pytest.raises(BuildError, match=r"efSearch cannot be set for an imported flat index"):
        import_faiss_index(
            wiki200_corpus, tmp_path / "x", foreign_flat, search_params={"efSearch": 64}, progress=False
        )
    with pytest.raises(BuildError, match=r"is a flat index \(IndexFlatIP\), not hnsw"):
        import_faiss_index(wiki200_corpus, tmp_path / "x", foreign_flat, index_type="hnsw", progress=False)
    (tmp_path / "junk.index").write_bytes(b"not a faiss index at all")
    with pytest.raises(BuildError, match="is not a FAISS index"):
        import_faiss_index(wiki200_corpus, tmp_path / "x", tmp_path / "junk.index", progress=False)


def test_reimport_is_up_to_date_and_another_file_needs_force(
    wiki200_corpus: Path, imported_flat: Path, foreign_flat: Path, tmp_path: Path
) -> None:
    assert import_faiss_index(wiki200_corpus, imported_flat, foreign_flat, progress=False).up_to_date
    other = shutil.copy(foreign_flat, tmp_path / "copy.index")
    with pytest.raises(BuildError, match=r"index\.imported differ.*--force"):
        import_faiss_index(wiki200_corpus, imported_flat, other, progress=False)


# ---- a referenced file is checked at serve time, like the corpus -------------------------------------


@pytest.fixture
def referenced(wiki200_corpus: Path, foreign_flat: Path, tmp_path: Path) -> tuple[Path, Path]:
    source = Path(shutil.copy(foreign_flat, tmp_path / "e5_Flat.index"))
    import_faiss_index(wiki200_corpus, tmp_path / "ref", source, mode="reference", progress=False)
    return source, tmp_path / "ref"


def _serve_error(index: Path) -> str:
    command = [sys.executable, "-m", "retriever_server.cli", "serve", "--index", str(index), "--port", "0"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    return done.stderr


def test_reference_mode_records_the_absolute_path(referenced: tuple[Path, Path]) -> None:
    source, index = referenced
    manifest = read_manifest(index)
    assert manifest["index"]["path"] == str(source.resolve()) and not (index / "index.faiss").exists()
    assert manifest["index"]["imported"]["mode"] == "reference"
    assert plan_serving(ServeConfig(index_dir=index)).manifest["index"]["type"] == "flat"


def test_serve_refuses_a_moved_reference(referenced: tuple[Path, Path]) -> None:
    source, index = referenced
    source.rename(source.with_name("moved.index"))
    message = _serve_error(index)
    assert "index file not found" in message and str(source) in message and "--import-faiss" in message


def test_serve_refuses_a_replaced_reference(referenced: tuple[Path, Path], vectors: np.ndarray) -> None:
    source, index = referenced
    _write(faiss.IndexFlatIP(384), vectors[::-1].copy(), source)  # same size, other rows
    with pytest.raises(ManifestMismatch, match="fingerprint"):
        plan_serving(ServeConfig(index_dir=index))
    _write(faiss.IndexFlatIP(384), vectors[:100], source)
    assert "does not match the index manifest: size" in _serve_error(index)


# ---- CLI ---------------------------------------------------------------------------------------------


def _build(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "retriever_server.cli", "build", "--no-progress", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)


def test_cli_import_copy_mode_and_one_line_errors(
    wiki200_corpus: Path, foreign_flat: Path, foreign_dir: Path, vectors: np.ndarray, tmp_path: Path
) -> None:
    corpus, foreign = str(wiki200_corpus), str(foreign_flat)
    done = _build(
        "--corpus", corpus, "--import-faiss", foreign, "--import-mode", "copy", "--out", str(tmp_path / "i")
    )
    assert done.returncode == 0, done.stderr
    assert (
        "flat index of 200 passages" in done.stdout
        and "(IndexFlatIP, copy); 16 rows spot-checked" in done.stdout
    )
    copied = tmp_path / "i" / "index.faiss"
    assert copied.read_bytes() == foreign_flat.read_bytes() and not copied.samefile(foreign_flat)

    short = _write(faiss.IndexFlatIP(384), vectors[:150], foreign_dir / "cli-short.index")
    refused = _build("--corpus", corpus, "--import-faiss", str(short), "--out", str(tmp_path / "j"))
    assert refused.returncode == 1 and refused.stderr.strip().count("\n") == 0
    assert "holds 150 vectors" in refused.stderr and "has 200 passages" in refused.stderr
    lenient = _build(
        "--corpus", corpus, "--import-faiss", foreign, "--skip-malformed", "--out", str(tmp_path / "k")
    )
    assert lenient.returncode == 1 and "--skip-malformed does not apply to --import-faiss" in lenient.stderr
