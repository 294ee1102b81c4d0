"""Predictions of a policy on questions: greedy, self-consistency or ESC, batched across questions, in order."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from autorefine.data import Question
from autorefine.evaluation.esc import ESCResult, ESCSettings, expected_samples, run_esc, run_sc
from autorefine.evaluation.predictions import Prediction
from autorefine.rollout.agent import AgentLoop
from autorefine.rollout.engine import SamplingParams
from autorefine.rollout.trajectory import Trajectory
from autorefine.scoring.metrics import METRICS
from autorefine.scoring.reward import RewardSettings
from autorefine.scoring.trajectory import score_trajectories

GREEDY = SamplingParams(temperature=0.0)

DecodingMode = Literal["greedy", "sc", "esc"]
DECODING_MODES: tuple[DecodingMode, ...] = ("greedy", "sc", "esc")


@dataclass(frozen=True)
class Decoding:
    """How one answer per question is produced: one greedy trajectory, or a vote over sampled ones."""

    mode: DecodingMode = "greedy"
    # sc draws `esc.max_samples` trajectories; esc draws windows of `esc.window` up to that budget.
    esc: ESCSettings = field(default_factory=ESCSettings)
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in DECODING_MODES:
            raise ValueError(f"decoding must be one of {', '.join(DECODING_MODES)}, got {self.mode!r}")

    @property
    def sampling(self) -> SamplingParams:
        """Token sampling of every trajectory (greedy, or the ESC temperature)."""
        if self.mode == "greedy":
            return GREEDY
        # No per-request seed: vLLM would then draw identical samples for the copies of one prompt.
        return SamplingParams(temperature=self.esc.temperature, top_p=self.top_p)


GREEDY_DECODING = Decoding()


def _predictions(
    questions: Sequence[Question], trajectories: Sequence[Trajectory], reward: RewardSettings
) -> list[Prediction]:
    scores = score_trajectories(trajectories, questions, reward=reward)
    return [
        Prediction(
            id=q.id,
            question=q.question,
            golden_answers=q.golden_answers,
            prediction=t.answer,
            scores=s.as_dict(),
            trajectory=t.to_dict(),
            searches=t.num_searches,
        )
        for q, t, s in zip(questions, trajectories, scores, strict=True)
    ]


def voted_prediction(
    question: Question, result: ESCResult[Trajectory], settings: ESCSettings, reward: RewardSettings
) -> Prediction:
    """One question's SC/ESC outcome: scores of the winning trajectory, costs summed over every sample."""
    samples = result.samples
    # The shown trajectory is the first whose answer is the returned one, so its EM/F1 are the vote's.
    shown = next((i for i, t in enumerate(samples) if t.answer == result.answer), 0)
    every = score_trajectories(samples, [question] * len(samples), reward=reward)
    scores = every[shown].as_dict()
    for metric in METRICS:
        if metric.cost:
            scores[metric.name] = sum(s[metric.name] for s in every)
    first_window = [t.answer for t in samples[: settings.window]]
    return Prediction(
        id=question.id,
        question=question.question,
        golden_answers=question.golden_answers,
        prediction=result.answer,
        scores=scores,
        trajectory=samples[shown].to_dict(),
        samples=result.samples_used,
        searches=sum(t.num_searches for t in samples),
        extra={
            "votes": result.votes,
            "stopped_early": result.stopped_early,
            "windows": result.windows,
            "max_samples": result.max_samples,
            "answers": [t.answer for t in samples],
            "sample_searches": [t.num_searches for t in samples],
            "expected_samples_first_window": expected_samples(
                first_window, settings.window, settings.max_samples
            ),
        },
    )


def predict_batch(
    loop: AgentLoop,
    questions: Sequence[Question],
    decoding: Decoding = GREEDY_DECODING,
    reward: RewardSettings = RewardSettings(),
    on_samples: Callable[[int], object] | None = None,
) -> list[Prediction]:
    """Predictions for one batch of questions; every model call carries the whole batch (ESC: its windows).

    Greedy decoding runs the loop even for an empty batch: a lockstep engine needs every process each turn.
    `on_samples(n)` is told of every `n` trajectories drawn (sc/esc), as they come back.
    """
    if decoding.mode == "greedy":
        trajectories = loop.run([q.question for q in questions], GREEDY)
        return _predictions(questions, trajectories, reward)
    if not questions:
        return []

    def sample(indices: list[int]) -> list[Trajectory]:
        trajectories = loop.run([questions[i].question for i in indices], decoding.sampling)
        if on_samples is not None:
            on_samples(len(trajectories))
        return trajectories

    config = decoding.esc
    if decoding.mode == "esc":
        results = run_esc(len(questions), sample, config)
    else:
        results = run_sc(len(questions), sample, config.max_samples)
    return [voted_prediction(q, r, config, reward) for q, r in zip(questions, results, strict=True)]


def predict_batches(
    loop: AgentLoop,
    questions: Sequence[Question],
    params: SamplingParams = GREEDY,
    *,
    batch_size: int = 32,
    reward: RewardSettings = RewardSettings(),
) -> Iterator[list[Prediction]]:
    """One trajectory per question (the last partial batch included), one batch at a time, in input order."""
    for start in range(0, len(questions), batch_size):
        batch = questions[start : start + batch_size]
        trajectories = loop.run([q.question for q in batch], params)
        yield _predictions(batch, trajectories, reward)


def predict(
    loop: AgentLoop,
    questions: Sequence[Question],
    params: SamplingParams = GREEDY,
    *,
    batch_size: int = 32,
    reward: RewardSettings = RewardSettings(),
) -> list[Prediction]:
    """All predictions at once."""
    return [
        p
        for batch in predict_batches(loop, questions, params, batch_size=batch_size, reward=reward)
        for p in batch
    ]


def predict_shard(
    loop: AgentLoop, questions: Sequence[Question], *, rank: int, world_size: int, batch_size: int
) -> list[Prediction]:
    """Greedy predictions for this process's share of `questions` (every `world_size`-th, from `rank`).

    Every process runs the same number of batches, the last ones possibly empty: with a lockstep engine each
    batch is a collective, so a process with fewer questions must still take part in the others' batches.
    """
    shard = list(questions[rank::world_size])
    largest = -(-len(questions) // world_size)
    out: list[Prediction] = []
    for start in range(0, max(largest, 1), batch_size):
        out += predict_batch(loop, shard[start : start + batch_size])
    return out
