"""Worked example: a retrieval backend on the trainer's side — any object with `search(queries, topk)`.

The agent loop talks to a `Searcher` (`autorefine.rollout.agent.Searcher`); `RetrieverClient` (HTTP, any
Search-R1-style server) is the one autorefine ships. This one keeps a few passages in memory and ranks them by
shared words, which is enough for a unit test or a toy task.
"""

from __future__ import annotations

from autorefine.protocol import Document
from autorefine.scoring.answers import normalize_answer


class MemorySearcher:
    """Ranks in-memory passages (FlashRAG `contents`: title line, then text) by words shared with the query."""

    def __init__(self, passages: dict[str, str]) -> None:
        self.passages = passages
        self.words = {pid: set(normalize_answer(text).split()) for pid, text in passages.items()}

    def search(self, queries: list[str], topk: int = 3) -> list[list[Document]]:
        """Top-k documents per query, most shared words first (ties: passage order)."""
        out = []
        for query in queries:
            wanted = set(normalize_answer(query).split())
            ranked = sorted(self.passages, key=lambda pid: -len(wanted & self.words[pid]))[:topk]
            out.append(
                [Document(pid, self.passages[pid], float(len(wanted & self.words[pid]))) for pid in ranked]
            )
        return out
