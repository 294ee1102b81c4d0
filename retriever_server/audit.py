"""Corpus audit: is each question's gold evidence in the corpus, and does the index find it in the top k?

Questions are FlashRAG JSONL rows carrying `metadata.evidence`, a list of `{"title", "text"}` passages. An
evidence passage is in the corpus *exactly* when a passage has the same title and text, and as a
*near duplicate* when the title and the text are equal after normalization (case, punctuation and
whitespace ignored) or, under the same title, the texts share ≥ 90% of their words. `add_evidence` writes a
corpus with the missing passages appended, each marked with where it came from.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autorefine.files import atomic_open
from retriever_server.corpus import iter_passages

NEAR_WORD_OVERLAP = 0.9
_NON_WORD = re.compile(r"[\W_]+")


class AuditError(ValueError):
    """Questions or a corpus that cannot be audited or extended as asked."""


def normalize(text: str) -> str:
    """Lowercased words of `text` without accents, punctuation or extra whitespace."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c))
    return " ".join(_NON_WORD.sub(" ", text.lower()).split())


def split_contents(contents: str) -> tuple[str, str]:
    """`"Title"\\ntext` → (Title, text); contents without a title line → ("", contents)."""
    first, _, rest = contents.partition("\n")
    if not rest:
        return "", contents
    title = first[1:-1] if len(first) >= 2 and first[0] == first[-1] == '"' else first
    return title, rest


@dataclass
class Question:
    """A question with its gold evidence and the dataset it belongs to."""

    id: str
    question: str
    dataset: str
    evidence: list[dict[str, str]]
    source: str = ""


def dataset_of(row: dict[str, Any], fallback: str) -> str:
    """The row's `dataset` field, else its id's prefix (`hotpotqa-5a7…` → hotpotqa), else `fallback`."""
    if isinstance(row.get("dataset"), str):
        return row["dataset"]
    prefix, sep, _ = str(row.get("id", "")).partition("-")
    return prefix if sep and prefix.isalpha() else fallback


def load_questions(paths: Iterable[str | os.PathLike[str]]) -> list[Question]:
    """Questions of every file; a file with no `metadata.evidence` at all is refused, naming it."""
    questions: list[Question] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise AuditError(f"questions file not found: {path}")
        found = []
        for lineno, line in enumerate(path.read_text("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                raise AuditError(f"{path}:{lineno}: not valid JSON ({err})") from None
            evidence = (row.get("metadata") or {}).get("evidence") or []
            for item in evidence:
                if not isinstance(item, dict) or not isinstance(item.get("text"), str):
                    raise AuditError(f"{path}:{lineno}: each metadata.evidence item needs a 'text' string")
            found.append(
                Question(
                    id=str(row.get("id", f"{path.stem}-{lineno}")),
                    question=str(row.get("question", "")),
                    dataset=dataset_of(row, path.stem),
                    evidence=[{"title": str(e.get("title", "")), "text": e["text"]} for e in evidence],
                    source=str(path),
                )
            )
        if not any(q.evidence for q in found):
            raise AuditError(
                f"{path} carries no evidence: its questions have no metadata.evidence "
                "(a list of {title, text} passages), so there is nothing to look for"
            )
        questions.extend(q for q in found if q.evidence)
    return questions


class CorpusMatcher:
    """Finds a passage of the corpus equal, or nearly equal, to an evidence passage."""

    def __init__(self, passages: Iterable[tuple[str, str]]) -> None:
        self.ids: set[str] = set()
        self.exact: dict[tuple[str, str], str] = {}
        self.near: dict[tuple[str, str], str] = {}
        self.by_title: dict[str, list[tuple[set[str], str]]] = {}
        for doc_id, contents in passages:
            self.add(doc_id, *split_contents(contents))

    def add(self, doc_id: str, title: str, text: str) -> None:
        """Index one passage (the first of duplicates wins)."""
        self.ids.add(doc_id)
        self.exact.setdefault((title, text), doc_id)
        key = (normalize(title), normalize(text))
        self.near.setdefault(key, doc_id)
        self.by_title.setdefault(key[0], []).append((set(key[1].split()), doc_id))

    def match(self, title: str, text: str) -> tuple[str | None, str]:
        """(passage id, "exact" | "near_duplicate") or (None, "missing")."""
        if (title, text) in self.exact:
            return self.exact[(title, text)], "exact"
        key = (normalize(title), normalize(text))
        if key in self.near:
            return self.near[key], "near_duplicate"
        words = set(key[1].split())
        for other, doc_id in self.by_title.get(key[0], []):
            union = words | other
            if union and len(words & other) / len(union) >= NEAR_WORD_OVERLAP:
                return doc_id, "near_duplicate"
        return None, "missing"


def audit(
    index_dir: str | os.PathLike[str],
    question_files: list[str | os.PathLike[str]],
    topk: list[int],
    *,
    corpus: str | os.PathLike[str] | None = None,
    retriever: Any | None = None,
) -> dict[str, Any]:
    """Evidence in the corpus and evidence recall@k through the index, per dataset and overall."""
    from retriever_server.app import Retriever, ServeConfig, plan_serving

    if not topk or min(topk) <= 0:
        raise AuditError(f"--topk must be positive integers, got {topk}")
    questions = load_questions(question_files)
    if retriever is None:
        plan = plan_serving(
            ServeConfig(
                index_dir=Path(index_dir), corpus=Path(corpus) if corpus else None, max_topk=max(topk)
            )
        )
        retriever = Retriever.load(plan)
    matcher = CorpusMatcher(iter_passages(retriever.plan.corpus))
    hits = retriever.process([([q.question for q in questions], max(topk))])[0]
    groups: dict[str, dict[str, Any]] = {}
    for question, found in zip(questions, hits, strict=True):
        ranked = [doc["id"] for _, doc in found]
        for name in ("overall", question.dataset):
            g = groups.setdefault(
                name,
                {
                    "questions": 0,
                    "evidence": 0,
                    "exact": 0,
                    "near_duplicate": 0,
                    "missing": 0,
                    **{f"hit@{k}": 0 for k in topk},
                    **{f"all@{k}": 0 for k in topk},
                },
            )
            g["questions"] += 1
            rows = []
            for item in question.evidence:
                doc_id, how = matcher.match(item["title"], item["text"])
                g["evidence"] += 1
                g[how] += 1
                rows.append(ranked.index(doc_id) if doc_id in ranked else None)
            for k in topk:
                found_k = [r is not None and r < k for r in rows]
                g[f"hit@{k}"] += sum(found_k)
                g[f"all@{k}"] += all(found_k)
    report: dict[str, Any] = {
        "index": str(index_dir),
        "questions_files": [str(p) for p in question_files],
        "topk": sorted(topk),
        "evidence_in_corpus": {},
        "recall_at_k": {},
        "all_evidence_at_k": {},
    }
    for name, g in groups.items():
        n = g["evidence"]
        report["evidence_in_corpus"][name] = {
            "questions": g["questions"],
            "evidence": n,
            "exact": g["exact"],
            "near_duplicate": g["near_duplicate"],
            "missing": g["missing"],
            "fraction": round((g["exact"] + g["near_duplicate"]) / n, 4),
        }
        report["recall_at_k"][name] = {str(k): round(g[f"hit@{k}"] / n, 4) for k in sorted(topk)}
        report["all_evidence_at_k"][name] = {
            str(k): round(g[f"all@{k}"] / g["questions"], 4) for k in sorted(topk)
        }
    return report


def render_table(report: dict[str, Any]) -> str:
    """The report as a Markdown table, one row per dataset and one overall."""
    ks = report["topk"]
    header = "| dataset | questions | evidence | exact | near-dup | missing | in corpus | " + " | ".join(
        f"recall@{k} | all@{k}" for k in ks
    )
    lines = [header + " |", "|" + "---|" * (7 + 2 * len(ks))]
    names = [*sorted(n for n in report["evidence_in_corpus"] if n != "overall"), "overall"]
    for name in names:
        c = report["evidence_in_corpus"][name]
        cells = [
            name,
            c["questions"],
            c["evidence"],
            c["exact"],
            c["near_duplicate"],
            c["missing"],
            f"{c['fraction']:.1%}",
        ]
        for k in ks:
            cells += [
                f"{report['recall_at_k'][name][str(k)]:.3f}",
                f"{report['all_evidence_at_k'][name][str(k)]:.3f}",
            ]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def add_evidence(
    corpus: str | os.PathLike[str], question_files: list[str | os.PathLike[str]], out: str | os.PathLike[str]
) -> tuple[Path, int]:
    """Write `out`: the corpus, then every evidence passage it lacks (with provenance); return (path, added)."""
    corpus, out = Path(corpus), Path(out)
    questions = load_questions(question_files)
    matcher = CorpusMatcher(iter_passages(corpus))
    if len(matcher.ids) < sum(1 for _ in iter_passages(corpus)):
        raise AuditError(f"{corpus} holds duplicated passage ids: added evidence could not be told apart")
    added: list[str] = []
    for question in questions:
        for j, item in enumerate(question.evidence):
            doc_id, _ = matcher.match(item["title"], item["text"])
            if doc_id is not None:
                continue  # present, or added already for an earlier question
            new_id = f"evidence:{question.id}:{j}"
            if new_id in matcher.ids:
                raise AuditError(
                    f"added evidence id {new_id!r} is already a passage id of {corpus}; "
                    "rename that passage or the question id"
                )
            matcher.add(new_id, item["title"], item["text"])
            row = {
                "id": new_id,
                "title": item["title"],
                "text": item["text"],
                "provenance": {
                    "added_evidence": True,
                    "questions_file": question.source,
                    "question_id": question.id,
                    "evidence_index": j,
                },
            }
            added.append(json.dumps(row, ensure_ascii=False))
    out.parent.mkdir(parents=True, exist_ok=True)
    data = corpus.read_bytes()
    with atomic_open(out, "wb") as fh:
        fh.write(data)
        if data and not data.endswith(b"\n"):
            fh.write(b"\n")
        fh.write("".join(f"{line}\n" for line in added).encode("utf-8"))
    return out, len(added)
