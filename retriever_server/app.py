"""The HTTP service: Search-R1's `POST /retrieve`, plus `GET /health` and `GET /stats`.

The app answers `/health` with 503 while the index and encoder load in a background thread, so the port
is open (and a client's readiness poll works) from the first second. Retrieval goes through the
micro-batcher; request validation (API key, body size, fields) happens here, before anything is queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from autorefine.api_key import API_KEY_ENV
from retriever_server.batching import MicroBatcher
from retriever_server.corpus import DocumentStore
from retriever_server.encoders import EncoderSpec, is_embedded
from retriever_server.manifest import (
    ManifestMismatch,
    check_corpus,
    check_encoder,
    check_index_file,
    read_manifest,
)

logger = logging.getLogger(__name__)

Hit = tuple[float, dict[str, str]]
DEFAULT_MAX_REQUEST_BYTES = 8 * 2**20  # 1,024 queries of 8 KB; a trainer's queries are a few hundred bytes
# Module level: FastAPI resolves the (postponed) annotations of dependencies in this module's globals.
_BEARER = HTTPBearer(auto_error=False)


class ApiError(Exception):
    """A request the API rejects: HTTP status plus a message naming the problem."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class ServeConfig:
    """Everything `retriever-server serve` is configured with."""

    index_dir: Path
    corpus: Path | None = None
    encoder: str | None = None
    topk: int = 3
    max_topk: int = 100
    max_queries: int = 1024
    batch_wait_ms: float = 5.0
    batch_max_size: int = 256
    threads: int | None = None
    verify_corpus_hash: bool = False
    max_batch_tokens: int | None = None
    search_params: dict[str, Any] = field(default_factory=dict)
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    api_key: str | None = field(default=None, repr=False)  # bearer token every request must carry


@dataclass
class Plan:
    """A serve configuration checked against the manifest, ready to load."""

    config: ServeConfig
    manifest: dict[str, Any]
    corpus: Path
    spec: EncoderSpec | None


def plan_serving(config: ServeConfig) -> Plan:
    """Check the index against its corpus and the named encoder (cheap; no model or index is loaded)."""
    manifest = read_manifest(config.index_dir)
    corpus = config.corpus or Path(manifest["corpus"]["path"])
    check_corpus(manifest, corpus, full_hash=config.verify_corpus_hash)
    check_index_file(manifest, config.index_dir)
    spec = check_encoder(manifest, config.encoder)
    local = spec is not None and not is_embedded(spec.name) and spec.name.startswith(("/", "./", "../", "~"))
    if local and spec is not None and not Path(spec.name).expanduser().exists():
        raise ManifestMismatch(
            f"the index's encoder {spec.name} does not exist on this machine; "
            "pass --encoder PATH to a copy of the same model"
        )
    if not 1 <= config.topk <= config.max_topk:
        raise ValueError(f"--topk {config.topk} must be between 1 and --max-topk {config.max_topk}")
    return Plan(config=config, manifest=manifest, corpus=corpus, spec=spec)


class Retriever:
    """A loaded index, its encoder (dense) and document store; processes batches of requests."""

    def __init__(self, plan: Plan, index: Any, store: DocumentStore, encoder: Any | None) -> None:
        self.plan = plan
        self.index = index
        self.store = store
        self.encoder = encoder
        self.lookup_seconds = 0.0

    @classmethod
    def load(cls, plan: Plan) -> Retriever:
        """Load the index, offsets and encoder named by a checked plan."""
        from retriever_server.indexes import BM25Index, FaissIndex, configure_threads

        manifest, index_dir = plan.manifest, Path(plan.config.index_dir)
        dense = plan.spec is not None
        configure_threads(plan.config.threads, torch_threads=dense)
        store = DocumentStore(plan.corpus, index_dir / manifest["offsets"])
        if len(store) != manifest["corpus"]["passages"]:
            raise ManifestMismatch(
                f"{index_dir}: offsets table has {len(store)} rows, manifest says {manifest['corpus']['passages']}"
            )
        info = manifest["index"]
        params = {**info["params"], **plan.config.search_params}
        if not dense:
            return cls(plan, BM25Index.load(index_dir / info["path"], params), store, None)
        from retriever_server.encoders import DenseEncoder

        assert plan.spec is not None
        encoder = DenseEncoder(
            plan.spec, batch_size=plan.config.batch_max_size, max_batch_tokens=plan.config.max_batch_tokens
        )
        if encoder.dim != manifest["dim"]:
            raise ManifestMismatch(
                f"encoder {plan.spec.name!r} makes {encoder.dim}-d vectors, the index holds {manifest['dim']}-d"
            )
        index = FaissIndex.load(index_dir / info["path"], info["type"], params)
        retriever = cls(plan, index, store, encoder)
        retriever.process([(["warm-up query"], 1)])  # first passes allocate; keep that out of request latency
        return retriever

    def _keys(self, queries: list[str]) -> Any:
        """What the index searches: the query strings (BM25) or their embeddings (dense)."""
        return queries if self.encoder is None else self.encoder.encode_queries(queries)

    def search(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Encode (dense) and search a list of queries; each distinct query is encoded and searched once."""
        distinct = list(dict.fromkeys(queries))
        scores, rows = self.index.search(self._keys(distinct), k)
        where = {query: i for i, query in enumerate(distinct)}
        picks = [where[query] for query in queries]
        return scores[picks], rows[picks]

    def process(self, requests: list[tuple[list[str], int]]) -> list[list[list[Hit]]]:
        """One batch: distinct queries encoded once, then searched once per distinct topk, hits per request.

        Searching each topk on its own keeps a request's hits independent of the batch it landed in: an
        approximate index searched with a larger k widens its search (HNSW's beam is max(efSearch, k),
        IVF-PQ re-ranks k·k_factor candidates), so cutting a larger-k result back would change the answer.
        """
        distinct = list(dict.fromkeys(q for queries, _ in requests for q in queries))
        position = {query: i for i, query in enumerate(distinct)}
        # GRPO groups often send the same query several times (same question, several rollouts).
        keys = self._keys(distinct)
        found: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
        for k in sorted({k for _, k in requests}):
            group = list(dict.fromkeys(q for queries, kk in requests if kk == k for q in queries))
            picks = [position[q] for q in group]
            scores, rows = self.index.search(
                [keys[i] for i in picks] if self.encoder is None else keys[picks], k
            )
            found.update({(q, k): (scores[i], rows[i]) for i, q in enumerate(group)})
        start = time.perf_counter()
        results = [
            [
                [(float(s), self.store.get(int(r))) for s, r in zip(*found[(q, k)], strict=True) if r >= 0]
                for q in queries
            ]
            for queries, k in requests
        ]
        self.lookup_seconds += time.perf_counter() - start
        return results

    def timings(self) -> dict[str, float]:
        """Cumulative seconds spent in each stage of batch processing."""
        timings = {"search_seconds": self.index.search_seconds, "lookup_seconds": self.lookup_seconds}
        if self.encoder is not None:
            timings["tokenize_seconds"] = self.encoder.tokenize_seconds
            timings["encoder_forward_seconds"] = self.encoder.forward_seconds
        return {key: round(value, 6) for key, value in timings.items()}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status)


def parse_retrieve_body(body: bytes, content_type: str, config: ServeConfig) -> tuple[list[str], int, bool]:
    """Validate a `/retrieve` request; return (queries, topk, return_scores) or raise ApiError."""
    mime = content_type.split(";", 1)[0].strip().lower()
    if mime != "application/json" and not mime.endswith("+json"):
        raise ApiError(415, f"Content-Type must be application/json, got {content_type or 'none'!r}")
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(400, f"request body is not valid JSON: {err}") from None
    if not isinstance(payload, dict):
        raise ApiError(422, f"request body must be a JSON object, got {type(payload).__name__}")
    if "queries" not in payload:
        raise ApiError(422, "field 'queries' is required (a list of strings)")
    queries = payload["queries"]
    if not isinstance(queries, list):
        raise ApiError(422, f"field 'queries' must be a list of strings, got {type(queries).__name__}")
    if len(queries) > config.max_queries:
        raise ApiError(413, f"too many queries: {len(queries)} > --max-queries {config.max_queries}")
    for i, query in enumerate(queries):
        if not isinstance(query, str):
            raise ApiError(422, f"queries[{i}] must be a string, got {type(query).__name__}")
        if not query.strip():
            raise ApiError(422, f"queries[{i}] is empty or whitespace only")
    topk = payload.get("topk")
    if topk is None:
        topk = config.topk
    elif isinstance(topk, bool) or not isinstance(topk, int):
        raise ApiError(422, f"field 'topk' must be an integer, got {type(topk).__name__} {topk!r}")
    elif topk <= 0:
        raise ApiError(422, f"field 'topk' must be positive, got {topk}")
    elif topk > config.max_topk:
        raise ApiError(422, f"field 'topk' {topk} exceeds --max-topk {config.max_topk}")
    return_scores = payload.get("return_scores")
    if return_scores is None:
        return_scores = False
    elif not isinstance(return_scores, bool):
        raise ApiError(422, f"field 'return_scores' must be a boolean, got {type(return_scores).__name__}")
    return queries, topk, return_scores


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or ApiError 413 as soon as it is known to exceed `limit` bytes (never read whole)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit():
        if int(declared) > limit:
            raise ApiError(413, f"request body of {declared} bytes exceeds --max-request-bytes {limit}")
        return await request.body()  # uvicorn never hands over more than the declared length
    chunks: list[bytes] = []  # chunked: counted as it arrives
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body exceeds --max-request-bytes {limit}")
        chunks.append(chunk)
    return b"".join(chunks)


def render_result(hits: list[list[Hit]], return_scores: bool) -> bytes:
    """The Search-R1 response body: documents with scores, or bare documents."""
    if return_scores:
        result: list[list[Any]] = [[{"document": doc, "score": score} for score, doc in q] for q in hits]
    else:
        result = [[doc for _, doc in q] for q in hits]
    return json.dumps({"result": result}, ensure_ascii=False).encode("utf-8")


class _State:
    """What the app knows about loading; swapped atomically from the loader thread."""

    def __init__(self) -> None:
        self.retriever: Retriever | None = None
        self.error: str | None = None
        self.started = time.time()
        self.request_seconds = 0.0
        self.retrieve_requests = 0


def create_app(
    plan: Plan,
    *,
    loader: Callable[[Plan], Retriever] = Retriever.load,
    on_fatal: Callable[[str], None] | None = None,
) -> FastAPI:
    """The FastAPI app for a checked plan; `loader` runs in a background thread, `on_fatal` gets load errors."""
    config = plan.config
    state = _State()
    batcher: MicroBatcher[list[list[Hit]]] = MicroBatcher(
        lambda requests: _require(state).process(requests),
        wait_ms=config.batch_wait_ms,
        max_size=config.batch_max_size,
    )

    def load() -> None:
        from retriever_server.indexes import index_factory

        try:
            factory = index_factory(plan.manifest["index"])
            state.retriever = loader(plan)
            logger.info(
                "ready: %d passages, %s index%s",
                len(state.retriever.store),
                plan.manifest["index"]["type"],
                f" ({factory})" if factory else "",
            )
        except Exception as err:
            state.error = (
                f"{type(err).__name__}: {err}" if not isinstance(err, ManifestMismatch) else str(err)
            )
            logger.error("loading the index failed: %s", state.error)
            if on_fatal is not None:
                on_fatal(state.error)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        threading.Thread(target=load, name="retriever-loader", daemon=True).start()
        yield
        await batcher.stop()

    async def require_api_key(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
    ) -> None:
        """401 unless the request carries the server's token; the token is never echoed."""
        assert config.api_key is not None
        if credentials is None:
            raise StarletteHTTPException(
                401,
                "missing API key: this retriever requires the header 'Authorization: Bearer <token>' "
                f"(client: set retriever.api_key_file or ${API_KEY_ENV})",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not hmac.compare_digest(credentials.credentials.encode(), config.api_key.encode()):
            raise StarletteHTTPException(
                401,
                "wrong API key: the bearer token sent is not this retriever's",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )

    # Without a key there is nothing to check: no dependency, so no per-request cost.
    guards = [Depends(require_api_key)] if config.api_key is not None else []
    app = FastAPI(title="retriever-server", lifespan=lifespan, dependencies=guards)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, str(exc.errors()))

    @app.get("/health")
    async def health() -> JSONResponse:
        """503 while loading (or after a failed load), 200 with the index's vital statistics once ready."""
        retriever = state.retriever
        if retriever is None:
            status = {"status": "error", "detail": state.error} if state.error else {"status": "loading"}
            return JSONResponse(status, status_code=503)
        return JSONResponse(
            {
                "status": "ready",
                "corpus_size": len(retriever.store),
                "index_type": plan.manifest["index"]["type"],
                "encoder": plan.manifest["encoder"].get("name"),
                "dim": plan.manifest.get("dim"),
                "topk": config.topk,
                "max_topk": config.max_topk,
                "max_queries": config.max_queries,
                "batch_wait_ms": config.batch_wait_ms,
                "batch_max_size": config.batch_max_size,
                "max_request_bytes": config.max_request_bytes,
                "api_key_required": config.api_key is not None,
                "busy": batcher.stats.busy,
            }
        )

    @app.get("/stats")
    async def stats() -> JSONResponse:
        """Cumulative counters: requests, batches, and seconds spent per processing stage."""
        retriever = state.retriever
        return JSONResponse(
            {
                **batcher.stats.to_dict(),
                **(retriever.timings() if retriever else {}),
                "retrieve_requests": state.retrieve_requests,
                "request_seconds": round(state.request_seconds, 6),
                "uptime_seconds": round(time.time() - state.started, 3),
            }
        )

    @app.post("/retrieve")
    async def retrieve(request: Request) -> Response:
        """Search-R1 retrieval: top-k documents per query, with or without scores."""
        start = time.perf_counter()
        try:
            body = await read_body(request, config.max_request_bytes)
            queries, topk, return_scores = parse_retrieve_body(
                body, request.headers.get("content-type", ""), config
            )
        except ApiError as err:
            return _error(err.status, err.message)
        if not queries:
            return Response(b'{"result": []}', media_type="application/json")
        if state.retriever is None:
            return _error(
                503,
                "index is still loading" if state.error is None else f"index failed to load: {state.error}",
            )
        try:
            hits = await batcher.submit(queries, topk)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            logger.exception("retrieval failed")
            return _error(500, f"retrieval failed: {type(err).__name__}: {err}")
        body = render_result(hits, return_scores)
        state.retrieve_requests += 1
        state.request_seconds += time.perf_counter() - start
        return Response(body, media_type="application/json")

    return app


def _require(state: _State) -> Retriever:
    if state.retriever is None:
        raise RuntimeError("index not loaded")
    return state.retriever
