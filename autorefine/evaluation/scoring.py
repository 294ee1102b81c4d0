"""Turning trajectories into scored predictions, and predictions into aggregate metrics."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from autorefine.data import Question
from autorefine.process_score import LexicalMatcher, score_trajectories
from autorefine.rewards import RewardConfig, contains_answer, trajectory_reward
from autorefine.rollout.trajectory import FinishReason, Trajectory


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


def score_trajectory(
    trajectory: Trajectory, golds: Sequence[str], config: RewardConfig = RewardConfig()
) -> dict[str, float]:
    """Reward components plus retrieval success and token counts of one trajectory."""
    scores = trajectory_reward(trajectory, golds, config).as_dict()
    scores["retrieval_success"] = contains_answer([trajectory.documents_text], golds)
    scores["searches"] = float(trajectory.num_searches)
    scores["model_tokens"] = float(trajectory.num_model_tokens)
    scores["document_tokens"] = float(trajectory.tokens_of("documents"))
    # Words, not tokens: refine blocks sit inside model segments, and words compare across tokenizers.
    scores["refine_words"] = float(sum(len(text.split()) for text in trajectory.refine_texts))
    scores["document_words"] = float(len(trajectory.documents_text.split()))
    return scores


def process_scores(
    trajectories: Sequence[Trajectory], questions: Sequence[Question], config: RewardConfig = RewardConfig()
) -> list[dict[str, float]]:
    """Process score and evidence coverage of each trajectory (lexical matcher: deterministic, no model)."""
    scored = score_trajectories(trajectories, questions, LexicalMatcher(), config)
    return [{"process": s.process, "coverage": s.coverage} for s in scored]


def aggregate(predictions: Iterable[Prediction]) -> dict[str, float]:
    """Mean metrics over predictions, with finish-reason rates and refine-to-documents compression."""
    preds = list(predictions)
    if not preds:
        return {"count": 0}
    n = len(preds)
    keys = [
        "reward",
        "em",
        "f1",
        "cover_em",
        "refine_hit",
        "format",
        "process",
        "retrieval_success",
        "model_tokens",
        "document_tokens",
    ]
    out: dict[str, float] = {"count": float(n)}
    for key in keys:
        out[key] = sum(p.scores.get(key, 0.0) for p in preds) / n
    out["searches"] = sum(p.searches for p in preds) / n
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
