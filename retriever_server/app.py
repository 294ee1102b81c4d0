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
from retriever_server.cache import ResultCache
from retriever_server.corpus import DocumentStore
from retriever_server.encoders import EncoderSpec, is_embedded
from retriever_server.manifest import (
    ManifestMismatch,
    check_corpus,
    check_encoder,
    check_index_file,
    read_manifest,
)
from retriever_server.search import Fusion, Searcher

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
    fusion: Fusion | None = None  # hybrid indexes only; None: the defaults
    encoder_dtype: str = "fp32"  # dense query encoder weights on CPU: fp32 or bf16
    rerank: str | None = None  # a causal LM folder judging relevance; None: no reranking
    rerank_depth: int = 10  # candidates re-scored per query
    rerank_dtype: str = "bf16"
    rerank_mode: str = "query-likelihood"  # or "yes-no" (see retriever_server/rerank.py)
    rerank_batch: int = 16
    cache_size: int = 4096  # results kept for repeated queries; 0 disables the cache
    query_log: Path | None = None  # append every /retrieve request's queries here (JSONL), to replay later


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
    check_options(config, manifest, spec)
    return Plan(config=config, manifest=manifest, corpus=corpus, spec=spec)


def check_options(config: ServeConfig, manifest: dict[str, Any], spec: EncoderSpec | None) -> None:
    """Refuse serve options the index cannot use: fusion without a hybrid, bf16 without a dense encoder, …"""
    from retriever_server.encoders import ENCODER_DTYPES
    from retriever_server.search import HYBRID, index_types

    kinds = index_types(manifest, Path(config.index_dir))
    if config.fusion is not None and HYBRID not in kinds:
        raise ValueError(
            f"fusion options apply to hybrid indexes; {config.index_dir} is {' over '.join(kinds)} "
            "(build one with --encoder hybrid)"
        )
    if config.encoder_dtype not in ENCODER_DTYPES:
        raise ValueError(
            f"unknown --encoder-dtype {config.encoder_dtype!r} (choose from {', '.join(ENCODER_DTYPES)})"
        )
    if config.encoder_dtype != "fp32" and spec is None:
        raise ValueError(
            f"--encoder-dtype {config.encoder_dtype} needs a dense encoder; {config.index_dir} is BM25"
        )
    if config.cache_size < 0:
        raise ValueError(f"--cache-size must be >= 0, got {config.cache_size}")
    if config.rerank is not None:
        from retriever_server.rerank import check_reranker

        check_reranker(config.rerank, config.rerank_dtype, config.rerank_mode)
        if config.rerank_depth < 1:
            raise ValueError(f"--rerank-depth must be positive, got {config.rerank_depth}")
        if config.rerank_depth > config.max_topk * 10:
            raise ValueError(
                f"--rerank-depth {config.rerank_depth} is far beyond --max-topk {config.max_topk}"
            )


class Retriever:
    """A loaded searcher, its document store, an optional reranker and a result cache; processes batches."""

    def __init__(
        self,
        plan: Plan,
        searcher: Searcher,
        store: DocumentStore,
        reranker: Any | None = None,
    ) -> None:
        self.plan = plan
        self.searcher = searcher
        self.store = store
        self.reranker = reranker
        self.cache = ResultCache(plan.config.cache_size)
        self.lookup_seconds = 0.0
        self.score_kind = reranker.score_kind if reranker is not None else searcher.score_kind

    @classmethod
    def load(cls, plan: Plan) -> Retriever:
        """Load the searcher, offsets, encoder and reranker named by a checked plan."""
        from retriever_server.indexes import configure_threads
        from retriever_server.search import load_searcher

        config, manifest, index_dir = plan.config, plan.manifest, Path(plan.config.index_dir)
        dense = plan.spec is not None or config.rerank is not None
        configure_threads(config.threads, torch_threads=dense)
        store = DocumentStore(plan.corpus, index_dir / manifest["offsets"])
        if len(store) != manifest["corpus"]["passages"]:
            raise ManifestMismatch(
                f"{index_dir}: offsets table has {len(store)} rows, manifest says {manifest['corpus']['passages']}"
            )
        searcher = load_searcher(
            index_dir,
            plan.corpus,
            encoder_spec=plan.spec,
            search_params=config.search_params,
            batch_size=config.batch_max_size,
            max_batch_tokens=config.max_batch_tokens,
            fusion=config.fusion or Fusion(),
            encoder_dtype=config.encoder_dtype,
        )
        reranker = None
        if config.rerank is not None:
            from retriever_server.rerank import load_reranker

            reranker = load_reranker(
                config.rerank,
                dtype=config.rerank_dtype,
                batch_size=config.rerank_batch,
                mode=config.rerank_mode,
            )
        retriever = cls(plan, searcher, store, reranker)
        if dense:
            retriever.process([(["warm-up query"], 1)])  # first passes allocate; keep that out of latency
            retriever.cache = ResultCache(config.cache_size)  # the warm-up is no request: forget it
        return retriever

    def search(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Encode and search a list of queries (no reranking, no cache); each distinct query once."""
        distinct = list(dict.fromkeys(queries))
        keys = self.searcher.encode(distinct)
        scores, rows = self.searcher.search(keys, list(range(len(distinct))), k)
        where = {query: i for i, query in enumerate(distinct)}
        picks = [where[query] for query in queries]
        return scores[picks], rows[picks]

    def process(self, requests: list[tuple[list[str], int]]) -> list[list[list[Hit]]]:
        """One batch: cached results reused, other distinct queries encoded once and searched per topk.

        Searching each topk on its own keeps a request's hits independent of the batch it landed in: an
        approximate index searched with a larger k widens its search (HNSW's beam is max(efSearch, k),
        IVF-PQ re-ranks k·k_factor candidates), so cutting a larger-k result back would change the answer.
        """
        found: dict[tuple[str, int], list[Hit]] = {}
        todo = []  # one cache lookup per distinct (query, topk) of the batch
        pairs = [(q, k) for queries, k in requests for q in queries]
        distinct_pairs = dict.fromkeys(pairs)
        self.cache.batch_duplicates += len(pairs) - len(distinct_pairs)
        for key in distinct_pairs:
            cached = self.cache.get(key)
            if cached is None:
                todo.append(key)
            else:
                found[key] = cached
        # GRPO groups often send the same query several times (same question, several rollouts).
        distinct = list(dict.fromkeys(q for q, _ in todo))
        position = {query: i for i, query in enumerate(distinct)}
        keys = self.searcher.encode(distinct) if distinct else None
        for k in sorted({k for _, k in todo}):
            group = list(dict.fromkeys(q for q, kk in todo if kk == k))
            depth = k if self.reranker is None else max(k, self.plan.config.rerank_depth)
            scores, rows = self.searcher.search(keys, [position[q] for q in group], depth)
            start = time.perf_counter()
            hits = [
                [(float(s), self.store.get(int(r))) for s, r in zip(s_row, r_row, strict=True) if r >= 0]
                for s_row, r_row in zip(scores, rows, strict=True)
            ]
            self.lookup_seconds += time.perf_counter() - start
            if self.reranker is not None:
                hits = self.reranker.rerank(group, hits)
            for q, h in zip(group, hits, strict=True):
                found[(q, k)] = h[:k]
                self.cache.put((q, k), h[:k])
        return [[found[(q, k)] for q in queries] for queries, k in requests]

    def timings(self) -> dict[str, float]:
        """Cumulative seconds spent in each stage of batch processing."""
        timings = {**self.searcher.timings(), "lookup_seconds": self.lookup_seconds}
        if self.reranker is not None:
            timings["rerank_seconds"] = self.reranker.seconds
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


def render_result(hits: list[list[Hit]], return_scores: bool, score_kind: str | None = None) -> bytes:
    """The Search-R1 response body: documents with scores (and what the scores are), or bare documents."""
    if return_scores:
        result: list[list[Any]] = [[{"document": doc, "score": score} for score, doc in q] for q in hits]
        body: dict[str, Any] = {"result": result}
        if score_kind is not None:
            body["score_kind"] = score_kind  # an extra key: Search-R1 clients read only "result"
        return json.dumps(body, ensure_ascii=False).encode("utf-8")
    return json.dumps({"result": [[doc for _, doc in q] for q in hits]}, ensure_ascii=False).encode("utf-8")


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

    query_logs: list[Any] = []  # the open --query-log file while serving

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        with contextlib.ExitStack() as files:
            if config.query_log is not None:
                query_logs.append(files.enter_context(Path(config.query_log).open("a", encoding="utf-8")))
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
                "score_kind": retriever.score_kind,
                "rerank": config.rerank,
                "rerank_depth": config.rerank_depth if config.rerank else None,
                "rerank_mode": config.rerank_mode if config.rerank else None,
                "encoder_dtype": config.encoder_dtype if plan.spec is not None else None,
                "cache": retriever.cache.to_dict(),
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
        for log in query_logs:  # one line per request, flushed: a killed server keeps what it logged
            log.write(json.dumps({"t": round(time.time(), 3), "topk": topk, "queries": queries}) + "\n")
            log.flush()
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
        body = render_result(hits, return_scores, state.retriever.score_kind)
        state.retrieve_requests += 1
        state.request_seconds += time.perf_counter() - start
        return Response(body, media_type="application/json")

    return app


def _require(state: _State) -> Retriever:
    if state.retriever is None:
        raise RuntimeError("index not loaded")
    return state.retriever
