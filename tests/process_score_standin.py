"""A minimal stand-in for `autorefine.process_score` until the real module lands on main (tests only).

Same names and shapes as the real API: Evidence, question_evidence, LexicalMatcher, EmbeddingMatcher,
TrajectoryScores and score_trajectory(ies). Lexical matching is the share of an evidence item's words found
in a text; coverage sums each item's best match over the channels of every step; process = coverage / steps
(F1 / steps without evidence).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from autorefine.rewards import RewardConfig, normalize_answer, trajectory_reward


@dataclass(frozen=True)
class Evidence:
    title: str
    text: str
    answer: str | None = None


def question_evidence(question: Any) -> list[Evidence]:
    return [Evidence(**item) for item in question.metadata.get("evidence", [])]


class Matcher(Protocol):
    name: str

    def similarity(self, evidence: list[Evidence], texts: list[str]) -> list[list[float]]: ...


class LexicalMatcher:
    name = "lexical"

    def similarity(self, evidence: list[Evidence], texts: list[str]) -> list[list[float]]:
        out = []
        for item in evidence:
            words = set(normalize_answer(f"{item.title} {item.text}").split())
            out.append([len(words & set(normalize_answer(t).split())) / max(len(words), 1) for t in texts])
        return out


class EmbeddingMatcher(LexicalMatcher):
    name = "embedding"


def build_matcher(spec: str) -> Matcher:
    kind, _, model = spec.partition(":")
    if kind == "lexical" and not model:
        return LexicalMatcher()
    if kind == "embedding":
        return EmbeddingMatcher()
    raise ValueError(f"unknown matcher {spec!r}: use 'lexical', 'embedding' or 'embedding:<model>'")


@dataclass(frozen=True)
class TrajectoryScores:
    format: float
    outcome: float
    process: float
    coverage: float
    steps: int
    model_tokens: int
    em: float

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def score_trajectory(trajectory, question, matcher, reward_config=RewardConfig()) -> TrajectoryScores:
    breakdown = trajectory_reward(trajectory, question.golden_answers, reward_config)
    steps = trajectory.num_searches
    evidence = question_evidence(question)
    if evidence:
        texts = [text for step in trajectory.steps for text in (step.query, step.documents, *step.refines)]
        sims = matcher.similarity(evidence, texts) if texts else [[0.0] for _ in evidence]
        coverage = sum(max(row, default=0.0) for row in sims)
        process = coverage / max(1, steps)
    else:
        coverage, process = 0.0, breakdown.outcome / max(1, steps)
    return TrajectoryScores(
        format=breakdown.format,
        outcome=breakdown.outcome,
        process=process,
        coverage=coverage,
        steps=steps,
        model_tokens=trajectory.num_model_tokens,
        em=breakdown.em,
    )


def score_trajectories(trajectories, questions, matcher, reward_config=RewardConfig()):
    return [
        score_trajectory(t, q, matcher, reward_config) for t, q in zip(trajectories, questions, strict=True)
    ]


def install() -> None:
    """Register this module as `autorefine.process_score` when the real one is not there yet."""
    try:
        import autorefine.process_score  # noqa: F401
    except ImportError:
        sys.modules["autorefine.process_score"] = sys.modules[__name__]
