"""Predictions (one evaluated question each) and their aggregate metrics."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from autorefine.rollout.trajectory import FinishReason
from autorefine.scoring.metrics import mean_metrics


@dataclass
class Prediction:
    """One evaluated question: the answer, its scores and the trajectory that produced it."""

    id: str
    question: str
    golden_answers: list[str]
    prediction: str | None
    scores: dict[str, float]
    trajectory: dict[str, Any]
    samples: int = 1  # trajectories drawn for this question (> 1 with SC/ESC)
    searches: int = 0  # searches over all of those trajectories
    extra: dict[str, Any] = field(default_factory=dict)

    def to_row(self) -> dict[str, Any]:
        """JSON-ready row for predictions.jsonl."""
        return asdict(self)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Prediction:
        """The prediction a `to_row` row (plus any extra keys, which are ignored) describes."""
        return cls(**{f.name: row[f.name] for f in fields(cls) if f.name in row})


def aggregate(predictions: Iterable[Prediction]) -> dict[str, float]:
    """Mean of every averaged metric over predictions, with finish-reason rates and refine-to-documents
    compression; self-consistency runs add samples per question, the saving against the budget and the
    early-stop rate."""
    preds = list(predictions)
    if not preds:
        return {"count": 0}
    n = len(preds)
    out: dict[str, float] = {"count": float(n)}
    for metric in mean_metrics():
        out[metric.name] = sum(p.scores.get(metric.name, 0.0) for p in preds) / n
    out["samples"] = sum(p.samples for p in preds) / n
    # Self-consistency predictions carry their budget L; the saving is what early stopping left undrawn.
    voted = [p for p in preds if "max_samples" in p.extra]
    if voted:
        out["saving"] = sum(1 - p.samples / p.extra["max_samples"] for p in voted) / len(voted)
        out["early_stop"] = sum(bool(p.extra.get("stopped_early")) for p in voted) / len(voted)
    doc_words = sum(p.scores.get("document_words", 0.0) for p in preds)
    refine_words = sum(p.scores.get("refine_words", 0.0) for p in preds)
    out["compression"] = doc_words / refine_words if refine_words else 0.0
    reasons = Counter(p.trajectory.get("finish_reason") for p in preds)
    for reason in FinishReason:
        out[f"finish_{reason.value}"] = reasons.get(reason.value, 0) / n
    return out
