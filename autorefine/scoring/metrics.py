"""Every per-trajectory score, defined once: how it is computed, whether GRPO logs it, where reports show it.

A `Metric` computes one number from a scored trajectory (`ScoreContext`: the trajectory, its question, its
AutoRefine reward breakdown and its process score). From this one list come:

- the scores of every trajectory (`autorefine.scoring.trajectory`), in evaluation, GRPO and IP-DPO alike;
- the zero-weight reward components GRPO logs (`logged`: `rewards/<name>/mean` in TRL's logs);
- evaluation's aggregates (`mean`: averaged over the questions of a dataset into metrics.json, and logged as
  `heldout/<name>` by held-out evaluation during training);
- the columns of `autorefine evaluate`'s tables (`column`, shown as `style`).

Adding a score is one `Metric` in `METRICS` (see docs/extending.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from autorefine.scoring.answers import contains_answer

if TYPE_CHECKING:
    from autorefine.data import Question
    from autorefine.rollout.trajectory import Trajectory
    from autorefine.scoring.process import ProcessScore
    from autorefine.scoring.reward import RewardBreakdown

# How a column shows a value: a rate ×100 (pct), a count (int), a mean with 0/1/2 decimals.
Style = Literal["pct", "int", "num0", "num1", "num2"]


@dataclass(frozen=True)
class ScoreContext:
    """What a metric reads: one trajectory, its question, and the scores computed once for it."""

    trajectory: Trajectory
    question: Question
    reward: RewardBreakdown
    process: ProcessScore


@dataclass(frozen=True)
class Metric:
    """One per-trajectory score and where it appears."""

    name: str
    value: Callable[[ScoreContext], float]
    column: str | None = None  # header in evaluate's results tables (None: not a column)
    style: Style = "pct"
    logged: bool = False  # a zero-weight GRPO reward component, logged next to the reward
    mean: bool = False  # averaged into evaluation metrics (and held-out logs)
    cost: bool = False  # with self-consistency, summed over every sample drawn for the question


def _words(texts: list[str]) -> float:
    # Words, not tokens: refine blocks sit inside model segments, and words compare across tokenizers.
    return float(sum(len(text.split()) for text in texts))


METRICS: list[Metric] = [
    Metric("reward", lambda s: s.reward.reward, mean=True),
    Metric("outcome", lambda s: s.reward.outcome),
    Metric("em", lambda s: s.reward.em, column="EM", logged=True, mean=True),
    Metric("f1", lambda s: s.reward.f1, column="F1", logged=True, mean=True),
    Metric("cover_em", lambda s: s.reward.cover_em, column="cover-EM", logged=True, mean=True),
    Metric("format", lambda s: s.reward.format, column="valid format", logged=True, mean=True),
    Metric("process", lambda s: s.process.process, column="process", style="num2", mean=True),
    Metric(
        "searches",
        lambda s: float(s.trajectory.num_searches),
        column="searches/q",
        style="num2",
        mean=True,
        cost=True,
    ),
    Metric(
        "retrieval_success",
        lambda s: contains_answer([s.trajectory.documents_text], s.question.golden_answers),
        column="retrieval success",
        mean=True,
    ),
    Metric("refine_hit", lambda s: s.reward.refine_hit, column="refine hit", logged=True, mean=True),
    Metric(
        "model_tokens",
        lambda s: float(s.trajectory.num_model_tokens),
        column="model tokens",
        style="num0",
        mean=True,
        cost=True,
    ),
    Metric(
        "document_tokens",
        lambda s: float(s.trajectory.tokens_of("documents")),
        column="doc tokens",
        style="num0",
        mean=True,
        cost=True,
    ),
    Metric("has_answer", lambda s: s.reward.has_answer, logged=True),
    # The process term of a process-aware reward (`reward.process_weight`), logged beside the reward it is in.
    Metric("process_reward", lambda s: s.reward.process_reward, logged=True),
    Metric("refine_words", lambda s: _words(s.trajectory.refine_texts)),
    Metric("document_words", lambda s: _words([s.trajectory.documents_text])),
    Metric("coverage", lambda s: s.process.coverage),
    # The process score's own vocabulary (TeaRAG counts searches as steps), kept in IP-DPO's sample rows.
    Metric("steps", lambda s: float(s.process.steps)),
    Metric("evidence_items", lambda s: float(s.process.evidence_items)),
    Metric("query_coverage", lambda s: s.process.query_coverage),
    Metric("documents_coverage", lambda s: s.process.documents_coverage),
    Metric("refine_coverage", lambda s: s.process.refine_coverage),
]


def logged_metrics() -> list[Metric]:
    """The metrics GRPO logs as zero-weight reward components."""
    return [m for m in METRICS if m.logged]


def mean_metrics() -> list[Metric]:
    """The metrics evaluation averages."""
    return [m for m in METRICS if m.mean]


def column_metrics() -> list[Metric]:
    """The metrics shown as columns of evaluation tables, in order."""
    return [m for m in METRICS if m.column]
