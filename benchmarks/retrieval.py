"""Retrieval benchmark: server throughput and latency, micro-batching, recall; client failover and start-up.

    python benchmarks/retrieval.py [--sections throughput,searchr1,failover,startup,overhead] [--duration 10]
                                   [--index-root runs/bench] [--repeats 3] [--eval-questions 96]
                                   [--baseline OTHER_CHECKOUT]

`throughput`: builds (once, then reused) MiniLM flat / HNSW / IVF-PQ indexes of data/demo/corpus.jsonl
under --index-root, starts `retriever-server serve` as a subprocess with micro-batching on (5 ms) and off
(0), and drives it with 1, 8 and 32 concurrent keep-alive clients sending 1-query or 64-query requests
(HotpotQA dev questions, topk 3). The load generator is a minimal asyncio HTTP/1.1 client, so that on a
small machine as little CPU as possible goes to the client.

`failover`: two BM25 replicas of the synthetic corpus. How long the client takes to notice a replica that
was killed (connection refused) or frozen (SIGSTOP: the kernel still accepts connections, nothing answers,
so the request timeout decides), how long a replica restarted takes to be probed back into rotation, and
`evaluate_benchmarks` (warm-start policy, greedy) against one replica, two, and two of which one is
killed after the fourth search call: wall time, requests retried, and whether every question was answered
identically.

`startup`: `connect_retriever` against our server (`GET /health`) and against tests/searchr1_server.py,
which speaks only `POST /retrieve` (404 on /health, then a one-query probe): time to connect to a running
server, and how long after a freshly started server first answers the client reports it ready.

`searchr1`: our server against a Search-R1-style dense server (testbed/searchr1_server.py --dense-index:
one forward pass per request, FastAPI's thread pool), same corpus, MiniLM and flat index, 32 concurrent
1-query clients, distinct queries, the result cache off (`--cache-size 0`): requests/s of Search-R1, ours
with the fp32 query encoder, ours with `--encoder-dtype bf16`, one run each, interleaved as listed.

`overhead`: the HTTP layer's per-request cost (BM25, batching off, one client, 1-query requests) with and
without an API key, and, with `--baseline DIR`, served by another checkout's code, interleaved.

Prints a markdown report per section.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from retriever_server.build import build_index  # noqa: E402
from retriever_server.indexes import FaissIndex  # noqa: E402
from retriever_server.manifest import read_manifest  # noqa: E402
from testbed.retriever import ensure_bm25_index, free_port, running_retriever, serve_command, stop  # noqa: E402

CORPUS = REPO / "data" / "demo" / "corpus.jsonl"
SYNTHETIC = REPO / "data" / "synthetic"
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

    def __init__(self, port: int, token: str | None = None) -> None:
        self.port = port
        self.auth = f"Authorization: Bearer {token}\r\n" if token else ""
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nContent-Type: application/json\r\n"
            f"{self.auth}Content-Length: {len(body)}\r\n\r\n"
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
    port: int,
    clients: int,
    per_request: int,
    questions: list[str],
    duration: float,
    token: str | None = None,
) -> dict[str, float]:
    latencies: list[float] = []
    bodies = [
        json.dumps(
            {
                "queries": [questions[(i + j) % len(questions)] for j in range(per_request)],
                "topk": TOPK,
                "return_scores": True,  # as Search-R1's clients send it (its server crashes without)
            }
        ).encode()
        for i in range(0, len(questions), per_request if per_request > 1 else 1)
    ]
    deadline = time.perf_counter() + duration

    async def one_client(c: int) -> None:
        client = RawClient(port, token)
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


# --- failover and start-up: the client against replicas and against a server without /health --------------


def _spawn(command: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_answering(
    url: str, timeout: float = 120.0, poll_s: float = 0.01, token: str | None = None
) -> float:
    """Poll `url` every `poll_s` until POST /retrieve answers 200; the monotonic time it came."""
    deadline = time.monotonic() + timeout
    body = {"queries": ["probe"], "topk": 1, "return_scores": True}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    while time.monotonic() < deadline:
        try:
            if httpx.post(f"{url}/retrieve", json=body, timeout=2, headers=headers).status_code == 200:
                return time.monotonic()
        except httpx.TransportError:
            pass
        time.sleep(poll_s)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


@contextmanager
def replica(index: Path, port: int) -> Any:
    """Our server on `port`; yields (url, process) once it answers."""
    process = _spawn(serve_command(index, port))
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_answering(url)
        yield url, process
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)  # a frozen one must wake up to die gracefully
        stop(process)


def detection(index: Path, queries: list[str], mode: str, timeout_s: float) -> dict[str, float]:
    """Kill or freeze the second of two replicas; time until the client marks it down, and that search."""
    from autorefine.retrieval import RetrieverClient

    with replica(index, free_port()) as (a, _), replica(index, free_port()) as (b, process):
        client = RetrieverClient([a, b], timeout=timeout_s, probe_interval_s=3600)
        for query in queries[:20]:  # warm both replicas (and their pooled connections)
            client.search([query], topk=3)
        normal = []
        for query in queries[20:60]:
            started = time.perf_counter()
            client.search([query], topk=3)
            normal.append(time.perf_counter() - started)
        os.kill(process.pid, signal.SIGKILL if mode == "killed" else signal.SIGSTOP)
        if mode == "killed":
            process.wait()
        started = time.monotonic()
        calls = []
        for query in queries[60:]:
            call = time.perf_counter()
            client.search([query], topk=3)
            calls.append(time.perf_counter() - call)
            if not client.replicas[1].healthy:
                break
        detected = (client.replicas[1].down_since or float("nan")) - started
        retried = client.retried
        client.close()
    return {
        "detect_s": detected,
        "failing_call_s": calls[-1],
        "normal_call_s": float(np.median(normal)),
        "retried": retried,
    }


def probed_back(index: Path, queries: list[str], probe_interval_s: float) -> float:
    """Seconds from a restarted replica answering again until the client has it back in rotation."""
    from autorefine.retrieval import RetrieverClient

    port = free_port()
    with replica(index, free_port()) as (a, _):
        with replica(index, port) as (b, _):
            client = RetrieverClient([a, b], probe_interval_s=probe_interval_s)
            client.search(queries[:2], topk=3)
        while client.replicas[1].healthy:  # b is gone: the next searches find out
            client.search(queries[:1], topk=3)
        process = _spawn(serve_command(index, port))
        try:
            answering = _wait_answering(b)
            while not client.replicas[1].healthy:
                time.sleep(0.005)
            back = time.monotonic() - answering
        finally:
            stop(process)
            client.close()
    return back


def _policy_loop() -> Any:
    """The synthetic warm-start policy in an agent loop with its training limits (no retriever yet)."""
    from autorefine.modeling import load_policy, load_tokenizer
    from autorefine.protocol import PromptTemplate
    from autorefine.rollout import AgentLoop, RolloutSettings
    from autorefine.rollout.hf_engine import TransformersEngine

    model = load_policy(SYNTHETIC / "warmstart", dtype="float32").eval()
    engine = TransformersEngine(model, load_tokenizer(SYNTHETIC / "warmstart"))
    rollout = RolloutSettings(
        max_turns=2, max_new_tokens=48, max_obs_tokens=160, max_completion_tokens=320, topk=3
    )
    return AgentLoop(engine, None, rollout, PromptTemplate.load(SYNTHETIC / "template.txt"))


class KillAfter:
    """A Searcher that kills `process` before its `n`-th search call, and times the calls."""

    def __init__(self, client: Any, process: subprocess.Popen[bytes] | None, n: int) -> None:
        self.client, self.process, self.n, self.calls, self.seconds = client, process, n, 0, 0.0

    def search(self, queries: list[str], topk: int = 3) -> Any:
        self.calls += 1
        if self.process is not None and self.calls == self.n:
            self.process.kill()
            self.process.wait()
        started = time.perf_counter()
        hits = self.client.search(queries, topk)
        self.seconds += time.perf_counter() - started
        return hits


def evaluation_runs(index: Path, questions: int, repeats: int) -> list[dict[str, Any]]:
    """`evaluate_benchmarks` with one replica, two, and two losing one mid-run; `repeats` rounds, interleaved."""
    import tempfile

    from autorefine.evaluation.benchmark import PREDICTIONS_FILE, PredictionsFile, evaluate_benchmarks
    from autorefine.retrieval import RetrieverSettings, connect_retriever

    loop = _policy_loop()
    runs: list[dict[str, Any]] = []
    with replica(index, free_port()) as (a, _):
        for round_ in range(repeats):
            for setup in ("one replica", "two replicas", "two, one killed mid-run"):
                with replica(index, free_port()) as (b, process):
                    urls = [a] if setup == "one replica" else [a, b]
                    client = connect_retriever(RetrieverSettings(url=urls))
                    loop.searcher = KillAfter(client, process if "killed" in setup else None, 4)
                    with tempfile.TemporaryDirectory(prefix="failover-bench-") as tmp:
                        started = time.perf_counter()
                        metrics = evaluate_benchmarks(
                            loop, {"synthetic": SYNTHETIC / "heldout.jsonl"}, Path(tmp),
                            limit=questions, batch_size=8, progress=False,
                        )  # fmt: skip
                        seconds = time.perf_counter() - started
                        rows = {
                            k: v["prediction"]
                            for k, v in PredictionsFile(Path(tmp) / PREDICTIONS_FILE).rows.items()
                        }
                    stats = client.stats()
                    client.close()
                runs.append(
                    {"setup": setup, "round": round_, "seconds": seconds, "answered": metrics["datasets"]["synthetic"]["count"],
                     "em": metrics["datasets"]["synthetic"]["em"], "retried": stats["retried"],
                     "searches": loop.searcher.calls, "search_seconds": loop.searcher.seconds, "rows": rows}
                )  # fmt: skip
                print(
                    f"failover eval {setup} round {round_}: {seconds:.1f} s, retried {stats['retried']}",
                    file=sys.stderr,
                )
    return runs


def failover_section(index: Path, questions: list[str], eval_questions: int, repeats: int) -> list[str]:
    """Markdown lines: detection, probing back, and evaluation wall time with a replica lost."""
    killed = [detection(index, questions, "killed", 60.0) for _ in range(repeats)]
    frozen = detection(index, questions, "frozen", 2.0)
    back = [probed_back(index, questions, 5.0) for _ in range(repeats)]
    runs = evaluation_runs(index, eval_questions, repeats)
    lines = [
        "Failover: two BM25 replicas of the synthetic corpus (6,000 passages), one client, topk 3.",
        "",
        "| event | client setting | detected after | that search took | a normal search | retried |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, setting, rows in (("replica killed (connection refused)", "timeout_s 60", killed),
                                ("replica frozen (SIGSTOP)", "timeout_s 2", [frozen])):  # fmt: skip
        lines.append(
            f"| {name} ({len(rows)}×) | {setting} | {1000 * np.median([r['detect_s'] for r in rows]):.1f} ms | "
            f"{1000 * np.median([r['failing_call_s'] for r in rows]):.1f} ms | "
            f"{1000 * np.median([r['normal_call_s'] for r in rows]):.1f} ms | "
            f"{int(np.median([r['retried'] for r in rows]))} |"
        )
    lines += [
        "",
        f"- A restarted replica is back in rotation {np.median(back):.2f} s (median of {len(back)}; "
        f"max {max(back):.2f} s) after it answers again, with the default probe_interval_s 5.",
        "",
        f"`evaluate_benchmarks`, greedy, warm-start policy, {eval_questions} held-out questions in batches of 8 "
        f"({repeats} rounds, setups interleaved; the replica is killed before the 4th search call):",
        "",
        "| setup | wall s (median) | wall s (each round) | in search calls, s (median) | search calls | "
        "questions answered | EM | requests retried | predictions = one replica's |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    reference = [r for r in runs if r["setup"] == "one replica"]
    for setup in ("one replica", "two replicas", "two, one killed mid-run"):
        rows = [r for r in runs if r["setup"] == setup]
        same = all(r["rows"] == reference[0]["rows"] for r in rows)
        each = ", ".join(f"{r['seconds']:.2f}" for r in rows)
        lines.append(
            f"| {setup} | {np.median([r['seconds'] for r in rows]):.2f} | "
            f"{each} | {np.median([r['search_seconds'] for r in rows]):.3f} | {rows[0]['searches']} | "
            f"{rows[0]['answered']} | {rows[0]['em']:.1%} | "
            f"{', '.join(str(r['retried']) for r in rows)} | {'yes' if same else 'NO'} |"
        )

    def median(setup: str, key: str) -> float:
        return float(np.median([r[key] for r in runs if r["setup"] == setup]))

    two, lost = median("two replicas", "seconds"), median("two, one killed mid-run", "seconds")
    in_two, in_lost = (
        median("two replicas", "search_seconds"),
        median("two, one killed mid-run", "search_seconds"),
    )
    lines += [
        "",
        f"- Losing one of two replicas mid-run: {lost - two:+.2f} s of wall time ({lost / two:.3f}×); time in "
        f"search calls {in_lost - in_two:+.3f} s ({in_lost / in_two:.3f}×).",
    ]
    return lines


def startup_section(index: Path, repeats: int) -> list[str]:
    """Markdown lines: `connect_retriever` with and without /health, warm and from a fresh server."""
    from autorefine.retrieval import RetrieverSettings, connect_retriever

    def searchr1_command(port: int) -> list[str]:
        return [sys.executable, "-m", "testbed.searchr1_server", "--corpus", str(SYNTHETIC / "corpus.jsonl"),
                "--port", str(port)]  # fmt: skip

    servers = {
        "ours (GET /health)": lambda port: serve_command(index, port),
        "Search-R1 API only (404 on /health, then POST /retrieve)": searchr1_command,
    }
    lines = [
        "Start-up: `connect_retriever` against a running server (a new client, its readiness check, ready), and "
        "against a server started at the same moment: when the server first answers `POST /retrieve` (a "
        "separate loop polls every 10 ms) and when the client reports it ready (it polls every 0.5 s, the "
        "default), both from the server's spawn.",
        "",
        f"| server | connect to a running server (median of 20) | fresh server: answers after (median of {repeats}) "
        "| client reports ready after | checked with |",
        "|---|---:|---:|---:|---|",
    ]
    for name, command in servers.items():
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        answers, readies = [], []
        for _ in range(repeats):
            spawned = time.monotonic()
            process = _spawn(command(port))
            try:
                with ThreadPoolExecutor(1) as pool:
                    answered = pool.submit(_wait_answering, url)
                    client = connect_retriever(RetrieverSettings(url=url, startup_wait_s=120))
                    readies.append(time.monotonic() - spawned)
                    answers.append(answered.result() - spawned)
                checked = "GET /health" if client.replicas[0].has_health else "POST /retrieve"
                client.close()
                connects = []
                for _ in range(20):
                    started = time.perf_counter()
                    connect_retriever(RetrieverSettings(url=url)).close()
                    connects.append(time.perf_counter() - started)
            finally:
                stop(process)
        lines.append(
            f"| {name} | {1000 * np.median(connects):.1f} ms | {np.median(answers):.2f} s | "
            f"{np.median(readies):.2f} s | {checked} |"
        )
    return lines


def overhead_section(
    index: Path, questions: list[str], duration: float, rounds: int, baseline: Path | None
) -> list[str]:
    """Markdown lines: per-request cost of the HTTP layer, BM25, batching off, one client, 1-query requests."""
    import tempfile

    token = "benchmark-token-0123456789abcdef"
    setups: list[tuple[str, Path, str | None]] = [
        ("this checkout", REPO, None),
        ("this checkout, API key", REPO, token),
    ]
    if baseline is not None:
        setups.insert(0, (f"baseline checkout ({baseline.name})", baseline, None))
    cells: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in setups}
    with tempfile.TemporaryDirectory(prefix="overhead-bench-") as tmp:
        key_file = Path(tmp) / "key"
        key_file.write_text(token)
        for round_ in range(rounds):
            for name, source, key in setups[round_ % len(setups) :] + setups[: round_ % len(setups)]:
                port = free_port()
                extra = ("--batch-wait-ms", "0", *(("--api-key-file", str(key_file)) if key else ()))
                process = subprocess.Popen(
                    serve_command(index, port, extra), cwd=source, env={**os.environ, "PYTHONPATH": str(source)},
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
                try:
                    _wait_answering(f"http://127.0.0.1:{port}", token=key)
                    asyncio.run(_load(port, 1, 1, questions, 1.0, key))  # warm-up
                    cells[name].append(asyncio.run(_load(port, 1, 1, questions, duration, key)))
                finally:
                    stop(process)
                print(f"overhead {name}: {cells[name][-1]}", file=sys.stderr)
    lines = [
        f"Per-request overhead: BM25 over the synthetic corpus, `--batch-wait-ms 0`, one keep-alive client sending "
        f"1-query requests for {duration:.0f} s after a 1 s warm-up; {rounds} rounds, setups interleaved and "
        "rotated (each round starts with the next one).",
        "",
        "| server | requests/s (median) | each round | p50 ms (median) |",
        "|---|---:|---|---:|",
    ]
    for name, _, _ in setups:
        rows = cells[name]
        each = ", ".join(f"{c['qps']:.1f}" for c in rows)
        lines.append(
            f"| {name} | {np.median([c['qps'] for c in rows]):.1f} | {each} | "
            f"{np.median([c['p50_ms'] for c in rows]):.2f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sections",
        default="throughput,failover,startup,overhead",
        help="comma-separated: throughput, searchr1, failover, startup, overhead",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="overhead: also serve with the retriever_server of this other checkout (e.g. `git archive main`)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="failover/startup repetitions (3)")
    parser.add_argument(
        "--eval-questions", type=int, default=96, help="questions per failover evaluation (96)"
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load per table cell (10)")
    parser.add_argument(
        "--index-root", type=Path, default=REPO / "runs" / "bench", help="where indexes are built/reused"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="server --threads (default: available cores)"
    )
    args = parser.parse_args()
    sections = {name.strip() for name in args.sections.split(",")}
    unknown = sections - {"throughput", "searchr1", "failover", "startup", "overhead"}
    if unknown:
        parser.error(f"unknown section(s): {', '.join(sorted(unknown))}")

    questions = _questions()
    load_before = os.getloadavg()
    if sections & {"failover", "startup", "overhead"}:
        synthetic = ensure_bm25_index(SYNTHETIC / "corpus.jsonl", args.index_root / "synthetic-bm25")
        if "overhead" in sections:
            print(
                "\n".join(overhead_section(synthetic, questions, args.duration, args.repeats, args.baseline))
                + "\n"
            )
        if "failover" in sections:
            print("\n".join(failover_section(synthetic, questions, args.eval_questions, args.repeats)) + "\n")
        if "startup" in sections:
            print("\n".join(startup_section(synthetic, args.repeats)) + "\n")
    if "throughput" in sections:
        throughput_section(args, questions)
    if "searchr1" in sections:
        print("\n".join(searchr1_section(args, questions)) + "\n")
    load_after = os.getloadavg()
    print(
        f"- load average (1/5/15 min) before: {'/'.join(f'{x:.2f}' for x in load_before)}, "
        f"after: {'/'.join(f'{x:.2f}' for x in load_after)}; {os.cpu_count()} CPUs; Python {platform.python_version()}"
    )


def searchr1_section(args: argparse.Namespace, questions: list[str]) -> list[str]:
    """Markdown lines: requests/s at 32 one-query clients, Search-R1-style dense server vs ours (fp32, bf16)."""
    flat = build_indexes(args.index_root)["flat"]
    extra = {"threads": args.threads} if args.threads else {}
    cells: dict[str, dict[str, float]] = {}
    port = free_port()
    process = _spawn(
        [
            sys.executable,
            "-m",
            "testbed.searchr1_server",
            "--corpus",
            str(CORPUS),
            "--port",
            str(port),
            "--dense-index",
            str(flat),
        ]
    )
    try:
        _wait_answering(f"http://127.0.0.1:{port}", timeout=300)
        asyncio.run(_load(port, 32, 1, questions, min(2.0, args.duration / 4)))  # warm-up
        cells["Search-R1-style (testbed/searchr1_server.py --dense-index)"] = asyncio.run(
            _load(port, 32, 1, questions, args.duration)
        )
    finally:
        stop(process)
    for label, dtype in (("ours, fp32 query encoder", "fp32"), ("ours, bf16 query encoder", "bf16")):
        with server(flat, cache_size=0, encoder_dtype=dtype, **extra) as (url, port):
            cells[label] = measure(url, port, 32, 1, questions, args.duration)
        print(f"{label}: {cells[label]}", file=sys.stderr)
    base = next(iter(cells.values()))["qps"]
    lines = [
        "| server | requests/s | × Search-R1 | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, cell in cells.items():
        lines.append(
            f"| {label} | {cell['qps']:.1f} | {cell['qps'] / base:.2f}× | {cell['p50_ms']:.1f} | {cell['p99_ms']:.1f} |"
        )
    return lines


def throughput_section(args: argparse.Namespace, questions: list[str]) -> None:
    """The server under concurrent load, micro-batching on and off, and recall of approximate indexes."""
    dirs = build_indexes(args.index_root)
    from retriever_server.encoders import DenseEncoder, EncoderSpec
    from retriever_server.indexes import configure_threads

    configure_threads(args.threads)
    encoder = DenseEncoder(EncoderSpec.from_dict(read_manifest(dirs["flat"])["encoder"]))
    alone = encoder_alone(encoder, questions)
    recall = recall_at_3(dirs, questions, encoder)
    del encoder
    extra = {"threads": args.threads} if args.threads else {}
    rows = []
    split: dict[str, float] = {}
    for label, wait_ms in (("on (5 ms)", 5), ("off", 0)):
        # Cache off: the 500 questions cycle, and a cached answer would measure the cache, not the server.
        with server(dirs["flat"], batch_wait_ms=wait_ms, cache_size=0, **extra) as (url, port):
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


if __name__ == "__main__":
    main()
