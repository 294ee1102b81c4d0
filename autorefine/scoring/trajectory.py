"""Scoring trajectories, once each: the AutoRefine reward, the process score and every metric of `METRICS`.

Evaluation, GRPO and IP-DPO all score through `score_trajectories`, so a trajectory gets the same numbers
wherever it is scored, and nothing is scored twice on one path.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from autorefine.scoring.metrics import METRICS, ScoreContext
from autorefine.scoring.process import ChannelWeights, LexicalMatcher, Matcher, process_scores
from autorefine.scoring.reward import RewardSettings, trajectory_reward, with_process

if TYPE_CHECKING:
    from autorefine.data import Question
    from autorefine.rollout.trajectory import Trajectory


class TrajectoryScores(Mapping[str, float]):
    """Every metric of one trajectory by name; also readable as attributes (`scores.em`)."""

    def __init__(self, values: Mapping[str, float]) -> None:
        self._values = dict(values)

    def __getitem__(self, name: str) -> float:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __getattr__(self, name: str) -> float:
        try:
            return self.__dict__["_values"][name]
        except KeyError:
            raise AttributeError(f"no score named {name!r}") from None

    def __repr__(self) -> str:
        return f"TrajectoryScores({self._values!r})"

    def as_dict(self) -> dict[str, float]:
        """Plain dict of every score."""
        return dict(self._values)


def score_trajectories(
    trajectories: Sequence[Trajectory],
    questions: Sequence[Question],
    matcher: Matcher | None = None,
    reward: RewardSettings = RewardSettings(),
    weights: ChannelWeights = ChannelWeights(),
) -> list[TrajectoryScores]:
    """Every metric of each trajectory against its question; the evidence matcher (default: lexical) is
    called once for the whole batch."""
    if len(trajectories) != len(questions):
        raise ValueError(f"{len(trajectories)} trajectories but {len(questions)} questions")
    rewards = [
        trajectory_reward(t, q.golden_answers, reward) for t, q in zip(trajectories, questions, strict=True)
    ]
    processes = process_scores(
        trajectories, questions, [r.outcome for r in rewards], matcher or LexicalMatcher(), weights
    )
    out = []
    for trajectory, question, breakdown, process in zip(
        trajectories, questions, rewards, processes, strict=True
    ):
        breakdown = with_process(breakdown, process.process, process.evidence_items > 0, reward)
        context = ScoreContext(trajectory, question, breakdown, process)
        out.append(TrajectoryScores({m.name: float(m.value(context)) for m in METRICS}))
    return out


def score_trajectory(
    trajectory: Trajectory,
    question: Question,
    matcher: Matcher | None = None,
    reward: RewardSettings = RewardSettings(),
    weights: ChannelWeights = ChannelWeights(),
) -> TrajectoryScores:
    """Every metric of one trajectory (see `score_trajectories`)."""
    return score_trajectories([trajectory], [question], matcher, reward, weights)[0]
