"""GRPO's rewards, scored once per trajectory, and the one scored-batch event the rest of a run listens to.

TRL calls each reward function on this process's rows of a rollout batch. The first call scores every
trajectory once (`autorefine.scoring`); the AutoRefine reward (weight 1) and each logged metric (weight 0,
logged as `rewards/<name>/mean`) read those scores. Once TRL has turned the rewards into advantages, the
batch is published as a `ScoredBatch` to every subscriber: health signals, flat-group dropping, sample files.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from autorefine.data import Question
from autorefine.rollout.trajectory import Trajectory
from autorefine.scoring.metrics import logged_metrics
from autorefine.scoring.process import Matcher
from autorefine.scoring.reward import RewardSettings
from autorefine.scoring.trajectory import TrajectoryScores, score_trajectories
from autorefine.trl_private import after_scoring, gathered_rewards

if TYPE_CHECKING:
    from trl import GRPOTrainer

REWARD = "reward"  # the name TRL logs the AutoRefine reward under (`rewards/reward/mean`)


@dataclass
class ScoredBatch:
    """One rollout batch of this process, scored, as TRL is about to train on it."""

    index: int  # scored batches so far in this run (1-based)
    training: bool
    ids: list[str]
    questions: list[str]
    golds: list[list[str]]
    trajectories: list[Trajectory]
    scores: list[TrajectoryScores]
    rewards: list[float]  # each row's total reward, as TRL weighed it
    all_rewards: list[float]  # every process's rows, in TRL's order: groups of `group_size` consecutive rows
    group_size: int
    batch: dict[str, Any]  # TRL's scored batch (masks, advantages); a subscriber may edit the loss masks


Subscriber = Callable[[ScoredBatch], None]
# Per-batch means of signals every process has the same number of (TRL averages them over processes).
BatchMeans = Callable[[list[Trajectory]], dict[str, float]]


def question_rows(questions: list[Question]) -> list[dict[str, Any]]:
    """Dataset rows for GRPO: `prompt` is the raw question (templating happens inside the rollout)."""
    return [
        {
            "id": q.id,
            "prompt": q.question,
            "golden_answers": q.golden_answers,
            # JSON: evidence items differ in keys across datasets, and Arrow columns need one schema.
            "evidence": json.dumps(q.metadata.get("evidence") or []),
        }
        for q in questions
    ]


def reward_weights() -> list[float]:
    """TRL's `reward_weights`, in the order of `TrajectoryRewards.functions`: the reward counts, the logged
    metrics are only logged."""
    return [1.0] + [0.0] * len(logged_metrics())


class TrajectoryRewards:
    """Scores each batch once for every reward function, and publishes each scored batch."""

    def __init__(
        self, settings: RewardSettings, matcher: Matcher | None = None, means: BatchMeans | None = None
    ) -> None:
        self.settings = settings
        self.matcher = matcher
        self.means = means
        self.subscribers: list[Subscriber] = []
        self.batches = 0
        self._scored: dict[int, tuple[Trajectory, TrajectoryScores]] = {}

    # --- reward functions ----------------------------------------------------------------------------

    def functions(self) -> list[RewardFunction]:
        """TRL reward functions: the reward, then every logged metric."""
        return [RewardFunction(REWARD, self)] + [RewardFunction(m.name, self) for m in logged_metrics()]

    def scores(self, rows: dict[str, list[Any]]) -> list[TrajectoryScores]:
        """Scores of each row TRL handed a reward function; a batch is scored once, by the first call."""
        trajectories = rows["trajectory"]
        if all(self._scored.get(id(t), (None,))[0] is t for t in trajectories):
            return [self._scored[id(t)][1] for t in trajectories]
        questions = [
            Question(str(qid), str(prompt), list(golds), {"evidence": json.loads(evidence)})
            for qid, prompt, golds, evidence in zip(
                rows["id"], rows["prompts"], rows["golden_answers"], rows["evidence"], strict=True
            )
        ]
        scores = score_trajectories(trajectories, questions, self.matcher, self.settings)
        # Keep only this batch: ids of freed trajectories may be reused by the next one.
        self._scored = {id(t): (t, s) for t, s in zip(trajectories, scores, strict=True)}
        log_metric, log_extra = rows.get("log_metric"), rows.get("log_extra")
        if log_metric is not None and self.means is not None:
            for key, value in self.means(trajectories).items():
                log_metric(key, value)
        if log_extra is not None:
            _log_columns(log_extra, rows, trajectories)
        return scores

    # --- the scored-batch event ----------------------------------------------------------------------

    def subscribe(self, subscriber: Subscriber) -> None:
        """Call `subscriber` with every scored batch, in subscription order."""
        self.subscribers.append(subscriber)

    def attach(self, trainer: GRPOTrainer) -> None:
        """Publish every batch TRL scores (see `trl_private.after_scoring`)."""

        def publish(inputs: list[dict[str, Any]], batch: dict[str, Any]) -> dict[str, Any]:
            self.batches += 1
            trajectories = [row["trajectory"] for row in inputs]
            known = [self._scored.get(id(t)) for t in trajectories]
            if not all(k is not None and k[0] is t for k, t in zip(known, trajectories, strict=True)):
                raise RuntimeError("TRL scored a batch the reward functions never saw")
            scores = [k[1] for k in known]  # type: ignore[index]
            weights = trainer.reward_weights.tolist()
            names = trainer.reward_func_names
            everyone = gathered_rewards(trainer, names, weights)
            start = trainer.accelerator.process_index * len(inputs)
            event = ScoredBatch(
                index=self.batches,
                training=trainer.model.training,
                ids=[str(row.get("id", "")) for row in inputs],
                questions=[str(row["prompt"]) for row in inputs],
                golds=[list(row["golden_answers"]) for row in inputs],
                trajectories=trajectories,
                scores=scores,
                rewards=everyone[start : start + len(inputs)],
                all_rewards=everyone,
                group_size=trainer.num_generations,
                batch=batch,
            )
            for subscriber in self.subscribers:
                subscriber(event)
            return event.batch

        after_scoring(trainer, publish)


class RewardFunction:
    """A TRL reward function returning one score of each trajectory (named for TRL's logs)."""

    def __init__(self, name: str, rewards: TrajectoryRewards) -> None:
        self.name = name
        self.rewards = rewards
        self.__name__ = name

    def __call__(self, prompts: list[Any], completions: list[Any], **rows: Any) -> list[float]:
        """Scores of what the agent loop accepted (never TRL's decoded text, which includes documents)."""
        scores = self.rewards.scores({**rows, "prompts": prompts})
        return [s[self.name] for s in scores]


def _log_columns(
    log_extra: Callable[[str, list[Any]], None], rows: dict[str, Any], trajectories: list[Trajectory]
) -> None:
    """Extra columns of TRL's completions table (`trainer.log_completions`): the model's own text and outcome."""
    log_extra("id", [str(i) for i in rows["id"]])
    log_extra("golds", [" | ".join(g) for g in rows["golden_answers"]])
    log_extra("model_text", [t.model_text for t in trajectories])
    log_extra("answer", [t.answer or "" for t in trajectories])
    log_extra("finish", [str(t.finish_reason) for t in trajectories])
    log_extra("searches", [t.num_searches for t in trajectories])
