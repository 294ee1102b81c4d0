"""Retrieval quality: gold-evidence recall@3/@5 of BM25, MiniLM, hybrid, chunked and reranked retrieval.

    python benchmarks/retrieval_quality.py [--index-root runs/bench/quality] [--chunk-tokens 64]
        [--rerank .cache/models/smollm2-135m-instruct] [--rerank-depths 10 20] [--rerank-questions 30] [--threads 2]
        [--rerank-modes query-likelihood yes-no] [--weights 0.3 0.7 --rerank-only]
        [--replay QUERY_LOG ...]

Builds (once, then reused) a hybrid index (BM25 + embedded MiniLM, flat) and a chunked hybrid index of
data/demo/corpus.jsonl under --index-root. Every configuration is served in-process from those two folders:
BM25 alone and MiniLM alone are the hybrid's fusion weights 1:0 and 0:1 (the same rankings as each member's
own index), so one build covers them all. Fusion weights are chosen on the 400 demo HotpotQA *train*
questions and reported on the 100 *dev* ones (both carry their supporting paragraphs as
`metadata.evidence`; the demo MuSiQue and 2Wiki samples carry none). Recall is that of
`retriever-server audit`: the share of gold paragraphs in the top k, plus the share of questions with
both paragraphs in the top k. Also: MiniLM recall with a bf16 query encoder against fp32, the reranker's
latency per query in each --rerank-modes (2 cores: say the load); --weights skips the fusion sweep and
--rerank-only skips the first-stage table but the reranked subset's own baseline; and with --replay the result-cache hit rate of recorded query
logs (`serve --query-log`) at several cache sizes.

Prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from retriever_server.app import Retriever, ServeConfig, plan_serving  # noqa: E402
from retriever_server.audit import audit  # noqa: E402
from retriever_server.build import build_index  # noqa: E402
from retriever_server.cache import ResultCache  # noqa: E402
from retriever_server.indexes import configure_threads  # noqa: E402
from retriever_server.rerank import RERANK_MODES  # noqa: E402
from retriever_server.search import Fusion  # noqa: E402

CORPUS = REPO / "data" / "demo" / "corpus.jsonl"
DEV = REPO / "data" / "demo" / "hotpotqa_dev.jsonl"
TRAIN = REPO / "data" / "demo" / "hotpotqa_train.jsonl"
SMOLLM2 = REPO / ".cache" / "models" / "smollm2-135m-instruct"
TOPK = [3, 5]
SWEEP = [(w, round(1 - w, 2)) for w in (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)]


def recall(retriever: Retriever, questions: Path) -> dict[str, float]:
    """recall@3, recall@5 and both-paragraphs@3/@5 over one question file (cache off: fresh every time)."""
    retriever.cache = ResultCache(0)
    report = audit("", [questions], TOPK, retriever=retriever)
    row = {f"recall@{k}": report["recall_at_k"]["overall"][str(k)] for k in TOPK}
    row.update({f"both@{k}": report["all_evidence_at_k"]["overall"][str(k)] for k in TOPK})
    return row


def with_fusion(retriever: Retriever, bm25: float, dense: float) -> Retriever:
    """Set the fusion weights of a hybrid (or chunked hybrid) retriever in place."""
    searcher = getattr(retriever.searcher, "inner", retriever.searcher)
    searcher.fusion = Fusion(bm25_weight=bm25, dense_weight=dense)
    return retriever


def table(rows: list[tuple[str, dict[str, float]]], extra: str = "") -> str:
    head = "| configuration | recall@3 | recall@5 | both@3 | both@5 |" + (f" {extra} |" if extra else "")
    lines = [head, "|---|---:|---:|---:|---:|" + ("---:|" if extra else "")]
    for name, r in rows:
        cells = [f"{r[key]:.3f}" for key in ("recall@3", "recall@5", "both@3", "both@5")]
        if extra:
            cells.append(str(r.get(extra, "")))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def replay(logs: list[Path], sizes: list[int]) -> str:
    """Hit rate of the recorded requests through an LRU result cache of each size."""
    lines = [
        "| query log | requests | queries | repeated within a request | distinct per request | "
        + " | ".join(f"cache hit rate, {s} entries" for s in sizes)
        + " |"
    ]
    lines.append("|---|---:|---:|---:|---:|" + "---:|" * len(sizes))
    for log in logs:
        requests = [json.loads(line) for line in log.read_text("utf-8").splitlines() if line.strip()]
        rates = []
        for size in sizes:
            cache = ResultCache(size)
            for request in requests:  # as the server does: one lookup per distinct (query, topk) of a request
                for query in dict.fromkeys(request["queries"]):
                    key = (query, request["topk"])
                    if cache.get(key) is None:
                        cache.put(key, True)
            rates.append(cache.to_dict()["hit_rate"] or 0.0)
        n = sum(len(r["queries"]) for r in requests)
        per_request = sum(len(set(r["queries"])) for r in requests)
        lines.append(
            f"| {log.name} | {len(requests)} | {n} | {(n - per_request) / n:.1%} | {per_request} | "
            + " | ".join(f"{x:.3f}" for x in rates)
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--index-root", type=Path, default=REPO / "runs" / "bench" / "quality")
    parser.add_argument("--chunk-tokens", type=int, default=64)
    parser.add_argument("--rerank", type=Path, default=SMOLLM2, help="causal LM folder (skipped if absent)")
    parser.add_argument("--rerank-depths", type=int, nargs="+", default=[10, 20])
    parser.add_argument("--rerank-questions", type=int, default=30, help="dev questions reranked (30)")
    parser.add_argument("--rerank-modes", nargs="+", choices=RERANK_MODES, default=["query-likelihood"])
    parser.add_argument(
        "--weights", type=float, nargs=2, default=None, help="fusion weights; skips the sweep"
    )
    parser.add_argument("--rerank-only", action="store_true", help="only the reranked subset's rows")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--replay", type=Path, nargs="*", default=[], help="query logs to replay")
    parser.add_argument("--cache-sizes", type=int, nargs="+", default=[256, 4096])
    args = parser.parse_args()
    load_before = os.getloadavg()
    if args.replay:
        print(replay(args.replay, args.cache_sizes) + "\n")
    configure_threads(args.threads)
    hybrid_dir = args.index_root / "hybrid"
    chunked_dir = args.index_root / f"chunked{args.chunk_tokens}-hybrid"
    started = time.perf_counter()
    build_index(CORPUS, hybrid_dir, encoder="hybrid", threads=args.threads, progress=False)
    build_index(
        CORPUS,
        chunked_dir,
        encoder="hybrid",
        chunk_tokens=args.chunk_tokens,
        threads=args.threads,
        progress=False,
    )
    print(f"- indexes ready in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    hybrid = Retriever.load(plan_serving(ServeConfig(index_dir=hybrid_dir, threads=args.threads)))
    chunked = Retriever.load(plan_serving(ServeConfig(index_dir=chunked_dir, threads=args.threads)))

    if args.weights is None:  # fusion weights, chosen on train
        sweep = []
        for bm25, dense in [(1.0, 0.0), (0.0, 1.0), *SWEEP]:
            sweep.append((f"bm25 {bm25} : dense {dense}", recall(with_fusion(hybrid, bm25, dense), TRAIN)))
        print(f"### Fusion weights on the 400 train questions (RRF k = 60)\n\n{table(sweep)}\n")
        best = max(SWEEP, key=lambda w: sum(dict(sweep)[f"bm25 {w[0]} : dense {w[1]}"].values()))
        print(f"- best on train: bm25 {best[0]} : dense {best[1]}\n")
    else:
        best = tuple(args.weights)

    rows: list[tuple[str, dict[str, Any]]] = []
    precision: list[str] = []
    if not args.rerank_only:
        rows, precision = first_stage(args, hybrid, chunked, hybrid_dir, best)
    rerank_rows(args, hybrid, best, rows)
    print(f"### Evidence recall on the 100 dev questions\n\n{table(rows, 'ms/query')}\n")
    print("\n".join(precision) + "\n")
    load_after = os.getloadavg()
    print(
        f"- load average (1/5/15 min) before: {'/'.join(f'{x:.2f}' for x in load_before)}, "
        f"after: {'/'.join(f'{x:.2f}' for x in load_after)}; {os.cpu_count()} CPUs"
    )


def first_stage(
    args: argparse.Namespace, hybrid: Retriever, chunked: Retriever, hybrid_dir: Path, best: tuple[float, ...]
) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
    """Dev recall of every first-stage configuration, and MiniLM's bf16 against fp32 lines."""
    rows = []
    for name, retriever, weights in (
        ("BM25", hybrid, (1.0, 0.0)),
        ("MiniLM (flat)", hybrid, (0.0, 1.0)),
        (f"hybrid {best[0]}:{best[1]} (best on train)", hybrid, best),
        ("hybrid 0.5:0.5 (equal)", hybrid, (0.5, 0.5)),
        (f"chunked {args.chunk_tokens} BM25", chunked, (1.0, 0.0)),
        (f"chunked {args.chunk_tokens} MiniLM", chunked, (0.0, 1.0)),
        (f"chunked {args.chunk_tokens} hybrid {best[0]}:{best[1]}", chunked, best),
    ):
        rows.append((name, recall(with_fusion(retriever, *weights), DEV)))
        print(f"{name}: {rows[-1][1]}", file=sys.stderr)

    dense_only = Retriever.load(
        plan_serving(
            ServeConfig(index_dir=hybrid_dir / "member-dense", threads=args.threads, encoder_dtype="bf16")
        )
    )
    rows.append(("MiniLM (flat), bf16 query encoder", recall(dense_only, DEV)))
    fp32_dense = Retriever.load(plan_serving(ServeConfig(index_dir=hybrid_dir / "member-dense")))
    precision = []
    for name, questions in (("dev", DEV), ("train", TRAIN)):
        a, b = recall(fp32_dense, questions), recall(dense_only, questions)
        precision.append(
            f"- MiniLM recall@3 on {name}: fp32 query encoder {a['recall@3']:.3f}, bf16 {b['recall@3']:.3f}"
        )
    return rows, precision


def rerank_rows(
    args: argparse.Namespace,
    hybrid: Retriever,
    best: tuple[float, ...],
    rows: list[tuple[str, dict[str, Any]]],
) -> None:
    """Append the reranked subset's baseline and each (mode, depth) row to `rows`."""
    if not args.rerank.is_dir():
        print(
            f"- reranking skipped: no model folder at {args.rerank} (autorefine fetch-model smollm2-135m-instruct)"
        )
        return
    from retriever_server.rerank import load_reranker

    # A 135M judge costs ~1 s per candidate on 2 busy cores: rerank the first N dev questions only, and
    # compare with the first stage on the same N.
    n = args.rerank_questions
    subset = args.index_root / f"dev-first{n}.jsonl"
    subset.write_text("".join(DEV.read_text("utf-8").splitlines(keepends=True)[:n]))
    base = with_fusion(hybrid, *best)
    rows.append((f"hybrid {best[0]}:{best[1]}, first {n} questions", recall(base, subset)))
    for mode in args.rerank_modes:
        judge = load_reranker(str(args.rerank), dtype="bf16", mode=mode)
        for depth in args.rerank_depths:
            base.reranker, base.plan.config.rerank_depth = judge, depth
            judge.seconds = 0.0
            r: dict[str, Any] = recall(base, subset)
            r["ms/query"] = round(1000 * judge.seconds / n)
            rows.append((f"  + SmolLM2 {mode} rerank top-{depth}, first {n} questions", r))
            print(f"{mode} rerank {depth}: {r}", file=sys.stderr, flush=True)
    base.reranker = None


if __name__ == "__main__":
    main()
