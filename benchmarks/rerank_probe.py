"""Query-likelihood rerank of the hybrid's top 10 and 20, alone and RRF-fused with the first-stage rank.

    python benchmarks/rerank_probe.py [--questions 100] [--index-root runs/bench/quality] [--threads 1]

Each (question, candidate) pair is scored once (the top 10 are among the top 20), so one pass over the
top 20 gives every row. Needs the hybrid index that benchmarks/retrieval_quality.py builds and the
SmolLM2 folder. Fused score: w_first / (60 + first-stage rank) + w_ql / (60 + query-likelihood rank).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import retrieval_quality as rq

from retriever_server.app import Retriever, ServeConfig, plan_serving
from retriever_server.indexes import configure_threads
from retriever_server.rerank import load_reranker

WEIGHTS = [(0.0, 1.0), (0.5, 0.5), (0.7, 0.3), (0.3, 0.7)]


class FusedQL:
    """A reranker that fuses the first-stage order with cached query-likelihood scores."""

    score_kind = "probe"
    seconds = 0.0

    def __init__(self, judge: Any, cache: dict, weights: tuple[float, float], depth: int) -> None:
        self.judge, self.cache, self.weights, self.depth = judge, cache, weights, depth

    def rerank(self, queries: list[str], candidates: list[list[Any]]) -> list[list[Any]]:
        """Each query's top `depth` candidates in fused order."""
        todo = [(q, d) for q, hits in zip(queries, candidates, strict=True) for _, d in hits[: self.depth]]
        todo = [(q, d) for q, d in todo if (q, d["id"]) not in self.cache]
        scores = self.judge.score([(q, d["contents"]) for q, d in todo]) if todo else []
        self.cache.update({(q, d["id"]): s for (q, d), s in zip(todo, scores, strict=True)})
        out = []
        for q, hits in zip(queries, candidates, strict=True):
            docs = [d for _, d in hits[: self.depth]]
            ql = sorted(range(len(docs)), key=lambda i: -self.cache[(q, docs[i]["id"])])
            ql_rank = {i: r for r, i in enumerate(ql)}
            w_first, w_ql = self.weights
            fused = [(w_first / (61 + i) + w_ql / (61 + ql_rank[i]), d) for i, d in enumerate(docs)]
            out.append(sorted(fused, key=lambda hit: -hit[0]))
        return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--questions", type=int, default=100)
    parser.add_argument("--index-root", type=Path, default=rq.REPO / "runs" / "bench" / "quality")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    configure_threads(args.threads)
    config = ServeConfig(index_dir=args.index_root / "hybrid", threads=args.threads, rerank_depth=20)
    hybrid = rq.with_fusion(Retriever.load(plan_serving(config)), 0.3, 0.7)
    judge = load_reranker(str(rq.SMOLLM2), dtype="bf16")
    subset = args.index_root / f"dev-first{args.questions}.jsonl"
    subset.write_text("".join(rq.DEV.read_text("utf-8").splitlines(keepends=True)[: args.questions]))
    rows = [(f"hybrid 0.3:0.7, first {args.questions} dev questions", rq.recall(hybrid, subset))]
    cache: dict = {}
    for depth in (20, 10):
        for weights in WEIGHTS:
            hybrid.reranker = FusedQL(judge, cache, weights, depth)
            name = f"  + QL top-{depth}" + (
                "" if weights[0] == 0 else f", RRF first:QL {weights[0]}:{weights[1]}"
            )
            rows.append((name, rq.recall(hybrid, subset)))
            print(name, rows[-1][1], file=sys.stderr, flush=True)
    print(rq.table(rows))
    print(
        f"\n- {len(cache)} pairs scored in {judge.seconds:.0f} s ({judge.seconds / len(cache):.2f} s per pair)"
    )


if __name__ == "__main__":
    main()
