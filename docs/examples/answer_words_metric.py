"""Worked example: a new per-trajectory score, logged by GRPO and shown in `autorefine evaluate`'s tables.

To make it part of autorefine, add the `Metric` below to `METRICS` in `autorefine/scoring/metrics.py`; here
`register()` appends it at run time so `tests/test_extending.py` can run the example without editing the
library.
"""

from __future__ import annotations

from autorefine.scoring.metrics import METRICS, Metric, ScoreContext


def answer_words(scored: ScoreContext) -> float:
    """Words in the answer the agent loop accepted (0 without an answer)."""
    return float(len((scored.trajectory.answer or "").split()))


ANSWER_WORDS = Metric(
    "answer_words",
    answer_words,
    column="answer words",  # a column of evaluate's results.md / results.csv
    style="num1",
    logged=True,  # GRPO logs it as rewards/answer_words/mean (weight 0: it does not change the reward)
    mean=True,  # evaluate averages it into metrics.json; held-out evaluation logs heldout/answer_words
)


def register() -> None:
    """Add the metric (what editing `METRICS` in the library does)."""
    METRICS.append(ANSWER_WORDS)


def unregister() -> None:
    """Remove it again."""
    METRICS.remove(ANSWER_WORDS)
