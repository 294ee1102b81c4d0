"""The AutoRefine reward and the format check, computed from the model's own text only.

A trajectory is scored on what the agent loop accepted, turn by turn (`trajectory_reward`): the answer that
ended it and the refine blocks of each model turn. Retrieved documents and environment messages are never
model text, so a passage that contains `<answer>X</answer>` cannot change a score, and no tag can span an
inserted block. `score_model_text` scores one piece of model text read as a single turn.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal

from autorefine.protocol import ANSWER, REFINE, SEARCH, THINK, block_sequence, final_answer, find_blocks
from autorefine.scoring.answers import cover_exact_match, exact_match, f1_score, refine_hit

if TYPE_CHECKING:
    from autorefine.rollout.trajectory import Trajectory

OutcomeMetric = Literal["f1", "em", "cover_em"]


def tags_follow_format(tags: Sequence[str], answer: str | None) -> bool:
    """Think first, a refine after every search before the next action, one non-empty answer at the end."""
    if not tags or tags[0] != THINK or tags[-1] != ANSWER or list(tags).count(ANSWER) != 1:
        return False
    if answer is None:  # the one answer block is empty
        return False
    pending_search = False
    for tag in tags:
        if tag in (SEARCH, ANSWER) and pending_search:
            return False
        if tag == SEARCH:
            pending_search = True
        elif tag == REFINE:
            pending_search = False
    return True


def follows_format(model_text: str) -> bool:
    """`tags_follow_format` for one piece of model text read as a single turn."""
    return tags_follow_format(block_sequence(model_text), final_answer(model_text))


@dataclass(frozen=True)
class RewardSettings:
    """How a trajectory is rewarded (the `reward` section; defaults: the AutoRefine paper)."""

    outcome_metric: OutcomeMetric = "f1"
    refine_bonus: float = 0.1
    format_weight: float = 0.0
    # Process-aware reward: + process_weight × process score on questions with gold evidence (see
    # `with_process`); 0 is the AutoRefine reward. `matcher` matches the evidence (lexical | embedding[:model]).
    process_weight: float = 0.0
    matcher: str = "lexical"

    def __post_init__(self) -> None:
        if self.outcome_metric not in _OUTCOME:
            raise ValueError(f"outcome_metric must be one of {sorted(_OUTCOME)}, got {self.outcome_metric!r}")
        if not self.process_weight >= 0:  # also refuses NaN
            raise ValueError(f"reward.process_weight must be >= 0, got {self.process_weight}")
        kind, _, model = self.matcher.partition(":")
        if not (kind == "embedding" or (kind == "lexical" and not model)):
            raise ValueError(
                f"reward.matcher must be lexical, embedding or embedding:<model>, got {self.matcher!r}"
            )


@dataclass(frozen=True)
class RewardBreakdown:
    """The reward and every component it was built from, for logging."""

    reward: float
    outcome: float
    em: float
    f1: float
    cover_em: float
    refine_hit: float
    has_answer: float
    format: float
    process_reward: float = 0.0  # the process term inside `reward` (`with_process`; 0 without it)

    def as_dict(self) -> dict[str, float]:
        """Plain dict of all fields."""
        return asdict(self)


_OUTCOME = {"f1": f1_score, "em": exact_match, "cover_em": cover_exact_match}


def score_answer(
    answer: str | None,
    refines: Sequence[str],
    format_ok: bool,
    golds: str | Sequence[str],
    settings: RewardSettings = RewardSettings(),
) -> RewardBreakdown:
    """AutoRefine reward: 0 without an answer; the outcome metric when > 0; else the refine bonus on a hit."""
    hit = refine_hit(refines, golds)
    outcome = _OUTCOME[settings.outcome_metric](answer, golds)
    if answer is None:
        reward = 0.0
    elif outcome > 0:
        reward = outcome
    else:
        reward = settings.refine_bonus * hit
    fmt = float(format_ok)
    return RewardBreakdown(
        reward=reward + settings.format_weight * fmt,
        outcome=outcome,
        em=exact_match(answer, golds),
        f1=f1_score(answer, golds),
        cover_em=cover_exact_match(answer, golds),
        refine_hit=hit,
        has_answer=float(answer is not None),
        format=fmt,
    )


def trajectory_reward(
    trajectory: Trajectory, golds: str | Sequence[str], settings: RewardSettings = RewardSettings()
) -> RewardBreakdown:
    """The reward of a rollout: its accepted answer, its per-turn refines and block order."""
    answer = trajectory.answer
    return score_answer(
        answer, trajectory.refine_texts, tags_follow_format(trajectory.block_tags, answer), golds, settings
    )


def score_model_text(
    model_text: str, golds: str | Sequence[str], settings: RewardSettings = RewardSettings()
) -> RewardBreakdown:
    """The reward of one piece of model text read as a single turn (its last answer block is the answer)."""
    return score_answer(
        final_answer(model_text), find_blocks(model_text, REFINE), follows_format(model_text), golds, settings
    )


def with_process(
    breakdown: RewardBreakdown, process: float, has_evidence: bool, settings: RewardSettings
) -> RewardBreakdown:
    """The reward plus `settings.process_weight` × the process score, for a question with gold evidence.

    The term is added to whatever the AutoRefine reward gave (F1 when the answer scores, else the refine bonus
    on a hit, else 0; plus the format term). It also rewards the search path of a wrong answer: a wrong answer
    outscores a right one only when weight × their process gap exceeds their outcome gap, so keep the weight
    well below 1. Without evidence the process score falls back to answer F1 per search, which would count the
    outcome twice: those questions keep the plain reward.
    """
    if not settings.process_weight or not has_evidence:
        return breakdown
    term = settings.process_weight * process
    return dataclasses.replace(breakdown, reward=breakdown.reward + term, process_reward=term)
