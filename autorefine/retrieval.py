"""HTTP client for Search-R1-style retrieval servers (`POST /retrieve`), one server or several replicas.

The trainer talks to the retriever only through this client, so the retriever can live on its own nodes.
It works with any server that answers Search-R1's `POST /retrieve` (ours, Search-R1's, AutoRefine's):
readiness uses `GET /health` where the server has it and otherwise a one-query `POST /retrieve`.
Given several replica URLs it spreads requests over the healthy ones, retries a failed request on another
replica, marks the failed one down and probes it back in a background thread. Replicas marked local (this
node's, in a multi-node job) take every request while one of them is healthy; the others cover for them.
"""

from __future__ import annotations

import logging
import math
import random
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from autorefine.api_key import API_KEY_ENV, ApiKeyError, read_api_key
from autorefine.protocol import Document

logger = logging.getLogger(__name__)
# The readiness probe of a server without /health: the smallest request the API allows.
PROBE_BODY = {"queries": ["retriever readiness probe"], "topk": 1, "return_scores": True}
# A search is split over the healthy replicas only when each part still holds this many queries.
MIN_SPLIT = 16


class RetrieverError(RuntimeError):
    """The retriever answered, but not with what the API promises (4xx, malformed JSON)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RetrieverUnavailableError(RetrieverError):
    """The retriever could not be reached (or kept failing) after every retry."""


def parse_urls(url: str | Sequence[str]) -> list[str]:
    """Replica URLs from one URL, a comma-separated string or a list; each must be http(s)://host[:port]."""
    items = url.split(",") if isinstance(url, str) else [str(u) for u in url]
    urls = [item.strip().rstrip("/") for item in items if item.strip()]
    if not urls:
        raise ValueError(
            "retriever.url is empty: give a URL such as http://127.0.0.1:8000, or a list of them"
        )
    for item in urls:
        parts = urlsplit(item)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"retriever URL {item!r} is not of the form http://HOST:PORT")
    if len(set(urls)) != len(urls):
        raise ValueError(f"retriever URLs repeat: {', '.join(urls)}")
    return urls


@dataclass(frozen=True)
class RetrieverSettings:
    """Where the retrieval server (or its replicas) is and how patiently to talk to it (the `retriever` section)."""

    url: str | list[str] = "http://127.0.0.1:8000"  # one URL, a list, or "URL,URL": replicas of one index
    timeout_s: float = 60.0
    max_retries: int = 5
    startup_wait_s: float = 30.0
    probe_interval_s: float = 5.0  # how often a replica that failed is checked again
    api_key_file: str | None = (
        None  # file holding the server's bearer token (else $AUTOREFINE_RETRIEVER_API_KEY)
    )
    # This node's replica(s), asked first; the others only while every local one is down (added to `url`).
    local_url: str | list[str] | None = None
    prefer_local: bool = False  # replicas of `url` served by this machine (by name or address) are local too

    def __post_init__(self) -> None:
        self.urls  # noqa: B018  # every URL well formed, none repeated

    @property
    def urls(self) -> list[str]:
        """Every replica: the local ones first, then the rest of `url`."""
        local = parse_urls(self.local_url) if self.local_url else []
        return parse_urls([*local, *(u for u in parse_urls(self.url) if u not in local)])

    def local_urls(self) -> list[str]:
        """The replicas this node asks first: `local_url`, and with `prefer_local` those on this machine."""
        local = parse_urls(self.local_url) if self.local_url else []
        if self.prefer_local:
            local += [u for u in self.urls if u not in local and is_this_host(urlsplit(u).hostname or "")]
        return local


def this_host_addresses() -> set[str]:
    """Names and addresses of this machine: loopback, its host name, FQDN and what they resolve to."""
    names = {"localhost", socket.gethostname().lower(), socket.getfqdn().lower()}
    addresses = {"127.0.0.1", "::1"}
    for name in list(names):
        try:
            addresses |= {info[4][0] for info in socket.getaddrinfo(name, None)}
        except OSError:  # a name the resolver does not know is simply not an address of ours
            continue
    return names | addresses


def is_this_host(host: str) -> bool:
    """Whether `host` (a name or an address of a URL) is this machine."""
    host = host.lower().strip("[]")
    if host.startswith("127.") or host in this_host_addresses():
        return True
    try:
        resolved = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(resolved & this_host_addresses())


class _ReplicaFailed(Exception):
    """A transport error or a 5xx answer from one replica: another replica (or a later retry) may succeed."""


@dataclass
class Replica:
    """One server's state as this client sees it: health, answers, latency."""

    url: str
    healthy: bool = True
    has_health: bool | None = None  # does it answer GET /health? (None: not asked yet)
    down_since: float | None = None
    last_problem: str = ""
    in_flight: int = 0
    requests: int = 0
    failures: int = 0
    seconds: float = 0.0  # summed over answered requests

    def summary(self) -> str:
        """`URL up|down …, N requests, mean X ms, M failed` for the logs."""
        if self.healthy:
            state = "up"
        else:
            state = f"DOWN for {time.monotonic() - (self.down_since or time.monotonic()):.0f} s ({self.last_problem})"
        mean = f"mean {1000 * self.seconds / self.requests:.1f} ms" if self.requests else "no requests yet"
        return f"{self.url} {state}, {self.requests} requests, {mean}, {self.failures} failed"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready counters (benchmarks, tests)."""
        return {
            "url": self.url,
            "healthy": self.healthy,
            "has_health": self.has_health,
            "requests": self.requests,
            "failures": self.failures,
            "mean_latency_ms": 1000 * self.seconds / self.requests if self.requests else None,
        }


class RetrieverClient:
    """Batched search over HTTP: connection reuse, timeouts, retries with backoff, failover across replicas."""

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        timeout: float = 60.0,
        max_retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        max_batch: int = 256,
        api_key: str | None = None,
        probe_interval_s: float = 5.0,
        report_every_s: float = 300.0,
        local: Sequence[str] = (),
    ) -> None:
        self.replicas = [Replica(u) for u in parse_urls(url)]
        self.local = {u.rstrip("/") for u in local}  # asked first while one of them is healthy
        if unknown := self.local - {r.url for r in self.replicas}:
            raise ValueError(f"local replicas {sorted(unknown)} are not among the replicas given")
        self.url = ", ".join(r.url for r in self.replicas)  # for messages
        self.max_batch = max_batch  # queries per request; larger batches are split (servers cap request size)
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.probe_interval_s = probe_interval_s
        self.report_every_s = report_every_s
        self.retried = 0  # requests answered by another replica after one failed
        self._has_api_key = bool(api_key)
        self._jitter = random.Random()  # private, so retries never shift the training RNG
        self._lock = threading.Lock()
        self._cursor = 0
        self._closed = threading.Event()
        self._prober: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._last_report = time.monotonic()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)), headers=headers)

    def __repr__(self) -> str:
        return f"RetrieverClient({[r.url for r in self.replicas]!r})"  # never the token

    def close(self) -> None:
        """Stop the prober, log each replica's totals, close pooled connections."""
        if self._closed.is_set():
            return
        self._closed.set()
        prober = self._prober
        if prober is not None:
            prober.join(timeout=5)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if any(r.requests for r in self.replicas):
            self._report()
        self._http.close()

    def __enter__(self) -> RetrieverClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- search ------------------------------------------------------------------------------------

    def search(self, queries: list[str], topk: int = 3) -> list[list[Document]]:
        """Top-k documents for each query, best first; split into requests spread over the healthy replicas."""
        queries = list(queries)
        spans = self._spans(len(queries))
        if len(spans) > 1 and len(self.replicas) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(len(self.replicas), thread_name_prefix="retriever-client")
            parts = list(self._pool.map(lambda s: self._search_part(queries[s[0] : s[1]], topk), spans))
        else:
            parts = [self._search_part(queries[start:stop], topk) for start, stop in spans]
        if time.monotonic() - self._last_report >= self.report_every_s:
            self._report()
        return [hits for part in parts for hits in part]

    def _spans(self, n: int) -> list[tuple[int, int]]:
        healthy = max(1, len(self._preferred(r for r in self.replicas if r.healthy)))
        per = max(1, min(self.max_batch, max(MIN_SPLIT, math.ceil(n / healthy))))
        return [(start, min(n, start + per)) for start in range(0, n, per)]

    def _search_part(self, queries: list[str], topk: int) -> list[list[Document]]:
        body = {"queries": queries, "topk": topk, "return_scores": True}
        try:
            payload, url = self._send("/retrieve", body)
        except RetrieverError as err:
            if err.status == 413 and len(queries) > 1:  # the server caps request size: halve and go on
                half = len(queries) // 2
                return self._search_part(queries[:half], topk) + self._search_part(queries[half:], topk)
            raise
        try:
            return _parse_result(payload, len(queries))
        except (KeyError, TypeError, ValueError) as err:
            raise RetrieverError(f"unexpected response from {url}/retrieve: {err}") from err

    # --- replicas: choice, failover, probing -------------------------------------------------------

    def _preferred(self, replicas: Iterable[Replica]) -> list[Replica]:
        """The local ones among `replicas` if there are any, else all of them."""
        replicas = list(replicas)
        return [r for r in replicas if r.url in self.local] or replicas

    def _pick(self, tried: set[str]) -> Replica | None:
        """The healthy untried replica with the fewest requests in flight (round robin among equals); a healthy
        local one before any other, a down one only as a last resort."""
        with self._lock:
            untried = [r for r in self.replicas if r.url not in tried]
            candidates = self._preferred(r for r in untried if r.healthy) or untried
            if not candidates:
                return None
            self._cursor += 1
            order = {r.url: (i - self._cursor) % len(self.replicas) for i, r in enumerate(self.replicas)}
            replica = min(candidates, key=lambda r: (r.in_flight, order[r.url]))
            replica.in_flight += 1
            return replica

    def _send(self, path: str, body: dict[str, Any]) -> tuple[Any, str]:
        """POST `body` to a replica; on failure try the others, then back off and retry them all."""
        tried: set[str] = set()
        problem = ""
        for attempt in range(self.max_retries + 1):
            while (replica := self._pick(tried)) is not None:
                tried.add(replica.url)
                try:
                    return self._post(replica, path, body), replica.url
                except _ReplicaFailed as failure:
                    problem = f"{replica.url}{path}: {failure}"
                    self._mark_down(replica, str(failure))
                    if len(tried) < len(self.replicas):
                        with self._lock:
                            self.retried += 1
                        logger.warning("retriever %s; retrying on another replica", problem)
            if attempt == self.max_retries:
                break
            delay = min(self.max_backoff, self.backoff * 2**attempt) * (0.5 + self._jitter.random() / 2)
            logger.warning(
                "retriever %s; retry %d/%d in %.1f s", problem, attempt + 1, self.max_retries, delay
            )
            time.sleep(delay)
            tried.clear()
        if len(self.replicas) == 1:
            where, last = f"{self.url}{path}", problem.split(": ", 1)[-1]
        else:
            where, last = f"every replica ({self.url})", problem
        raise RetrieverUnavailableError(
            f"retriever at {where} unreachable after {self.max_retries + 1} attempts (last: {last})"
        )

    def _post(self, replica: Replica, path: str, body: dict[str, Any]) -> Any:
        url = f"{replica.url}{path}"
        start = time.perf_counter()
        try:
            response = self._http.post(url, json=body)
        except httpx.TransportError as err:
            raise _ReplicaFailed(_describe(err)) from None
        finally:
            with self._lock:
                replica.in_flight -= 1
        if response.status_code >= 500:
            raise _ReplicaFailed(f"HTTP {response.status_code}: {response.text[:200]}")
        if response.status_code >= 400:
            raise RetrieverError(self._rejection(url, response), status=response.status_code)
        try:
            payload = response.json()
        except ValueError as err:
            raise RetrieverError(f"{url} answered with invalid JSON: {err}") from err
        with self._lock:
            replica.requests += 1
            replica.seconds += time.perf_counter() - start
        if not replica.healthy:
            self._mark_up(replica, "answered a request")
        return payload

    def _rejection(self, url: str, response: httpx.Response) -> str:
        message = f"{url} rejected the request ({response.status_code}): {_detail(response)}"
        if response.status_code in (401, 403):
            message += (
                "; the API key sent was refused"
                if self._has_api_key
                else f"; this retriever requires an API key: set retriever.api_key_file or ${API_KEY_ENV}"
            )
        return message

    def _mark_down(self, replica: Replica, problem: str, *, failed: bool = True) -> None:
        with self._lock:
            replica.failures += failed
            replica.last_problem = problem
            if not replica.healthy:
                return
            replica.healthy = False
            replica.down_since = time.monotonic()
            healthy = sum(r.healthy for r in self.replicas)
        if len(self.replicas) == 1:
            return  # a lone server is retried with backoff anyway; the retry warnings say so
        logger.warning(
            "retriever replica %s is down (%s); %d of %d replicas healthy",
            replica.url,
            problem,
            healthy,
            len(self.replicas),
        )
        self._start_prober()

    def _mark_up(self, replica: Replica, how: str) -> None:
        with self._lock:
            if replica.healthy:
                return
            replica.healthy = True
            down_for = time.monotonic() - (replica.down_since or time.monotonic())
            replica.down_since = None
        if len(self.replicas) > 1:
            logger.info("retriever replica %s is back (%s) after %.1f s down", replica.url, how, down_for)

    def _start_prober(self) -> None:
        with self._lock:
            if self._closed.is_set() or self._prober is not None:
                return
            self._prober = threading.Thread(
                target=self._probe_down_replicas, name="retriever-prober", daemon=True
            )
            self._prober.start()

    def _probe_down_replicas(self) -> None:
        """Every `probe_interval_s`, check each down replica's readiness; stop when none is down."""
        while not self._closed.wait(self.probe_interval_s):
            with (
                self._lock
            ):  # deciding to stop and `_start_prober` exclude each other: no down replica is missed
                down = [r for r in self.replicas if not r.healthy]
                if not down:
                    self._prober = None
                    return
            for replica in down:
                state, detail = self._readiness(replica)
                if state == "ready":
                    self._mark_up(replica, f"probe: {detail}")
                else:
                    with self._lock:
                        replica.last_problem = detail

    def _report(self) -> None:
        self._last_report = time.monotonic()
        retried = f"; {self.retried} requests retried on another replica" if len(self.replicas) > 1 else ""
        logger.info("retriever: %s%s", " | ".join(r.summary() for r in self.replicas), retried)

    def stats(self) -> dict[str, Any]:
        """Per-replica health and latency, and how many requests were retried on another replica."""
        with self._lock:
            replicas = [{**r.to_dict(), "local": r.url in self.local} for r in self.replicas]
            return {"retried": self.retried, "replicas": replicas}

    def server_cache(self) -> dict[str, Any] | None:
        """Result-cache counters summed over the healthy replicas' `/health`; None when none reports one.

        Only retriever-server has a cache (Search-R1's server has no /health); errors count as "no report":
        this feeds training logs and must never stop a run.
        """
        hits = misses = 0
        reported = False
        for replica in self.replicas:
            if not replica.healthy or replica.has_health is False:
                continue
            try:
                cache = self._http.get(f"{replica.url}/health").json().get("cache")
            except (httpx.HTTPError, ValueError, AttributeError):
                continue
            if isinstance(cache, dict) and "hits" in cache:
                hits, misses, reported = hits + int(cache["hits"]), misses + int(cache["misses"]), True
        if not reported:
            return None
        lookups = hits + misses
        return {"hits": hits, "misses": misses, "hit_rate": hits / lookups if lookups else None}

    # --- readiness ---------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """The first replica's `/health` answer, also while it is still loading (one attempt, no retries)."""
        url = self.replicas[0].url
        response = self._http.get(f"{url}/health")
        try:
            status = response.json()
        except ValueError:
            response.raise_for_status()
            raise
        if not isinstance(status, dict):
            raise RetrieverError(f"{url}/health answered {status!r}")
        if response.status_code >= 400 and "status" not in status:
            response.raise_for_status()
        return status

    def _readiness(self, replica: Replica) -> tuple[str, str]:
        """One check: (`ready` | `loading` | `unreachable` | `refused` | `failed` | `unsupported`, what was tried)."""
        tried = []
        if replica.has_health is not False:
            try:
                response = self._http.get(f"{replica.url}/health")
            except httpx.TransportError as err:
                return "unreachable", f"GET /health: {_describe(err)}"
            if response.status_code in (401, 403):
                return "refused", self._rejection(f"{replica.url}/health", response)
            status = _json_dict(response)
            if status is not None and response.status_code < 500 and response.status_code != 404:
                state = status.get("status", "ready")
                if response.status_code == 200 and state == "ready":
                    replica.has_health = True
                    self._adopt_limits(status)
                    return "ready", "GET /health: ready"
            if status is not None and status.get("status") in ("loading", "starting"):
                replica.has_health = True
                return "loading", f"GET /health: {response.status_code} {status['status']}"
            if status is not None and status.get("status") == "error":
                return "failed", f"GET /health: {response.status_code} {status}"
            tried.append(f"GET /health: {response.status_code} {_detail(response)}")
        try:
            response = self._http.post(f"{replica.url}/retrieve", json=PROBE_BODY)
        except httpx.TransportError as err:
            return "unreachable", "; ".join([*tried, f"POST /retrieve: {_describe(err)}"])
        if response.status_code in (401, 403):
            return "refused", self._rejection(f"{replica.url}/retrieve", response)
        if response.status_code == 200:
            try:
                _parse_result(response.json(), 1)
            except (KeyError, TypeError, ValueError) as err:
                tried.append(f"POST /retrieve: 200 but not a Search-R1 answer ({err})")
                return "unsupported", "; ".join(tried)
            replica.has_health = replica.has_health or False
            return "ready", "; ".join([*tried, "POST /retrieve (1 query): answered"])
        tried.append(f"POST /retrieve (1 query): {response.status_code} {_detail(response)}")
        return ("loading" if response.status_code == 503 else "unsupported"), "; ".join(tried)

    def _adopt_limits(self, status: dict[str, Any]) -> None:
        # Never send more queries per request than a server accepts (its --max-queries).
        limit = status.get("max_queries")
        if isinstance(limit, int) and limit > 0:
            with self._lock:
                self.max_batch = min(self.max_batch, limit)

    def wait_until_ready(self, timeout: float = 120.0, interval: float = 0.5) -> dict[str, Any]:
        """Poll until a replica is ready (the others are probed back later); raise after `timeout` s.

        A replica that refuses our API key or speaks neither `/health` nor `/retrieve` fails at once.
        """
        deadline = time.monotonic() + timeout
        states: dict[str, tuple[str, str]] = {}
        while True:
            for replica in self.replicas:
                if states.get(replica.url, ("",))[0] != "ready":
                    states[replica.url] = self._readiness(replica)
            for replica in self.replicas:
                state, detail = states[replica.url]
                if state == "refused":
                    raise RetrieverError(detail, status=401)
                if state == "failed":
                    raise RetrieverUnavailableError(
                        f"retriever at {replica.url} reports a failure ({detail})"
                    )
                if state == "unsupported":
                    raise RetrieverUnavailableError(
                        f"retriever at {replica.url} answers neither GET /health nor POST /retrieve as a "
                        f"Search-R1-style server does ({detail})"
                    )
            ready = [r for r in self.replicas if states[r.url][0] == "ready"]
            if ready:
                for replica in self.replicas:
                    if replica not in ready:
                        self._mark_down(replica, states[replica.url][1], failed=False)
                return {"status": "ready", "url": ready[0].url, "health_endpoint": ready[0].has_health}
            if time.monotonic() >= deadline:
                tried = "; ".join(
                    detail if len(states) == 1 else f"{url}: {detail}" for url, (_, detail) in states.items()
                )
                where = self.url if len(self.replicas) == 1 else f"any of {self.url}"
                raise RetrieverUnavailableError(
                    f"retriever at {where} not ready after {timeout:.0f} s ({tried}); "
                    "is `retriever-server serve` (or another Search-R1-style server) running there?"
                )
            time.sleep(interval)


def connect_retriever(settings: RetrieverSettings) -> RetrieverClient:
    """A client to the configured replicas, one of them ready: every command checks this before loading a model."""
    try:
        api_key = read_api_key(settings.api_key_file, setting="retriever.api_key_file")
    except ApiKeyError as err:
        raise RetrieverError(str(err)) from None
    local = settings.local_urls()
    client = RetrieverClient(
        settings.urls,
        timeout=settings.timeout_s,
        max_retries=settings.max_retries,
        api_key=api_key,
        probe_interval_s=settings.probe_interval_s,
        local=local,
    )
    try:
        client.wait_until_ready(timeout=settings.startup_wait_s)
    except RetrieverError as err:
        client.close()
        if isinstance(err, RetrieverUnavailableError) and "not ready" in str(err):
            raise RetrieverUnavailableError(
                f"{err}\nStart one first, e.g. `retriever-server serve --index DIR --port PORT`, "
                "and point retriever.url at it."
            ) from None
        raise
    for replica in client.replicas:
        health = "GET /health" if replica.has_health else "POST /retrieve (no /health)"
        state = "ready" if replica.healthy else f"not ready yet ({replica.last_problem}); probed again later"
        logger.info("retriever replica %s: %s, checked with %s", replica.url, state, health)
    if local and len(local) < len(client.replicas):
        logger.info(
            "retriever: this node asks %s first; the other replicas only while it is down", ", ".join(local)
        )
    return client


def _parse_result(payload: Any, expected: int) -> list[list[Document]]:
    result = payload["result"]
    if not isinstance(result, list) or len(result) != expected:
        got = len(result) if isinstance(result, list) else type(result).__name__
        raise ValueError(f"{got} result lists for {expected} queries")
    return [[_parse_document(item) for item in hits] for hits in result]


def _parse_document(item: Any) -> Document:
    # With return_scores the server nests the passage under "document"; without, the passage is the item.
    if not isinstance(item, dict):
        raise ValueError(f"a hit must be a JSON object, got {type(item).__name__}")
    scored = isinstance(item.get("document"), dict)
    doc = item["document"] if scored else item
    contents = doc.get("contents")
    if contents is None and isinstance(doc.get("text"), str):  # a {"title", "text"} corpus served as is
        contents = f'"{doc["title"]}"\n{doc["text"]}' if doc.get("title") else doc["text"]
    if not isinstance(contents, str):
        raise ValueError(f"a document has no 'contents' (nor 'title' and 'text'): {str(doc)[:200]}")
    score = item.get("score") if scored else None
    return Document(
        id=str(doc.get("id", "")), contents=contents, score=None if score is None else float(score)
    )


def _json_dict(response: httpx.Response) -> dict[str, Any] | None:
    try:
        value = response.json()
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _detail(response: httpx.Response) -> str:
    body = _json_dict(response)
    if body is not None and "detail" in body:
        return str(body["detail"])[:300]
    text = response.text.strip()
    return text if text and len(text) <= 200 and "<" not in text else response.reason_phrase  # not HTML pages


def _describe(err: Exception) -> str:
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
