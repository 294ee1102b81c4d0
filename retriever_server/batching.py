"""Dynamic micro-batching: concurrent requests are merged and processed together in one worker thread.

Many trainer ranks each sending a few queries would otherwise pay one encoder pass per request; merged,
they share a pass. While the worker is busy, arriving requests queue up and form the next batch, so the
batch size follows the load. The event loop only queues and waits; it never runs the encoder.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

Request = tuple[list[str], int]  # (queries, topk)
Result = TypeVar("Result")


@dataclass
class _Pending(Generic[Result]):
    request: Request
    future: asyncio.Future[Result]
    enqueued: float


@dataclass
class BatcherStats:
    """Counters since start: how requests were grouped."""

    requests: int = 0
    queries: int = 0
    batches: int = 0
    largest_batch: int = 0
    busy: bool = False
    worker_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready counters."""
        return {
            "requests": self.requests,
            "queries": self.queries,
            "batches": self.batches,
            "largest_batch_queries": self.largest_batch,
            "mean_batch_queries": round(self.queries / self.batches, 2) if self.batches else 0.0,
            "busy": self.busy,
            "worker_seconds": round(self.worker_seconds, 6),
        }


class MicroBatcher(Generic[Result]):
    """Queue requests; run `process(list_of_requests) -> list_of_results` on batches in one worker thread.

    A batch closes `wait_ms` after its first request arrived, or when it holds `max_size` queries; a
    request larger than `max_size` is processed alone (never split). `wait_ms == 0` disables merging:
    every request is processed on its own, in arrival order.
    """

    def __init__(
        self, process: Callable[[list[Request]], list[Result]], *, wait_ms: float, max_size: int
    ) -> None:
        if wait_ms < 0 or max_size <= 0:
            raise ValueError("wait_ms must be >= 0 and max_size > 0")
        self._process = process
        self.wait_s = wait_ms / 1000
        self.max_size = max_size
        self.stats = BatcherStats()
        self._queue: asyncio.Queue[_Pending[Result]] | None = None
        self._carry: _Pending[Result] | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retriever-worker")

    async def start(self) -> None:
        """Start the collector task on the running loop."""
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._collect_forever())

    async def stop(self) -> None:
        """Stop collecting; requests still queued fail with CancelledError."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, queries: list[str], topk: int) -> Result:
        """Queue one request and wait for its result."""
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not awaited")
        loop = asyncio.get_running_loop()
        pending: _Pending[Result] = _Pending((queries, topk), loop.create_future(), loop.time())
        await self._queue.put(pending)
        return await pending.future

    async def _next_batch(self) -> list[_Pending[Result]]:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        first = self._carry or await self._queue.get()
        self._carry = None
        batch, size = [first], len(first.request[0])
        if self.wait_s == 0:
            return batch
        # Measured from the first request's arrival: requests that queued while the worker was busy
        # have already waited, so they go at once with whatever else is queued.
        deadline = first.enqueued + self.wait_s
        while size < self.max_size:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            if size + len(item.request[0]) > self.max_size:
                self._carry = item
                break
            batch.append(item)
            size += len(item.request[0])
        return batch

    async def _collect_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            batch = [item for item in batch if not item.future.done()]  # caller gone (disconnect)
            if not batch:
                continue
            requests = [item.request for item in batch]
            n_queries = sum(len(queries) for queries, _ in requests)
            self.stats.batches += 1
            self.stats.requests += len(batch)
            self.stats.queries += n_queries
            self.stats.largest_batch = max(self.stats.largest_batch, n_queries)
            self.stats.busy = True
            start = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self._process, requests)
            except Exception as err:  # the batch fails, the server keeps serving
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(err)
                continue
            finally:
                self.stats.busy = False
                self.stats.worker_seconds += time.perf_counter() - start
            for item, result in zip(batch, results, strict=True):
                if not item.future.done():
                    item.future.set_result(result)
