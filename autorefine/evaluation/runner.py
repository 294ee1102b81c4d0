"""Greedy (or sampled) evaluation of a policy on questions, batched across questions, in a fixed order."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from autorefine.data import Question
from autorefine.evaluation.scoring import Prediction, score_trajectory
from autorefine.rewards import RewardConfig
from autorefine.rollout.agent import AgentLoop
from autorefine.rollout.engine import SamplingParams

GREEDY = SamplingParams(temperature=0.0)


def predict_batches(
    loop: AgentLoop,
    questions: Sequence[Question],
    params: SamplingParams = GREEDY,
    *,
    batch_size: int = 32,
    reward_config: RewardConfig = RewardConfig(),
) -> Iterator[list[Prediction]]:
    """Predictions for every question (the last partial batch included), one batch at a time, in input order."""
    for start in range(0, len(questions), batch_size):
        batch = questions[start : start + batch_size]
        trajectories = loop.run([q.question for q in batch], params)
        yield [
            Prediction(
                id=q.id,
                question=q.question,
                golden_answers=q.golden_answers,
                prediction=t.answer,
                scores=score_trajectory(t, q.golden_answers, reward_config),
                trajectory=t.to_dict(),
                searches=t.num_searches,
            )
            for q, t in zip(batch, trajectories, strict=True)
        ]


def predict(
    loop: AgentLoop,
    questions: Sequence[Question],
    params: SamplingParams = GREEDY,
    *,
    batch_size: int = 32,
    reward_config: RewardConfig = RewardConfig(),
) -> list[Prediction]:
    """All predictions at once."""
    return [
        p
        for batch in predict_batches(
            loop, questions, params, batch_size=batch_size, reward_config=reward_config
        )
        for p in batch
    ]
