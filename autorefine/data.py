"""Question files in FlashRAG format (`{"id", "question", "golden_answers"}`), and the training mix.

Every reader here fails on bad input with the file, the line and the id, rather than training on it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import random
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# FlashRAG ships these splits; evaluation prefers test and falls back to dev.
FLASHRAG_HUB_DATASET = "RUC-NLPIR/FlashRAG_datasets"
DEFAULT_TRAINING_MIX = ("nq", "hotpotqa")


class DataError(ValueError):
    """A question file is malformed; the message names the file, the line and (when known) the id."""


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


def parse_question(raw: Any, where: str) -> Question:
    """Validate one decoded row; `where` (file:line) goes into every error message."""
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
    metadata = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
    return Question(str(qid), question, list(answers), metadata)


def iter_questions(path: str | Path) -> Iterator[Question]:
    """Stream a JSONL question file, checking every line and rejecting duplicate ids."""
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
            question = parse_question(raw, where)
            if question.id in seen:
                raise DataError(f"{where}: duplicate id {question.id!r}")
            seen.add(question.id)
            yield question


def read_questions(path: str | Path, limit: int | None = None) -> list[Question]:
    """All questions of a file (or its first `limit`)."""
    out = []
    for question in iter_questions(path):
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
    if out.is_file():
        return out
    try:
        rows = load_dataset(FLASHRAG_HUB_DATASET, dataset, split=split)
    except Exception as err:
        raise DataError(
            f"could not load {dataset}/{split} from the hub ({FLASHRAG_HUB_DATASET}): {err}. "
            "Without a network, download FlashRAG files elsewhere and pass --data-dir."
        ) from err
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(
                json.dumps({k: row[k] for k in ("id", "question", "golden_answers")}, ensure_ascii=False)
                + "\n"
            )
    return out


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
        rows = read_questions(path, limit=limit_per_source)
        # A dataset prefix makes ids unique across sources, so GRPO groups and logs never mix two questions.
        mixed += [
            Question(f"{name}-{q.id}", q.question, q.golden_answers, {**q.metadata, "source": name})
            for q in rows
        ]
        provenance_sources.append(
            {"name": name, "path": str(path), "sha256": _sha256(path), "rows_used": len(rows)}
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
