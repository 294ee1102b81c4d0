"""`autorefine.retrieval.RetrieverClient` against the real server: search, errors, retries across a restart."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from autorefine.protocol import format_documents, split_title
from autorefine.retrieval import RetrieverClient, RetrieverError, RetrieverUnavailableError


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
