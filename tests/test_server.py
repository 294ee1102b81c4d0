"""The HTTP service as a real uvicorn process: API schema, bad input, batching, manifest checks, CLI."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn

from retriever_server.app import Retriever, ServeConfig, create_app, plan_serving
from retriever_server.build import build_index
from retriever_server.encoders import DenseEncoder
from retriever_server.indexes import FaissIndex
from retriever_server.manifest import ManifestMismatch, check_encoder, read_manifest
from testbed.retriever import serve_command

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_CORPUS = REPO_ROOT / "data" / "demo" / "corpus.jsonl"
HOTPOTQA_DEV = REPO_ROOT / "data" / "demo" / "hotpotqa_dev.jsonl"
QUESTIONS = [json.loads(line)["question"] for line in HOTPOTQA_DEV.read_text("utf-8").splitlines()]


def _post(url: str, body: Any, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{url}/retrieve", json=body, timeout=60, **kwargs)


def _assert_serves(url: str) -> None:
    response = _post(url, {"queries": ["Shirley Temple"], "topk": 1})
    assert response.status_code == 200
    assert len(response.json()["result"]) == 1


@pytest.fixture(scope="module")
def wiki200_server(start_retriever: Any, wiki200_flat_index: Path) -> Iterator[str]:
    """Dense (MiniLM flat) server over 200 wiki passages, micro-batching on."""
    with start_retriever(wiki200_flat_index, max_topk=20, batch_wait_ms=5) as (url, _):
        yield url


# ---- API schema --------------------------------------------------------------------------------------


def test_health_ready_reports_index(demo_bm25_server: str) -> None:
    health = httpx.get(f"{demo_bm25_server}/health").json()
    assert health["status"] == "ready"
    assert (health["corpus_size"], health["index_type"], health["encoder"]) == (4858, "bm25", "bm25")


def test_return_scores_true_nests_documents_with_scores(demo_bm25_server: str) -> None:
    response = _post(
        demo_bm25_server,
        {"queries": ["Shirley Temple actress", "Corliss Archer radio"], "topk": 2, "return_scores": True},
    )
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    result = response.json()["result"]
    assert [len(hits) for hits in result] == [2, 2]
    for hits in result:
        assert all(
            set(hit) == {"document", "score"} and set(hit["document"]) == {"id", "contents"} for hit in hits
        )
        assert all(isinstance(hit["document"]["id"], str) and isinstance(hit["score"], float) for hit in hits)
        assert hits[0]["score"] >= hits[1]["score"]
    assert result[0][0]["document"]["contents"].startswith('"Shirley Temple"\n')


def test_return_scores_false_gives_bare_documents(demo_bm25_server: str) -> None:
    for body in (
        {"queries": ["Shirley Temple"], "topk": 2, "return_scores": False},
        {"queries": ["Shirley Temple"], "topk": 2},
    ):
        result = _post(demo_bm25_server, body).json()["result"]
        assert len(result) == 1 and len(result[0]) == 2
        assert all(set(doc) == {"id", "contents"} for doc in result[0])
        assert result[0][0]["contents"].startswith('"Shirley Temple"\n')


def test_default_topk_and_empty_query_list(demo_bm25_server: str) -> None:
    assert [len(h) for h in _post(demo_bm25_server, {"queries": ["a film", "a band"]}).json()["result"]] == [
        3,
        3,
    ]
    response = _post(demo_bm25_server, {"queries": []})
    assert response.status_code == 200 and response.json() == {"result": []}


def test_repeated_queries_get_identical_answers(demo_bm25_server: str) -> None:
    body = {"queries": ["a film", "Shirley Temple", "a film"], "topk": 3, "return_scores": True}
    result = _post(demo_bm25_server, body).json()["result"]
    assert len(result) == 3 and result[0] == result[2] != result[1]


def test_unicode_survives_the_round_trip(demo_bm25_server: str) -> None:
    result = _post(demo_bm25_server, {"queries": ["Shirley Temple Black 1928 2014"], "topk": 1}).json()[
        "result"
    ]
    assert "–" in result[0][0]["contents"]  # the corpus's en dash, not an escape sequence


# ---- bad input ---------------------------------------------------------------------------------------

BAD_REQUESTS = [
    # (description, request kwargs, expected status, words the message must contain)
    (
        "not JSON",
        {"content": b"{queries: nope", "headers": {"content-type": "application/json"}},
        400,
        ["not valid JSON"],
    ),
    (
        "invalid UTF-8",
        {"content": b'{"queries": ["\xff"]}', "headers": {"content-type": "application/json"}},
        400,
        ["not valid JSON"],
    ),
    (
        "form content type",
        {"content": b'{"queries": ["a"]}', "headers": {"content-type": "application/x-www-form-urlencoded"}},
        415,
        ["Content-Type", "application/json"],
    ),
    ("no content type", {"content": b'{"queries": ["a"]}'}, 415, ["Content-Type"]),
    ("body is a list", {"json": ["a"]}, 422, ["JSON object"]),
    ("queries missing", {"json": {"topk": 3}}, 422, ["'queries'", "required"]),
    ("queries a string", {"json": {"queries": "who is it"}}, 422, ["'queries'", "list"]),
    ("queries hold a number", {"json": {"queries": ["ok", 5]}}, 422, ["queries[1]", "string"]),
    ("queries hold null", {"json": {"queries": [None]}}, 422, ["queries[0]", "string"]),
    ("empty query", {"json": {"queries": ["fine", ""]}}, 422, ["queries[1]", "empty"]),
    ("whitespace query", {"json": {"queries": [" \t\n"]}}, 422, ["queries[0]", "empty"]),
    ("too many queries", {"json": {"queries": ["q"] * 9}}, 413, ["too many queries", "9", "8"]),
    ("topk zero", {"json": {"queries": ["q"], "topk": 0}}, 422, ["'topk'", "positive"]),
    ("topk negative", {"json": {"queries": ["q"], "topk": -2}}, 422, ["'topk'", "positive"]),
    ("topk bool", {"json": {"queries": ["q"], "topk": True}}, 422, ["'topk'", "integer"]),
    ("topk float", {"json": {"queries": ["q"], "topk": 2.0}}, 422, ["'topk'", "integer"]),
    ("topk string", {"json": {"queries": ["q"], "topk": "3"}}, 422, ["'topk'", "integer"]),
    ("topk above max", {"json": {"queries": ["q"], "topk": 51}}, 422, ["'topk'", "51", "max-topk"]),
    (
        "return_scores string",
        {"json": {"queries": ["q"], "return_scores": "yes"}},
        422,
        ["'return_scores'", "boolean"],
    ),
]


@pytest.mark.parametrize(
    ("case", "kwargs", "status", "words"), BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS]
)
def test_bad_input_is_a_4xx_naming_the_problem(
    demo_bm25_server: str, case: str, kwargs: dict[str, Any], status: int, words: list[str]
) -> None:
    response = httpx.post(f"{demo_bm25_server}/retrieve", timeout=30, **kwargs)
    assert response.status_code == status, response.text
    message = response.json()["detail"]
    for word in words:
        assert word in message, f"{case}: {message!r} lacks {word!r}"
    _assert_serves(demo_bm25_server)


def test_unknown_route_and_method_are_json_errors(demo_bm25_server: str) -> None:
    assert httpx.get(f"{demo_bm25_server}/nope").json() == {"detail": "Not Found"}
    response = httpx.get(f"{demo_bm25_server}/retrieve")
    assert response.status_code == 405 and "detail" in response.json()
    _assert_serves(demo_bm25_server)


def test_query_longer_than_encoder_limit_is_truncated(wiki200_server: str) -> None:
    response = _post(wiki200_server, {"queries": ["lobbyist for Genentech " * 500], "topk": 2})
    assert response.status_code == 200 and len(response.json()["result"][0]) == 2


# ---- batching and concurrency ------------------------------------------------------------------------


def _assert_same_ranking(got: list[dict[str, Any]], ids: list[str], scores: np.ndarray) -> None:
    # Batches pad differently from a lone query: scores may move by ~1e-6, so only near-ties may swap.
    got_scores = np.array([hit["score"] for hit in got])
    np.testing.assert_allclose(got_scores, scores, atol=1e-4)
    for i, hit in enumerate(got):
        if hit["document"]["id"] != ids[i]:
            neighbours = [scores[j] for j in (i - 1, i + 1) if 0 <= j < len(scores)]
            assert any(abs(scores[i] - s) < 1e-4 for s in neighbours), (hit, ids)


def test_32_concurrent_clients_all_answered_correctly(
    wiki200_server: str, wiki200_flat_index: Path, minilm_encoder: DenseEncoder
) -> None:
    manifest = read_manifest(wiki200_flat_index)
    index = FaissIndex.load(wiki200_flat_index / "index.faiss", "flat", {})
    ids = [
        json.loads(line)["id"] for line in Path(manifest["corpus"]["path"]).read_text("utf-8").splitlines()
    ]
    expected_scores, expected_rows = index.search(minilm_encoder.encode_queries(QUESTIONS), 5)
    before = httpx.get(f"{wiki200_server}/stats").json()

    def client(c: int) -> int:
        checked = 0
        with httpx.Client(timeout=120) as http:
            for r in range(20):
                picks = [(c * 20 + r + j) % len(QUESTIONS) for j in range(1 + (c + r) % 3)]
                topk = 1 + (c * 7 + r) % 5
                body = {"queries": [QUESTIONS[i] for i in picks], "topk": topk, "return_scores": True}
                result = (
                    http.post(f"{wiki200_server}/retrieve", json=body).raise_for_status().json()["result"]
                )
                assert len(result) == len(picks)
                for hits, i in zip(result, picks, strict=True):
                    assert len(hits) == topk
                    _assert_same_ranking(
                        hits, [str(ids[r]) for r in expected_rows[i, :topk]], expected_scores[i, :topk]
                    )
                    checked += 1
        return checked

    with ThreadPoolExecutor(32) as pool:
        checked = sum(pool.map(client, range(32)))
    after = httpx.get(f"{wiki200_server}/stats").json()
    assert checked == sum(1 + (c + r) % 3 for c in range(32) for r in range(20))
    requests, batches = after["requests"] - before["requests"], after["batches"] - before["batches"]
    assert requests == 640
    assert batches < requests  # concurrent requests shared encoder passes


def test_batching_off_processes_each_request_alone(start_retriever: Any, demo_bm25_index: Path) -> None:
    with start_retriever(demo_bm25_index, batch_wait_ms=0) as (url, _):
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: _post(url, {"queries": [QUESTIONS[i]], "topk": 2}), range(40)))
        assert all(r.status_code == 200 and len(r.json()["result"][0]) == 2 for r in results)
        stats = httpx.get(f"{url}/stats").json()
        assert stats["requests"] == stats["batches"] == 40
        assert stats["largest_batch_queries"] == 1


def test_event_loop_answers_health_while_encoding(wiki200_server: str) -> None:
    big = {"queries": [f"{q} " * 20 for q in QUESTIONS[:64]], "topk": 1}  # 64 × 256 tokens: a second or more
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(_post, wiki200_server, big)
        while not httpx.get(f"{wiki200_server}/stats").json()["busy"]:
            assert not pending.done(), pending.result().text
            time.sleep(0.002)
        health = httpx.get(f"{wiki200_server}/health", timeout=5)
        assert health.status_code == 200 and health.json()["busy"] is True  # answered mid-encoding
        assert len(pending.result().json()["result"]) == 64


def test_health_is_503_until_loaded(demo_bm25_index: Path, free_port: Any) -> None:
    release = threading.Event()

    def slow_loader(plan: Any) -> Retriever:
        release.wait(30)
        return Retriever.load(plan)

    plan = plan_serving(ServeConfig(index_dir=demo_bm25_index))
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(plan, loader=slow_loader), port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        health = httpx.get(f"{url}/health")
        assert (health.status_code, health.json()) == (503, {"status": "loading"})
        response = _post(url, {"queries": ["x"]})
        assert response.status_code == 503 and "loading" in response.json()["detail"]
        release.set()
        while httpx.get(f"{url}/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        _assert_serves(url)
    finally:
        release.set()
        server.should_exit = True
        thread.join(10)


@pytest.mark.parametrize(
    ("kind", "params"),
    [("hnsw", {"M": 4, "efConstruction": 16, "efSearch": 1}), ("ivfpq", {})],  # both clearly approximate
)
def test_a_requests_hits_do_not_depend_on_its_micro_batch(
    kind: str, params: dict[str, Any], wiki200_corpus: Path, wiki200_flat_index: Path, tmp_path: Path
) -> None:
    # HNSW's beam is max(efSearch, k) and IVF-PQ re-ranks k·k_factor candidates: searched with a batch
    # neighbour's larger k, a request would get other (better) hits than alone.
    shards = wiki200_flat_index / "embeddings"
    build_index(
        wiki200_corpus,
        tmp_path,
        index_type=kind,
        index_params=params,
        shards_dir=shards,
        shard_size=64,
        progress=False,
    )
    retriever = Retriever.load(plan_serving(ServeConfig(index_dir=tmp_path)))
    questions = QUESTIONS[:30]
    for question in questions:  # the same query alone, then sharing a batch with a topk-20 request
        alone = retriever.process([([question], 3)])[0]
        batched = retriever.process([([question], 3), ([question], 20)])
        assert batched[0] == alone, question
    mixed = retriever.process([(questions, 3), (questions[:5], 20), (["Genentech lobbyist"], 7)])
    assert mixed[0] == retriever.process([(questions, 3)])[0]


# ---- API key and request size --------------------------------------------------------------------------

SECRET = "retriever-token-7f3a9c"


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize("source", ["file", "environment"])
def test_api_key_is_required_on_every_route(
    source: str,
    start_retriever: Any,
    demo_bm25_index: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    flags: dict[str, Any] = {}
    if source == "file":
        (tmp_path / "key").write_text(f"  {SECRET}\n")
        flags["api_key_file"] = tmp_path / "key"
    else:
        monkeypatch.setenv("AUTOREFINE_RETRIEVER_API_KEY", SECRET)  # inherited by the server process
    with start_retriever(demo_bm25_index, wait=False, **flags) as (url, process):
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", headers=_bearer(SECRET)).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.1)
        body = {"queries": ["Shirley Temple"], "topk": 1}
        for method, path in (("GET", "/health"), ("GET", "/stats"), ("POST", "/retrieve")):
            missing = httpx.request(method, f"{url}{path}", json=body)
            assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
            assert "missing API key" in missing.json()["detail"]
            assert "Authorization: Bearer <token>" in missing.json()["detail"]
            for wrong in ("nope", SECRET + "x", SECRET[:-1]):
                refused = httpx.request(method, f"{url}{path}", json=body, headers=_bearer(wrong))
                assert refused.status_code == 401 and "wrong API key" in refused.json()["detail"]
                assert wrong not in refused.text
            answered = httpx.request(method, f"{url}{path}", json=body, headers=_bearer(SECRET))
            assert answered.status_code == 200
        assert httpx.get(f"{url}/health", headers=_bearer(SECRET)).json()["api_key_required"] is True
        assert SECRET not in process.log_path.read_text("utf-8")


def test_serving_beyond_loopback_without_a_key_warns(demo_bm25_index: Path, free_port: Any) -> None:
    port = free_port()
    command = serve_command(demo_bm25_index, port, ("--host", "0.0.0.0"))
    with subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT) as process:
        try:
            assert process.stderr is not None
            lines = []
            while "Uvicorn running" not in "".join(lines):
                line = process.stderr.readline()
                assert line, "".join(lines)
                lines.append(line)
        finally:
            process.terminate()
    assert "serving on 0.0.0.0 without an API key" in "".join(lines)


def test_request_body_over_the_limit_is_413(start_retriever: Any, demo_bm25_index: Path) -> None:
    with start_retriever(demo_bm25_index, max_request_bytes=2000) as (url, _):
        big = {"queries": ["Shirley Temple " * 20] * 8, "topk": 1}
        response = _post(url, big)
        assert response.status_code == 413
        assert "exceeds --max-request-bytes 2000" in response.json()["detail"]
        assert response.json()["detail"].startswith("request body of ")  # the declared Content-Length

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted while streaming
            yield b'{"queries": ['
            for _ in range(100):
                yield b'"Shirley Temple actress",'
            yield b'"x"]}'

        streamed = httpx.post(
            f"{url}/retrieve", content=chunks(), headers={"content-type": "application/json"}, timeout=30
        )
        assert streamed.status_code == 413
        assert streamed.json()["detail"] == "request body exceeds --max-request-bytes 2000"
        assert httpx.get(f"{url}/health").json()["max_request_bytes"] == 2000
        _assert_serves(url)


# ---- manifest checks: serve refuses a mismatched corpus or encoder -----------------------------------


def _serve_fails(index: Path, *args: str) -> str:
    command = serve_command(index, 0, args)  # port 0: any free port; these servers are expected to exit
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert done.returncode != 0, done.stderr
    assert "Traceback" not in done.stderr
    return done.stderr


@pytest.fixture(scope="module")
def copied_corpus_index(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A copy of the demo corpus (2.9 MB, larger than the fingerprint's two 1 MiB spans) and its BM25 index."""
    root = tmp_path_factory.mktemp("copied")
    corpus = root / "corpus.jsonl"
    shutil.copy(DEMO_CORPUS, corpus)
    build_index(corpus, root / "index", index_type="bm25", progress=False)
    return corpus, root / "index"


def test_serve_refuses_a_corpus_of_another_size(
    copied_corpus_index: tuple[Path, Path], tmp_path: Path
) -> None:
    _, index = copied_corpus_index
    other = tmp_path / "other.jsonl"
    other.write_bytes(DEMO_CORPUS.read_bytes() + b'{"id": "x", "contents": "X\\nextra"}\n')
    message = _serve_fails(index, "--corpus", str(other))
    assert "does not match the index manifest" in message and "size" in message


def test_serve_refuses_same_size_different_content(
    copied_corpus_index: tuple[Path, Path], tmp_path: Path
) -> None:
    _, index = copied_corpus_index
    edited = tmp_path / "edited.jsonl"
    edited.write_bytes(DEMO_CORPUS.read_bytes().replace(b"Shirley", b"Shirlee", 1))  # in the first MiB
    assert "fingerprint" in _serve_fails(index, "--corpus", str(edited))


def test_verify_corpus_hash_catches_a_change_the_fingerprint_misses(
    copied_corpus_index: tuple[Path, Path], tmp_path: Path
) -> None:
    _, index = copied_corpus_index
    data = bytearray(DEMO_CORPUS.read_bytes())
    middle = len(data) // 2
    at = data.index(b"the", middle)
    data[at : at + 3] = b"THE"  # beyond both fingerprint spans, same size
    edited = tmp_path / "middle.jsonl"
    edited.write_bytes(bytes(data))
    manifest = read_manifest(index)
    plan_serving(ServeConfig(index_dir=index, corpus=edited))  # the quick check passes...
    with pytest.raises(ManifestMismatch, match="sha256"):
        plan_serving(ServeConfig(index_dir=index, corpus=edited, verify_corpus_hash=True))
    assert "sha256" in _serve_fails(index, "--corpus", str(edited), "--verify-corpus-hash")
    assert manifest["corpus"]["size_bytes"] == len(data)


def test_serve_refuses_a_missing_corpus(copied_corpus_index: tuple[Path, Path], tmp_path: Path) -> None:
    _, index = copied_corpus_index
    assert "corpus file not found" in _serve_fails(index, "--corpus", str(tmp_path / "gone.jsonl"))


def test_serve_refuses_another_encoder(
    copied_corpus_index: tuple[Path, Path], wiki200_flat_index: Path, minilm_dir: Path, tmp_path: Path
) -> None:
    _, bm25_index = copied_corpus_index
    assert "encoder" in _serve_fails(bm25_index, "--encoder", "intfloat/e5-base-v2")
    assert "built with" in _serve_fails(wiki200_flat_index, "--encoder", "bm25")
    other = tmp_path / "other-model"
    shutil.copytree(minilm_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["num_hidden_layers"] = 5
    (other / "config.json").write_text(json.dumps(config))
    assert "does not match the index" in _serve_fails(wiki200_flat_index, "--encoder", str(other))


def test_same_model_at_another_path_is_accepted(
    wiki200_flat_index: Path, minilm_dir: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "minilm-copy"
    shutil.copytree(minilm_dir, copy)
    spec = check_encoder(read_manifest(wiki200_flat_index), str(copy))
    assert spec is not None and spec.name == str(copy) and spec.pooling == "mean"


def test_encoder_path_missing_on_this_machine_is_refused(wiki200_flat_index: Path, tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    shutil.copytree(wiki200_flat_index, moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["encoder"]["name"] = "/nowhere/all-MiniLM-L6-v2"
    (moved / "manifest.json").write_text(json.dumps(manifest))
    assert "--encoder PATH" in _serve_fails(moved)


def test_index_that_fails_to_load_exits_non_zero(wiki200_flat_index: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(wiki200_flat_index, broken)
    (broken / "index.faiss").write_bytes(b"not a faiss index")
    assert "error" in _serve_fails(broken)


def test_unfinished_index_is_refused(tmp_path: Path) -> None:
    assert "not a finished index" in _serve_fails(tmp_path)


# ---- CLI ---------------------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "retriever_server.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
    )


def test_cli_help_lists_subcommands_and_options() -> None:
    top, build, serve = _cli("--help"), _cli("build", "--help"), _cli("serve", "--help")
    assert top.returncode == build.returncode == serve.returncode == 0
    assert "build" in top.stdout and "serve" in top.stdout
    for option in (
        "--corpus",
        "--encoder",
        "--index-type",
        "--batch-size",
        "--skip-malformed",
        "--out",
        "--force",
    ):
        assert option in build.stdout
    for option in (
        "--index",
        "--host",
        "--port",
        "--topk",
        "--max-topk",
        "--max-queries",
        "--batch-wait-ms",
        "--batch-max-size",
        "--threads",
        "--verify-corpus-hash",
        "--api-key-file",
        "--max-request-bytes",
    ):
        assert option in serve.stdout


def test_cli_build_errors_are_one_line(tmp_path: Path) -> None:
    missing = _cli("build", "--corpus", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "idx"))
    assert missing.returncode == 1 and missing.stderr.strip().count("\n") == 0
    assert "corpus file not found" in missing.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "1", "contents": "A\\na"}\n{"id": "2"}\n')
    malformed = _cli(
        "build", "--corpus", str(bad), "--encoder", "bm25", "--out", str(tmp_path / "idx"), "--no-progress"
    )
    assert (
        malformed.returncode == 1 and f"{bad}:2" in malformed.stderr and "Traceback" not in malformed.stderr
    )


def test_cli_build_bm25_then_skip_malformed(tmp_path: Path) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(
        '{"id": 1, "contents": "A\\nalpha"}\nnot json\n{"id": 2, "title": "B", "text": "beta"}\n'
    )
    done = _cli(
        "build",
        "--corpus",
        str(corpus),
        "--encoder",
        "bm25",
        "--skip-malformed",
        "--out",
        str(tmp_path / "i"),
        "--no-progress",
    )
    assert done.returncode == 0, done.stderr
    assert "2 passages (1 malformed lines skipped)" in done.stdout
    assert read_manifest(tmp_path / "i")["corpus"]["skipped_lines"] == 1


def test_sigterm_to_a_job_stops_the_retriever_it_started(demo_bm25_index: Path, tmp_path: Path) -> None:
    # What a scheduler's time limit or `kill` does to a demo or benchmark: the server must not outlive it.
    script = (
        "import os, sys, time\n"
        "from testbed.retriever import running_retriever\n"
        f"with running_retriever({str(demo_bm25_index)!r}) as url:\n"
        "    import psutil\n"
        "    server = [c.pid for c in psutil.Process().children()]\n"
        "    print(url, *server, flush=True)\n"
        "    time.sleep(600)\n"
    )
    job = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    pids: list[str] = []
    try:
        url, *pids = job.stdout.readline().split()
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200 and len(pids) == 1
        job.send_signal(signal.SIGTERM)
        assert job.wait(timeout=30) == 128 + signal.SIGTERM
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health", timeout=5)
        with pytest.raises(ProcessLookupError):
            os.kill(int(pids[0]), 0)
    finally:
        job.kill()
        for pid in pids:  # an orphaned server, when the test fails
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
