"""`autorefine.retrieval.RetrieverClient` against real servers: ours, a Search-R1-API-only one, replicas.

Search, errors, retries across a restart, readiness without `/health`, both response shapes, failover
between replicas and probing them back, the API key.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from autorefine.api_key import API_KEY_ENV
from autorefine.config import GRPORunConfig
from autorefine.protocol import format_documents, split_title
from autorefine.retrieval import (
    RetrieverClient,
    RetrieverError,
    RetrieverSettings,
    RetrieverUnavailableError,
    connect_retriever,
    is_this_host,
    parse_urls,
)
from autorefine.settings import ConfigError, load_config
from testbed.retriever import stop
from tests.helpers import HOTPOTQA_DEV, SYNTHETIC_DIR

QUESTIONS = [json.loads(line)["question"] for line in HOTPOTQA_DEV.read_text("utf-8").splitlines()]


def test_client_search_returns_scored_documents(demo_bm25_server: str) -> None:
    with RetrieverClient(demo_bm25_server) as client:
        results = client.search(["Shirley Temple actress", "Corliss Archer radio program Golden Age"], topk=3)
    assert [len(docs) for docs in results] == [3, 3]
    first = results[0][0]
    assert isinstance(first.id, str) and isinstance(first.score, float)
    assert split_title(first.contents)[0] == "Shirley Temple"
    assert split_title(results[1][0].contents)[0] == "Meet Corliss Archer"
    assert [d.score for d in results[0]] == sorted((d.score for d in results[0]), reverse=True)
    assert format_documents(results[0]).startswith("Doc 1(Title: Shirley Temple) Shirley Temple Black")


def test_client_wait_until_ready_and_empty_batch(demo_bm25_server: str) -> None:
    with RetrieverClient(demo_bm25_server) as client:
        assert client.wait_until_ready(timeout=10)["status"] == "ready"
        assert client.search([], topk=3) == []


def test_client_reports_a_rejected_request(demo_bm25_server: str) -> None:
    with RetrieverClient(demo_bm25_server, max_retries=0) as client, pytest.raises(RetrieverError) as info:
        client.search(["fine", "   "], topk=3)
    assert "422" in str(info.value) and "queries[1]" in str(info.value)
    assert not isinstance(info.value, RetrieverUnavailableError)  # a 4xx is not retried


def test_client_error_names_the_url_when_nothing_listens(free_port: Any) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with (
        RetrieverClient(url, max_retries=1, backoff=0.01) as client,
        pytest.raises(RetrieverUnavailableError) as info,
    ):
        client.search(["anything"], topk=1)
    assert f"{url}/retrieve" in str(info.value)
    with RetrieverClient(url) as client, pytest.raises(RetrieverUnavailableError, match=url):
        client.wait_until_ready(timeout=0.3, interval=0.1)


def test_call_retrying_across_a_server_restart_succeeds(
    start_retriever: Any, demo_bm25_index: Path, free_port: Any, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    client = RetrieverClient(
        f"http://127.0.0.1:{port}", timeout=30, max_retries=12, backoff=0.25, max_backoff=2.0
    )
    with start_retriever(demo_bm25_index, port=port) as (_, process):
        assert client.search(["Shirley Temple"], topk=1)[0]  # a pooled keep-alive connection now exists
        process.kill()
        process.wait(timeout=10)
    caplog.set_level(logging.WARNING, logger="autorefine.retrieval")
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(client.search, ["Shirley Temple actress"], 2)
        deadline = time.monotonic() + 20
        while not any("retry" in record.getMessage() for record in caplog.records):
            assert time.monotonic() < deadline and not pending.done()
            time.sleep(0.05)
        assert not pending.done()  # the call is retrying against a dead port
        with start_retriever(demo_bm25_index, port=port):
            results = pending.result(timeout=60)
    client.close()
    assert len(results) == 1 and len(results[0]) == 2
    assert split_title(results[0][0].contents)[0] == "Shirley Temple"


# --- any Search-R1-style server ------------------------------------------------------------------------

SYNTHETIC_QUERIES = ["home city of Drarbim Brourso", "Nanzem Stantou weaver", "Piszal Zusvul painter"]


def test_urls_from_a_list_or_a_comma_separated_string_and_bad_ones_named() -> None:
    assert parse_urls("http://a:1") == ["http://a:1"]
    assert parse_urls(" http://a:1/ , https://b:2 ") == ["http://a:1", "https://b:2"]
    assert parse_urls(["http://a:1", "http://b:2"]) == ["http://a:1", "http://b:2"]
    for bad, words in (
        ("", "empty"),
        ("localhost:8000", "'localhost:8000' is not of the form http://HOST:PORT"),
        ("http://a:1,ftp://b", "'ftp://b'"),
        ("http://a:1,http://a:1/", "repeat"),
    ):
        with pytest.raises(ValueError, match=words):
            parse_urls(bad)


def test_retriever_url_in_a_config_takes_a_list_or_a_comma_string(tmp_path: Path) -> None:
    listed = load_config(GRPORunConfig, None, ["retriever.url=[http://a:1, http://b:2]"])
    assert listed.retriever.url == ["http://a:1", "http://b:2"]
    joined = load_config(GRPORunConfig, None, ["retriever.url=http://a:1,http://b:2"])
    assert parse_urls(joined.retriever.url) == ["http://a:1", "http://b:2"]
    with pytest.raises(ConfigError, match=r"retriever.*'b:2' is not of the form"):
        load_config(GRPORunConfig, None, ["retriever.url=[http://a:1, b:2]"])


def test_documents_are_read_from_both_response_shapes_with_titles_quoted_or_not(
    start_searchr1_server: Any, synthetic_searchr1_server: str, synthetic_bm25_server: str
) -> None:
    corpus = SYNTHETIC_DIR / "corpus.jsonl"
    # {"document": {...}, "score": s} with quoted titles, then bare {"id", "contents"} with unquoted ones
    with start_searchr1_server(corpus) as (scored_url, _), RetrieverClient(scored_url) as client:
        scored = client.search(SYNTHETIC_QUERIES, topk=3)
    with RetrieverClient(synthetic_searchr1_server) as client:
        bare = client.search(SYNTHETIC_QUERIES, topk=3)
    with RetrieverClient(synthetic_bm25_server) as client:  # ours
        ours = client.search(SYNTHETIC_QUERIES, topk=3)
    assert all(isinstance(d.score, float) for docs in scored for d in docs)
    assert all(d.score is None for docs in bare for d in docs)
    assert scored[0][0].contents.startswith('"Drarbim Brourso"\n')
    assert bare[0][0].contents.startswith("Drarbim Brourso\n")
    # The same passages, whatever the shape: the prompt shows identical documents blocks.
    for a, b, c in zip(scored, bare, ours, strict=True):
        assert format_documents(a) == format_documents(b) == format_documents(c)
        assert [d.id for d in a] == [d.id for d in b] == [d.id for d in c]
    assert format_documents(bare[0]).startswith("Doc 1(Title: Drarbim Brourso) Drarbim Brourso is a baker.")


def test_a_server_without_health_is_ready_once_retrieve_answers(
    synthetic_searchr1_server: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="autorefine.retrieval")
    client = connect_retriever(RetrieverSettings(url=synthetic_searchr1_server, startup_wait_s=5))
    with client:
        assert client.replicas[0].has_health is False
        assert len(client.search(["Nanzem Stantou"], topk=2)[0]) == 2
    assert "checked with POST /retrieve (no /health)" in caplog.text


def test_a_server_answering_neither_is_named_with_what_was_tried(free_port: Any) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # A web server that is not a retriever: 404 for GET /health, 501 for POST /retrieve.
    other = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(RetrieverUnavailableError) as info:
            connect_retriever(RetrieverSettings(url=url, startup_wait_s=60))
    finally:
        stop(other)
    message = str(info.value)
    assert f"retriever at {url} answers neither GET /health nor POST /retrieve" in message
    assert "GET /health: 404" in message and "POST /retrieve (1 query): 501" in message
    assert time.monotonic() - started < 30  # refused at once, not after startup_wait_s


# --- several replicas ----------------------------------------------------------------------------------


def _requests_served(url: str) -> int:
    return httpx.get(f"{url}/stats").json()["queries"]


def test_requests_spread_over_replicas_with_the_same_answers(
    start_retriever: Any, demo_bm25_index: Path, demo_bm25_server: str
) -> None:
    questions = [q for q in QUESTIONS[:64]]
    with RetrieverClient(demo_bm25_server) as single:
        expected = [single.search([q], topk=3)[0] for q in questions[:10]] + [
            single.search(questions, topk=3)
        ]
    with start_retriever(demo_bm25_index) as (a, _), start_retriever(demo_bm25_index) as (b, _):
        with RetrieverClient([a, b]) as client:
            one_by_one = [client.search([q], topk=3)[0] for q in questions[:10]]
            assert (_requests_served(a), _requests_served(b)) == (5, 5)  # alternating, one at a time
            batch = client.search(questions, topk=3)  # 64 queries: one request of 32 to each replica
            assert (_requests_served(a), _requests_served(b)) == (5 + 32, 5 + 32)
        assert [*one_by_one, batch] == expected


def test_failed_replica_is_retried_elsewhere_marked_down_and_probed_back(
    start_retriever: Any, demo_bm25_index: Path, free_port: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="autorefine.retrieval")
    port = free_port()
    with start_retriever(demo_bm25_index) as (a, _):
        with start_retriever(demo_bm25_index, port=port) as (b, process):
            client = RetrieverClient([a, b], probe_interval_s=0.2, report_every_s=0)
            expected = client.search(["Shirley Temple actress"], topk=2)
            process.kill()
            process.wait(timeout=10)
        # b is dead: every search is answered (by a), the first one after a retry on a
        for _ in range(4):
            assert client.search(["Shirley Temple actress"], topk=2) == expected
        stats = client.stats()
        assert stats["retried"] == 1 and stats["replicas"][1]["healthy"] is False
        assert f"retriever replica {b} is down" in caplog.text and "1 of 2 replicas healthy" in caplog.text
        assert f"{b} DOWN for" in caplog.text  # the per-replica report
        with start_retriever(demo_bm25_index, port=port):
            deadline = time.monotonic() + 30
            while not client.stats()["replicas"][1]["healthy"]:  # the prober finds it back
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert f"retriever replica {b} is back (probe: GET /health: ready)" in caplog.text
            before = _requests_served(b)
            for _ in range(4):
                assert client.search(["Shirley Temple actress"], topk=2) == expected
            assert _requests_served(b) == before + 2  # it takes its share again
        client.close()
    report = [r.getMessage() for r in caplog.records if r.getMessage().startswith("retriever: ")][-1]
    assert f"{a} up, " in report and "mean " in report and " ms, 0 failed" in report
    assert "requests retried on another replica" in report


def test_every_replica_down_is_retried_with_backoff_then_reported(free_port: Any) -> None:
    urls = [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"]
    with (
        RetrieverClient(urls, max_retries=1, backoff=0.01) as client,
        pytest.raises(RetrieverUnavailableError) as info,
    ):
        client.search(["anything"], topk=1)
    assert "every replica" in str(info.value) and "after 2 attempts" in str(info.value)
    assert client.stats()["replicas"][0]["failures"] == client.stats()["replicas"][1]["failures"] == 2


def test_connect_starts_with_the_ready_replicas_and_probes_the_others(
    start_retriever: Any, demo_bm25_index: Path, free_port: Any
) -> None:
    port = free_port()
    with start_retriever(demo_bm25_index) as (a, _):
        b = f"http://127.0.0.1:{port}"
        client = connect_retriever(RetrieverSettings(url=[a, b], probe_interval_s=0.2, startup_wait_s=30))
        with client:
            assert [r.healthy for r in client.replicas] == [True, False]
            assert client.search(["Shirley Temple"], topk=1)[0]
            with start_retriever(demo_bm25_index, port=port):
                deadline = time.monotonic() + 30
                while not client.replicas[1].healthy:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)


# --- this node's replica first (one retriever per node) ---------------------------------------------------


def test_local_replicas_come_first_and_are_added_to_the_list() -> None:
    node_b = RetrieverSettings(url="http://node-a:8001,http://node-b:8001", local_url="http://node-b:8001")
    assert node_b.urls == ["http://node-b:8001", "http://node-a:8001"]
    assert node_b.local_urls() == ["http://node-b:8001"]
    # a local replica missing from `url` joins it (every node may share one `url` list, or give only its own)
    assert RetrieverSettings(url="http://a:1", local_url="http://b:2").urls == ["http://b:2", "http://a:1"]
    assert RetrieverSettings(url="http://a:1").local_urls() == []
    config = load_config(GRPORunConfig, None, ["retriever.local_url=http://b:2", "retriever.url=http://a:1"])
    assert config.retriever.urls == ["http://b:2", "http://a:1"]
    with pytest.raises(ConfigError, match=r"'b:2' is not of the form"):
        load_config(GRPORunConfig, None, ["retriever.local_url=b:2"])


def test_prefer_local_marks_the_replicas_this_machine_serves() -> None:
    here = socket.gethostname()
    assert is_this_host(here) and is_this_host("localhost") and is_this_host("127.0.0.2")
    assert not is_this_host("node-b.invalid")  # .invalid never resolves (RFC 2606)
    settings = RetrieverSettings(
        url=["http://node-b.invalid:8001", f"http://{here}:8001", "http://127.0.0.1:8002"], prefer_local=True
    )
    assert settings.local_urls() == [f"http://{here}:8001", "http://127.0.0.1:8002"]
    assert RetrieverSettings(url=settings.url).local_urls() == []  # off by default: every replica is equal


def test_the_local_replica_takes_every_request_and_the_others_cover_while_it_is_down(
    start_retriever: Any, demo_bm25_index: Path, free_port: Any
) -> None:
    questions = QUESTIONS[:64]
    port = free_port()
    with start_retriever(demo_bm25_index) as (a, _):
        with start_retriever(demo_bm25_index, port=port) as (b, process):
            client = RetrieverClient([a, b], local=[b], probe_interval_s=0.2, max_retries=0)
            expected = [client.search([q], topk=3)[0] for q in questions[:6]]
            batch = client.search(questions, topk=3)  # not split over the replicas: all of it to b
            assert (_requests_served(a), _requests_served(b)) == (0, 6 + 64)
            process.kill()
            process.wait(timeout=10)
        # b is gone: a answers every question (max_retries=0: no backoff, the failover is immediate)
        assert [client.search([q], topk=3)[0] for q in questions[:6]] == expected
        assert client.search(questions, topk=3) == batch
        assert _requests_served(a) == 6 + 64
        stats = client.stats()
        assert [(r["local"], r["healthy"]) for r in stats["replicas"]] == [(False, True), (True, False)]
        assert stats["retried"] == 1
        with start_retriever(demo_bm25_index, port=port):
            deadline = time.monotonic() + 30
            while not client.stats()["replicas"][1]["healthy"]:  # probed back
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert [client.search([q], topk=3)[0] for q in questions[:6]] == expected
            assert _requests_served(b) == 6 and _requests_served(a) == 6 + 64  # back to the local one
        client.close()
    with pytest.raises(ValueError, match="not among the replicas"):
        RetrieverClient(["http://a:1"], local=["http://b:2"])


# --- API key --------------------------------------------------------------------------------------------

TOKEN = "s3cr3t-token-never-logged-0123456789"


@pytest.fixture(scope="module")
def keyed_server(
    start_retriever: Any, demo_bm25_index: Path, tmp_path_factory: pytest.TempPathFactory
) -> Any:
    key_file = tmp_path_factory.mktemp("key") / "retriever.key"
    key_file.write_text(TOKEN + "\n")
    with start_retriever(demo_bm25_index, api_key_file=key_file) as (url, process):
        yield url, key_file, process


def test_client_sends_the_token_from_a_file_or_the_environment(
    keyed_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, key_file, _ = keyed_server
    with connect_retriever(RetrieverSettings(url=url, api_key_file=str(key_file))) as client:
        assert client.search(["Shirley Temple"], topk=1)[0]
    monkeypatch.setenv(API_KEY_ENV, TOKEN)
    with connect_retriever(RetrieverSettings(url=url)) as client:
        assert client.search(["Shirley Temple"], topk=1)[0]


def test_missing_or_wrong_token_is_a_clear_error_that_never_shows_a_token(
    keyed_server: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url, _, process = keyed_server
    caplog.set_level(logging.DEBUG)
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    with pytest.raises(RetrieverError) as missing:
        connect_retriever(RetrieverSettings(url=url, startup_wait_s=30))
    assert "401" in str(missing.value) and "missing API key" in str(missing.value)
    assert "set retriever.api_key_file or $AUTOREFINE_RETRIEVER_API_KEY" in str(missing.value)
    wrong_token = "wrong-token-also-never-logged-987"
    wrong_file = tmp_path / "wrong.key"
    wrong_file.write_text(wrong_token)
    with pytest.raises(RetrieverError) as wrong:
        connect_retriever(RetrieverSettings(url=url, api_key_file=str(wrong_file)))
    assert "wrong API key" in str(wrong.value) and "the API key sent was refused" in str(wrong.value)
    with (
        RetrieverClient(url, api_key=wrong_token, max_retries=0) as client,
        pytest.raises(RetrieverError) as err,
    ):
        client.search(["Shirley Temple"], topk=1)
    assert err.value.status == 401 and not isinstance(err.value, RetrieverUnavailableError)  # not retried
    (tmp_path / "empty.key").write_text("\n")
    with pytest.raises(RetrieverError, match=r"retriever\.api_key_file .*empty"):
        connect_retriever(RetrieverSettings(url=url, api_key_file=str(tmp_path / "empty.key")))
    with pytest.raises(RetrieverError, match=r"retriever\.api_key_file .*gone\.key"):
        connect_retriever(RetrieverSettings(url=url, api_key_file=str(tmp_path / "gone.key")))
    shown = caplog.text + str(missing.value) + str(wrong.value) + str(err.value) + repr(client)
    server_log = process.log_path.read_text("utf-8")
    for secret in (TOKEN, wrong_token):
        assert secret not in shown and secret not in server_log
