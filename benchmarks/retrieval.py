"""Retrieval server benchmark: throughput and latency under concurrency, micro-batching on/off, recall.

    python benchmarks/retrieval.py [--duration 10] [--index-root runs/bench]

Builds (once, then reused) MiniLM flat / HNSW / IVF-PQ indexes of data/demo/corpus.jsonl under
--index-root, starts `retriever-server serve` as a subprocess with micro-batching on (5 ms) and off (0),
and drives it with 1, 8 and 32 concurrent keep-alive clients sending 1-query or 64-query requests
(HotpotQA dev questions, topk 3). The load generator is a minimal asyncio HTTP/1.1 client, so that on a
small machine as little CPU as possible goes to the client. Prints a markdown report.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from autorefine.retriever_process import free_port, running_retriever  # noqa: E402
from retriever_server.build import build_index  # noqa: E402
from retriever_server.indexes import FaissIndex  # noqa: E402
from retriever_server.manifest import read_manifest  # noqa: E402

CORPUS = REPO / "data" / "demo" / "corpus.jsonl"
QUESTION_FILES = [
    REPO / "data" / "demo" / "hotpotqa_dev.jsonl",
    REPO / "data" / "demo" / "hotpotqa_train.jsonl",
]
TOPK = 3


def _questions() -> list[str]:
    return [
        json.loads(line)["question"]
        for path in QUESTION_FILES
        for line in path.read_text("utf-8").splitlines()
    ]


def build_indexes(root: Path) -> dict[str, Path]:
    """Flat index first; HNSW and IVF-PQ reuse its embedding shards (the corpus is encoded once)."""
    dirs = {kind: root / f"demo-minilm-{kind}" for kind in ("flat", "hnsw", "ivfpq")}
    for kind, out in dirs.items():
        started = time.perf_counter()
        shards = dirs["flat"] / "embeddings"
        result = build_index(CORPUS, out, index_type=kind, shard_size=1024, shards_dir=shards, progress=True)
        state = "reused" if result.up_to_date else f"built in {time.perf_counter() - started:.1f} s"
        print(f"{kind}: {out} ({state})", file=sys.stderr)
    return dirs


def encoder_alone(encoder: Any, questions: list[str]) -> dict[str, float]:
    """In-process encoder cost per query, one query per pass vs 32 per call: the most batching can gain."""
    encoder.encode_queries(questions[:32])
    start = time.perf_counter()
    for question in questions[:96]:
        encoder.encode_queries([question])
    single = (time.perf_counter() - start) / 96
    start = time.perf_counter()
    for i in range(3):
        encoder.encode_queries(questions[32 * i : 32 * (i + 1)])
    batched = (time.perf_counter() - start) / 96
    return {"single_ms": 1000 * single, "batched_ms": 1000 * batched, "ceiling": single / batched}


def recall_at_3(dirs: dict[str, Path], questions: list[str], encoder: Any) -> dict[str, float]:
    """recall@3 of each approximate index against flat, over the benchmark questions."""
    queries = encoder.encode_queries(questions)
    rows = {}
    for kind, directory in dirs.items():
        info = read_manifest(directory)["index"]
        rows[kind] = FaissIndex.load(directory / info["path"], kind, info["params"]).search(queries, TOPK)[1]
    return {
        kind: float(
            np.mean([len(set(a) & set(b)) / TOPK for a, b in zip(rows[kind], rows["flat"], strict=True)])
        )
        for kind in ("hnsw", "ivfpq")
    }


@contextmanager
def server(index: Path, **flags: Any) -> Any:
    """A `retriever-server serve` subprocess; yields its URL and port once /health says ready."""
    port = free_port()
    extra = [arg for name, value in flags.items() for arg in ("--" + name.replace("_", "-"), str(value))]
    with running_retriever(index, port=port, extra_args=tuple(extra), startup_timeout_s=180) as url:
        yield url, port


class RawClient:
    """One keep-alive HTTP/1.1 connection: POST a body, read a Content-Length response."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        await self.writer.drain()
        status = int((await self.reader.readline()).split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def _load(
    port: int, clients: int, per_request: int, questions: list[str], duration: float
) -> dict[str, float]:
    latencies: list[float] = []
    bodies = [
        json.dumps(
            {"queries": [questions[(i + j) % len(questions)] for j in range(per_request)], "topk": TOPK}
        ).encode()
        for i in range(0, len(questions), per_request if per_request > 1 else 1)
    ]
    deadline = time.perf_counter() + duration

    async def one_client(c: int) -> None:
        client = RawClient(port)
        n = c
        try:
            while time.perf_counter() < deadline:
                body = bodies[n % len(bodies)]
                start = time.perf_counter()
                status, payload = await client.post("/retrieve", body)
                latencies.append(time.perf_counter() - start)
                if status != 200:
                    raise RuntimeError(f"HTTP {status}: {payload[:200]!r}")
                if n % 10 == 0 and len(json.loads(payload)["result"]) != per_request:  # spot-check answers
                    raise RuntimeError("wrong number of result lists")
                n += clients
        finally:
            client.close()

    started = time.perf_counter()
    await asyncio.gather(*(one_client(c) for c in range(clients)))
    elapsed = time.perf_counter() - started
    lat = np.array(latencies) * 1000
    return {
        "requests": len(lat),
        "qps": len(lat) / elapsed,
        "queries_per_s": len(lat) * per_request / elapsed,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
    }


def measure(
    url: str, port: int, clients: int, per_request: int, questions: list[str], duration: float
) -> dict[str, Any]:
    """One cell of the table, after a short warm-up at the same load."""
    asyncio.run(_load(port, clients, per_request, questions, min(2.0, duration / 4)))
    before = httpx.get(f"{url}/stats").json()
    result = asyncio.run(_load(port, clients, per_request, questions, duration))
    after = httpx.get(f"{url}/stats").json()
    delta = {
        key: after[key] - before[key]
        for key in after
        if isinstance(after[key], int | float) and key != "busy"
    }
    result["mean_batch_queries"] = delta["queries"] / delta["batches"] if delta["batches"] else 0.0
    return result


def time_split(url: str, port: int, questions: list[str], n_requests: int) -> dict[str, float]:
    """For sequential 64-query requests: client-measured time vs encoder forward + FAISS search inside."""
    before = httpx.get(f"{url}/stats").json()
    latencies: list[float] = []

    async def run() -> None:
        client = RawClient(port)
        for i in range(n_requests):
            body = json.dumps(
                {"queries": [questions[(64 * i + j) % len(questions)] for j in range(64)], "topk": TOPK}
            )
            start = time.perf_counter()
            status, _ = await client.post("/retrieve", body.encode())
            latencies.append(time.perf_counter() - start)
            assert status == 200
        client.close()

    asyncio.run(run())
    after = httpx.get(f"{url}/stats").json()
    d = {
        key: after[key] - before[key]
        for key in (
            "encoder_forward_seconds",
            "search_seconds",
            "tokenize_seconds",
            "lookup_seconds",
            "worker_seconds",
            "request_seconds",
        )
    }
    total = sum(latencies)
    core = d["encoder_forward_seconds"] + d["search_seconds"]
    return {
        "requests": n_requests,
        "client_seconds": total,
        "forward": d["encoder_forward_seconds"] / total,
        "search": d["search_seconds"] / total,
        "tokenize": d["tokenize_seconds"] / total,
        "lookup": d["lookup_seconds"] / total,
        "http_json_queue": (total - d["worker_seconds"]) / total,
        "outside": (total - core) / total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load per table cell (10)")
    parser.add_argument(
        "--index-root", type=Path, default=REPO / "runs" / "bench", help="where indexes are built/reused"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="server --threads (default: available cores)"
    )
    args = parser.parse_args()

    questions = _questions()
    dirs = build_indexes(args.index_root)
    from retriever_server.encoders import DenseEncoder, EncoderSpec
    from retriever_server.indexes import configure_threads

    configure_threads(args.threads)
    encoder = DenseEncoder(EncoderSpec.from_dict(read_manifest(dirs["flat"])["encoder"]))
    alone = encoder_alone(encoder, questions)
    recall = recall_at_3(dirs, questions, encoder)
    del encoder
    load_before = os.getloadavg()
    extra = {"threads": args.threads} if args.threads else {}
    rows = []
    split: dict[str, float] = {}
    for label, wait_ms in (("on (5 ms)", 5), ("off", 0)):
        with server(dirs["flat"], batch_wait_ms=wait_ms, **extra) as (url, port):
            if wait_ms == 0:
                split = time_split(url, port, questions, 30)
            for per_request in (1, 64):
                for clients in (1, 8, 32):
                    cell = measure(url, port, clients, per_request, questions, args.duration)
                    rows.append((label, clients, per_request, cell))
                    print(
                        f"batching {label:10} clients {clients:2} q/req {per_request:2}: {cell}",
                        file=sys.stderr,
                    )
    load_after = os.getloadavg()

    qps = {(label, c, q): cell["qps"] for label, c, q, cell in rows}
    print(
        "| micro-batching | clients | queries/request | requests/s | queries/s | p50 ms | p99 ms | mean queries/batch |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, clients, per_request, cell in rows:
        print(
            f"| {label} | {clients} | {per_request} | {cell['qps']:.1f} | {cell['queries_per_s']:.0f} | "
            f"{cell['p50_ms']:.1f} | {cell['p99_ms']:.1f} | {cell['mean_batch_queries']:.1f} |"
        )
    print()
    ratio = qps[("on (5 ms)", 32, 1)] / qps[("off", 32, 1)]
    print(f"- 32 concurrent 1-query clients: batching on / off = {ratio:.2f}× requests/s (target ≥ 3×)")
    print(
        f"- encoder alone, in-process, same questions: {alone['single_ms']:.1f} ms per query one at a time, "
        f"{alone['batched_ms']:.1f} ms per query in calls of 32 → batching can gain at most ~{alone['ceiling']:.1f}× here"
    )
    print(
        f"- 64-query requests, 1 client, batching off ({split['requests']} requests): time outside encoder forward + "
        f"FAISS search = {100 * split['outside']:.1f}% of client-measured request time (target < 20%): "
        f"tokenization {100 * split['tokenize']:.1f}%, document lookup {100 * split['lookup']:.1f}%, HTTP + JSON + "
        f"queueing {100 * split['http_json_queue']:.1f}%; forward {100 * split['forward']:.1f}%, search {100 * split['search']:.1f}%"
    )
    print(
        f"- recall@3 against flat ({len(questions)} HotpotQA questions): hnsw {recall['hnsw']:.3f}, ivfpq {recall['ivfpq']:.3f}"
    )
    for kind in ("hnsw", "ivfpq"):
        print(f"  - {kind} parameters: {read_manifest(dirs[kind])['index']['params']}")
    print(
        f"- load average (1/5/15 min) before: {'/'.join(f'{x:.2f}' for x in load_before)}, "
        f"after: {'/'.join(f'{x:.2f}' for x in load_after)}; {os.cpu_count()} CPUs; Python {platform.python_version()}"
    )


if __name__ == "__main__":
    main()
