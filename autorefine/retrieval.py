"""HTTP client for any Search-R1-style retrieval server (`POST /retrieve`, `GET /health`).

The trainer talks to the retriever only through this client, so the retriever can live on its own node.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from autorefine.config import RetrieverSettings

logger = logging.getLogger(__name__)


class RetrieverError(RuntimeError):
    """The retriever answered, but not with what the API promises (4xx, malformed JSON)."""


class RetrieverUnavailableError(RetrieverError):
    """The retriever could not be reached (or kept failing) after every retry."""


@dataclass(frozen=True)
class Document:
    """One retrieved passage: FlashRAG `contents` is the title on the first line, then the text."""

    id: str
    contents: str
    score: float | None = None


class RetrieverClient:
    """Batched search over HTTP with connection reuse, timeouts and bounded retries with backoff."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 60.0,
        max_retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        max_batch: int = 256,
    ) -> None:
        self.url = url.rstrip("/")
        self.max_batch = max_batch  # queries per request; larger batches are split (servers cap request size)
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._jitter = random.Random()  # private, so retries never shift the training RNG
        self._http = httpx.Client(timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)))

    def close(self) -> None:
        """Close pooled connections."""
        self._http.close()

    def __enter__(self) -> RetrieverClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def search(self, queries: list[str], topk: int = 3) -> list[list[Document]]:
        """Top-k documents for each query, best first; one request per `max_batch` queries."""
        results: list[list[Document]] = []
        for start in range(0, len(queries), self.max_batch):
            chunk = list(queries[start : start + self.max_batch])
            payload = self._request(
                "POST", "/retrieve", json={"queries": chunk, "topk": topk, "return_scores": True}
            )
            try:
                result = payload["result"]
                if len(result) != len(chunk):
                    raise ValueError(f"{len(result)} result lists for {len(chunk)} queries")
                results += [[_parse_document(item) for item in hits] for hits in result]
            except (KeyError, TypeError, ValueError) as err:
                raise RetrieverError(f"unexpected response from {self.url}/retrieve: {err}") from err
        return results

    def health(self) -> dict[str, Any]:
        """The server's `/health` answer, also while it is still loading (one attempt, no retries)."""
        response = self._http.get(f"{self.url}/health")
        try:
            status = response.json()
        except ValueError:
            response.raise_for_status()
            raise
        if not isinstance(status, dict):
            raise RetrieverError(f"{self.url}/health answered {status!r}")
        if response.status_code >= 400 and "status" not in status:
            response.raise_for_status()
        return status

    def wait_until_ready(self, timeout: float = 120.0, interval: float = 0.5) -> dict[str, Any]:
        """Poll `/health` until the server reports ready; raise RetrieverUnavailableError after `timeout` s."""
        deadline = time.monotonic() + timeout
        last_error = "no answer"
        while True:
            try:
                status = self.health()
                state = status.get("status", "ready")
                if state == "ready":
                    return status
                if state not in ("loading", "starting"):
                    raise RetrieverUnavailableError(f"retriever at {self.url} reports {status}")
                last_error = f"status {state!r}"
            except (httpx.HTTPError, ValueError) as err:
                last_error = _describe(err)
            if time.monotonic() >= deadline:
                raise RetrieverUnavailableError(
                    f"retriever at {self.url} not ready after {timeout:.0f} s ({last_error}); "
                    "is `retriever-server serve` running there?"
                )
            time.sleep(interval)

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        url = f"{self.url}{path}"
        for attempt in range(self.max_retries + 1):
            try:
                response = self._http.request(method, url, **kwargs)
            except httpx.TransportError as err:
                problem = _describe(err)
            else:
                if response.status_code < 400:
                    try:
                        return response.json()
                    except ValueError as err:
                        raise RetrieverError(f"{url} answered with invalid JSON: {err}") from err
                if response.status_code < 500:
                    raise RetrieverError(
                        f"{url} rejected the request ({response.status_code}): {response.text}"
                    )
                problem = f"HTTP {response.status_code}: {response.text[:200]}"
            if attempt == self.max_retries:
                raise RetrieverUnavailableError(
                    f"retriever at {url} unreachable after {self.max_retries + 1} attempts ({problem})"
                )
            delay = min(self.max_backoff, self.backoff * 2**attempt) * (0.5 + self._jitter.random() / 2)
            logger.warning(
                "retriever %s: %s; retry %d/%d in %.1f s", url, problem, attempt + 1, self.max_retries, delay
            )
            time.sleep(delay)
        raise AssertionError("unreachable")


def connect_retriever(settings: RetrieverSettings) -> RetrieverClient:
    """A client to a retriever that answered /health: every command checks this before loading a model."""
    client = RetrieverClient(settings.url, timeout=settings.timeout_s, max_retries=settings.max_retries)
    try:
        status = client.wait_until_ready(timeout=settings.startup_wait_s)
    except RetrieverUnavailableError as err:
        client.close()
        raise RetrieverUnavailableError(
            f"{err}\nStart one first, e.g. `retriever-server serve --index DIR --port PORT`, "
            "and point retriever.url at it."
        ) from None
    logger.info("retriever at %s: %s", settings.url, status)
    # Never send more queries per request than the server accepts (its --max-queries).
    limit = status.get("max_queries")
    if isinstance(limit, int) and limit > 0:
        client.max_batch = min(client.max_batch, limit)
    return client


def _parse_document(item: dict[str, Any]) -> Document:
    # With return_scores the server nests the passage under "document"; without, the passage is the item.
    doc = item.get("document", item)
    score = item.get("score") if "document" in item else None
    return Document(id=str(doc["id"]), contents=str(doc["contents"]), score=score)


def _describe(err: Exception) -> str:
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
