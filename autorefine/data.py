"""Question files in FlashRAG format (`{"id", "question", "golden_answers", "metadata"}`), and the training mix.

Every reader here fails on bad input with the file, the line and the id, rather than training on it.

A row may carry gold evidence in `metadata.evidence`: a list of `{"title", "text", "answer"?}` items, the
passages or facts a complete solution needs (the process score of IP-DPO matches trajectories against them).
Readers that know a dataset's own layout fill it in: HotpotQA and 2WikiMultihopQA supporting facts, MuSiQue
question decompositions; NQ, TriviaQA and PopQA have none (an empty list). A row without evidence is scored
with the no-evidence fallback (F1 / searches, see `autorefine.scoring.process`).
"""

from __future__ import annotations

import datetime as dt
import json
import random
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from autorefine.files import atomic_open, file_sha256

# FlashRAG ships these splits; evaluation prefers test and falls back to dev.
FLASHRAG_HUB_DATASET = "RUC-NLPIR/FlashRAG_datasets"
DEFAULT_TRAINING_MIX = ("nq", "hotpotqa")


class DataError(ValueError):
    """A question file is malformed; the message names the file, the line and (when known) the id."""


@dataclass(frozen=True)
class DifficultyFilterSettings:
    """GRPO trains only on questions the starting policy sometimes solves (`data.difficulty_filter`).

    Before training, each training question is sampled `samples` times with the starting policy; a sample
    succeeds when its reward is at least `success_reward`; a question is kept when its success rate lies
    strictly between `low` and `high` (default: solved sometimes, not always — a group whose rewards are all
    equal teaches nothing). See autorefine/training/grpo/difficulty.py.
    """

    enabled: bool = False
    samples: int = 8  # K trajectories per question, at the trainer's sampling temperature
    low: float = 0.0  # keep questions whose success rate is > low ...
    high: float = 1.0  # ... and < high
    success_reward: float = 0.5
    batch_questions: int = 8  # questions per sampling batch (× samples trajectories); the resume unit
    refilter_every: int = (
        0  # every N optimizer steps, drop questions whose latest group left the band; 0: never
    )

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError(f"difficulty_filter.samples must be >= 1, got {self.samples}")
        if not 0.0 <= self.low < self.high <= 1.0:
            raise ValueError(
                f"difficulty_filter needs 0 <= low < high <= 1 (the kept band of success rates), "
                f"got low={self.low}, high={self.high}"
            )
        if self.batch_questions < 1:
            raise ValueError(f"difficulty_filter.batch_questions must be >= 1, got {self.batch_questions}")
        if self.refilter_every < 0:
            raise ValueError(f"difficulty_filter.refilter_every must be >= 0, got {self.refilter_every}")

    def keeps(self, rate: float) -> bool:
        """Whether a question with this success rate is trained on."""
        return self.low < rate < self.high


@dataclass(frozen=True)
class DataSettings:
    """Training questions in FlashRAG format (`id`, `question`, `golden_answers`): the `data` section."""

    train_file: str = "data/prepared/train.jsonl"
    difficulty_filter: DifficultyFilterSettings = field(default_factory=DifficultyFilterSettings)


@dataclass(frozen=True)
class Evidence:
    """One gold evidence item: a passage (or the sentences of it that matter) and, optionally, what it answers."""

    title: str
    text: str
    answer: str | None = None  # e.g. a MuSiQue sub-answer, or the bridge entity of a two-hop question

    def to_dict(self) -> dict[str, str]:
        """The JSON form stored in `metadata.evidence` (no `answer` key when there is none)."""
        row = {"title": self.title, "text": self.text}
        return row if self.answer is None else {**row, "answer": self.answer}


@dataclass(frozen=True)
class Question:
    """One QA example."""

    id: str
    question: str
    golden_answers: list[str]
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_row(self) -> dict[str, Any]:
        """JSON-ready row in FlashRAG format."""
        row = asdict(self)
        if not self.metadata:
            row.pop("metadata")
        return row


def parse_question(raw: Any, where: str, source: str | None = None) -> Question:
    """Validate one decoded row; `where` (file:line) goes into every error message.

    With a known `source` dataset (see `source_evidence`) and no `metadata.evidence` yet, the evidence is
    built from the source's own metadata layout.
    """
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    qid = raw.get("id")
    if not isinstance(qid, str | int) or isinstance(qid, bool) or str(qid) == "":
        raise DataError(f"{where}: row has no usable 'id' (got {qid!r})")
    label = f"{where} (id {qid})"
    question = raw.get("question")
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{label}: 'question' must be a non-empty string")
    answers = raw.get("golden_answers")
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not answers:
        raise DataError(f"{label}: row has no gold answers ('golden_answers' must be a non-empty list)")
    if not all(isinstance(a, str) and a.strip() for a in answers):
        raise DataError(f"{label}: every gold answer must be a non-empty string, got {answers!r}")
    metadata = raw.get("metadata")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise DataError(f"{label}: 'metadata' must be an object, got {type(metadata).__name__}")
    if "evidence" in metadata:
        _check_evidence(metadata["evidence"], label)
    elif source is not None and (evidence := source_evidence(source, metadata, label)) is not None:
        metadata = {**metadata, "evidence": evidence}
    return Question(str(qid), question, list(answers), metadata)


_EVIDENCE_KEYS = {"title", "text", "answer"}


def _check_evidence(evidence: Any, label: str) -> None:
    if not isinstance(evidence, list):
        raise DataError(f"{label}: 'metadata.evidence' must be a list, got {type(evidence).__name__}")
    for i, item in enumerate(evidence):
        where = f"{label}: metadata.evidence[{i}]"
        if not isinstance(item, dict):
            raise DataError(f"{where} must be an object with 'title' and 'text', got {type(item).__name__}")
        if unknown := sorted(set(item) - _EVIDENCE_KEYS):
            raise DataError(f"{where} has unknown keys {unknown} (allowed: title, text, answer)")
        if not isinstance(item.get("title"), str):
            raise DataError(f"{where}: 'title' must be a string, got {item.get('title')!r}")
        if not isinstance(item.get("text"), str) or not item["text"].strip():
            raise DataError(f"{where}: 'text' must be a non-empty string, got {item.get('text')!r}")
        if item.get("answer") is not None and not isinstance(item["answer"], str):
            raise DataError(f"{where}: 'answer' must be a string or null, got {item['answer']!r}")


def question_evidence(question: Question) -> list[Evidence]:
    """The gold evidence of a question (validated when it was read); [] when it has none."""
    return [
        Evidence(item["title"], item["text"], item.get("answer"))
        for item in question.metadata.get("evidence") or []
    ]


# Evidence from each source's own metadata layout. FlashRAG keeps the original fields in `metadata`, column-wise
# where it converted from a Hugging Face dataset (`{"title": [...], "sent_id": [...]}`) and row-wise where it
# copied the original JSON (`[[title, sent_id], ...]`, `[{"idx": ..., ...}, ...]`); both are read.
NO_EVIDENCE_SOURCES = ("nq", "triviaqa", "popqa")


def _records(value: Any, name: str, keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """Rows of `value`, given as a list of objects, a list of tuples in `keys` order, or columns of equal length."""
    if isinstance(value, dict):
        present = [key for key in value if key in keys]
        columns = [value[key] for key in present]
        if not present or not all(isinstance(c, list) for c in columns) or len({len(c) for c in columns}) > 1:
            raise ValueError(f"'{name}' columns {list(keys)} must be lists of equal length")
        return [dict(zip(present, row, strict=True)) for row in zip(*columns, strict=True)]
    if not isinstance(value, list):
        raise ValueError(f"'{name}' must be a list or an object of columns, got {type(value).__name__}")
    rows = []
    for item in value:
        if isinstance(item, dict):
            rows.append(item)
        elif isinstance(item, list | tuple) and len(item) >= 2:
            rows.append(dict(zip(keys, item, strict=False)))
        else:
            raise ValueError(
                f"'{name}' has an entry that is neither an object nor a {list(keys)} list: {item!r}"
            )
    return rows


def supporting_facts_evidence(metadata: dict[str, Any]) -> list[Evidence]:
    """HotpotQA / 2WikiMultihopQA: one item per supporting title, its supporting sentences in source order.

    Sentence ids past a paragraph's end (a known quirk of a few HotpotQA rows) and titles missing from the
    row's `context` are left out. A 2Wiki evidence triple whose subject is the title gives the item's answer.
    """
    facts = metadata.get("supporting_facts")
    if facts is None:
        return []
    context: dict[str, list[str]] = {}
    # HotpotQA names a paragraph's sentences `sentences`, 2Wiki `content`.
    for row in _records(metadata.get("context") or [], "context", ("title", "sentences", "content")):
        sentences = row.get("sentences", row.get("content"))
        if not isinstance(row.get("title"), str) or not isinstance(sentences, list):
            raise ValueError(f"'context' entry is not a title with a list of sentences: {row!r}")
        context.setdefault(row["title"], [str(sentence) for sentence in sentences])
    chosen: dict[str, list[int]] = {}
    for fact in _records(facts, "supporting_facts", ("title", "sent_id")):
        title, sent_id = fact.get("title"), fact.get("sent_id")
        if not isinstance(title, str) or not isinstance(sent_id, int) or isinstance(sent_id, bool):
            raise ValueError(f"'supporting_facts' entry is not a (title, sentence id) pair: {fact!r}")
        ids = chosen.setdefault(title, [])
        if sent_id not in ids:
            ids.append(sent_id)
    answers = {}
    for triple in metadata.get("evidences") or []:
        if isinstance(triple, list | tuple) and len(triple) == 3 and all(isinstance(t, str) for t in triple):
            answers.setdefault(triple[0].strip().lower(), triple[2])
    out = []
    for title, ids in chosen.items():
        sentences = context.get(title, [])
        text = " ".join(sentences[i].strip() for i in sorted(ids) if 0 <= i < len(sentences)).strip()
        if text:
            out.append(Evidence(title, text, answers.get(title.strip().lower())))
    return out


def musique_evidence(metadata: dict[str, Any]) -> list[Evidence]:
    """MuSiQue: the supporting paragraph of each decomposition step with its sub-answer, then other supporting ones."""
    paragraphs = _records(
        metadata.get("paragraphs") or [], "paragraphs", ("idx", "title", "paragraph_text", "is_supporting")
    )
    by_idx = {p.get("idx", i): p for i, p in enumerate(paragraphs)}
    out, used = [], set()
    steps = _records(
        metadata.get("question_decomposition") or [],
        "question_decomposition",
        ("id", "question", "answer", "paragraph_support_idx"),
    )
    for step in steps:
        idx = step.get("paragraph_support_idx")
        if idx is None:  # unanswerable MuSiQue-Full steps point at no paragraph
            continue
        if idx not in by_idx:
            raise ValueError(f"'question_decomposition' points at paragraph {idx!r}, which the row lacks")
        answer = step.get("answer")
        out.append(_paragraph_evidence(by_idx[idx], answer if isinstance(answer, str) and answer else None))
        used.add(idx)
    for idx, paragraph in by_idx.items():
        if paragraph.get("is_supporting") and idx not in used:
            out.append(_paragraph_evidence(paragraph, None))
    return out


def _paragraph_evidence(paragraph: dict[str, Any], answer: str | None) -> Evidence:
    title, text = paragraph.get("title"), paragraph.get("paragraph_text")
    if not isinstance(title, str) or not isinstance(text, str) or not text.strip():
        raise ValueError(f"paragraph {paragraph.get('idx')!r} has no title and text")
    return Evidence(title, text.strip(), answer)


EVIDENCE_CONVERTERS = {
    "hotpotqa": supporting_facts_evidence,
    "2wikimultihopqa": supporting_facts_evidence,
    "musique": musique_evidence,
}


def source_evidence(source: str, metadata: dict[str, Any], label: str) -> list[dict[str, str]] | None:
    """`metadata.evidence` for a row of a known source dataset ([] for NQ/TriviaQA/PopQA); None for others."""
    if source in NO_EVIDENCE_SOURCES:
        return []
    converter = EVIDENCE_CONVERTERS.get(source)
    if converter is None:
        return None
    try:
        return [item.to_dict() for item in converter(metadata)]
    except ValueError as err:
        raise DataError(f"{label}: cannot read the {source} evidence in 'metadata': {err}") from None


def iter_questions(path: str | Path, source: str | None = None) -> Iterator[Question]:
    """Stream a JSONL question file, checking every line and rejecting duplicate ids (`source`: see parse_question)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"question file not found: {path}")
    seen: set[str] = set()
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
            question = parse_question(raw, where, source)
            if question.id in seen:
                raise DataError(f"{where}: duplicate id {question.id!r}")
            seen.add(question.id)
            yield question


def read_questions(path: str | Path, limit: int | None = None, source: str | None = None) -> list[Question]:
    """All questions of a file (or its first `limit`); `source` names the dataset for evidence conversion."""
    out = []
    for question in iter_questions(path, source):
        if limit is not None and len(out) >= limit:
            break
        out.append(question)
    return out


def write_questions(path: str | Path, questions: Iterable[Question]) -> int:
    """Write questions as JSONL; returns how many."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as f:
        for q in questions:
            f.write(json.dumps(q.to_row(), ensure_ascii=False) + "\n")
            count += 1
    return count


def split_file_candidates(
    data_dir: Path, dataset: str, splits: tuple[str, ...], *, unsplit: bool = False
) -> list[Path]:
    """Where `find_split_file` looks, in order of preference (`unsplit` adds `<dir>/<dataset>.jsonl` last)."""
    found = [
        candidate
        for split in splits
        for candidate in (data_dir / dataset / f"{split}.jsonl", data_dir / f"{dataset}_{split}.jsonl")
    ]
    # A flat `<dir>/<dataset>.jsonl` names no split, so only callers that know it holds evaluation data
    # (the demo benchmarks) accept it; training must never pick up a test file by accident.
    return [*found, data_dir / f"{dataset}.jsonl"] if unsplit else found


def find_split_file(
    data_dir: Path, dataset: str, splits: tuple[str, ...], *, unsplit: bool = False
) -> Path | None:
    """First existing file of `<dir>/<dataset>/<split>.jsonl`, `<dir>/<dataset>_<split>.jsonl` (per split), or None."""
    return next(
        (p for p in split_file_candidates(data_dir, dataset, splits, unsplit=unsplit) if p.is_file()), None
    )


def load_hub_split(dataset: str, split: str, cache_dir: Path) -> Path:
    """Download one FlashRAG split from the Hugging Face hub into a local JSONL file (needs a network)."""
    from datasets import load_dataset

    out = cache_dir / dataset / f"{split}.jsonl"
    if out.is_file() and _has_metadata(out):
        return out
    try:
        rows = load_dataset(FLASHRAG_HUB_DATASET, dataset, split=split)
    except Exception as err:
        raise DataError(
            f"could not load {dataset}/{split} from the hub ({FLASHRAG_HUB_DATASET}): {err}. "
            "Without a network, download FlashRAG files elsewhere and pass --data-dir."
        ) from err
    with atomic_open(out) as f:  # an interrupted download never leaves a file that looks complete
        for number, row in enumerate(rows, start=1):
            raw = {k: row.get(k) for k in ("id", "question", "golden_answers", "metadata")}
            question = parse_question(raw, f"{FLASHRAG_HUB_DATASET}/{dataset}/{split} row {number}", dataset)
            f.write(
                json.dumps({**question.to_row(), "metadata": question.metadata}, ensure_ascii=False) + "\n"
            )
    return out


def _has_metadata(path: Path) -> bool:
    # Files cached before metadata was kept lack it on every row; they are downloaded again.
    with path.open(encoding="utf-8") as f:
        first = f.readline()
    try:
        return "metadata" in json.loads(first)
    except json.JSONDecodeError:
        return False


def prepare_training_mix(
    sources: dict[str, Path],
    out_dir: Path,
    *,
    val_size: int,
    seed: int = 0,
    limit_per_source: int | None = None,
) -> dict[str, Any]:
    """Mix, shuffle and id-prefix training files; carve the validation split from the training rows only."""
    mixed: list[Question] = []
    provenance_sources = []
    for name, path in sources.items():
        rows = read_questions(path, limit=limit_per_source, source=name)
        # A dataset prefix makes ids unique across sources, so GRPO groups and logs never mix two questions.
        mixed += [
            Question(f"{name}-{q.id}", q.question, q.golden_answers, {**q.metadata, "source": name})
            for q in rows
        ]
        provenance_sources.append(
            {"name": name, "path": str(path), "sha256": file_sha256(path), "rows_used": len(rows)}
        )
    if val_size >= len(mixed):
        raise DataError(f"val_size={val_size} leaves no training rows (only {len(mixed)} rows in total)")
    random.Random(seed).shuffle(mixed)
    val, train = mixed[:val_size], mixed[val_size:]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_questions(out_dir / "train.jsonl", train)
    write_questions(out_dir / "val.jsonl", val)
    provenance = {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "seed": seed,
        "sources": provenance_sources,
        "train_rows": len(train),
        "val_rows": len(val),
        "val_from": "training rows (never a test split)",
    }
    (out_dir / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    return provenance
