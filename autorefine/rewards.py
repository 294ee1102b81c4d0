"""Answer metrics and the AutoRefine reward, computed from the model's own text only.

A trajectory is scored on what the agent loop accepted, turn by turn (`trajectory_reward`): the answer that
ended it and the refine blocks of each model turn. Retrieved documents and environment messages are never
model text, so a passage that contains `<answer>X</answer>` cannot change a score, and no tag can span an
inserted block. `score_model_text` scores one piece of model text read as a single turn.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal

from autorefine.protocol import ANSWER, REFINE, SEARCH, THINK, block_sequence, final_answer, find_blocks

if TYPE_CHECKING:
    from autorefine.rollout.trajectory import Trajectory

OutcomeMetric = Literal["f1", "em", "cover_em"]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
# Special answers that only match themselves: partial token overlap with "yes" is meaningless.
_CLOSED_ANSWERS = frozenset({"yes", "no", "noanswer"})


def normalize_answer(text: str) -> str:
    """Lowercase, drop ASCII punctuation, drop the words a/an/the, collapse whitespace."""
    text = text.lower().translate(_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _golds(golds: str | Sequence[str]) -> list[str]:
    return [golds] if isinstance(golds, str) else list(golds)


def exact_match(pred: str | None, golds: str | Sequence[str]) -> float:
    """1.0 when the normalized prediction equals some normalized gold answer that is not empty."""
    if pred is None:
        return 0.0
    p = normalize_answer(pred)
    return float(any((g := normalize_answer(gold)) and p == g for gold in _golds(golds)))


def cover_exact_match(pred: str | None, golds: str | Sequence[str]) -> float:
    """1.0 when some normalized gold answer is a substring of the normalized prediction."""
    if pred is None:
        return 0.0
    p = normalize_answer(pred)
    return float(any((g := normalize_answer(gold)) and g in p for gold in _golds(golds)))


def _token_f1(pred: str, gold: str) -> float:
    if (pred in _CLOSED_ANSWERS or gold in _CLOSED_ANSWERS) and pred != gold:
        return 0.0
    common = Counter(pred.split()) & Counter(gold.split())
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred.split())
    recall = overlap / len(gold.split())
    return 2 * precision * recall / (precision + recall)


def f1_score(pred: str | None, golds: str | Sequence[str]) -> float:
    """Token-level F1 between normalized prediction and gold, maximised over the gold answers."""
    if pred is None:
        return 0.0
    p = normalize_answer(pred)
    return max((_token_f1(p, normalize_answer(g)) for g in _golds(golds)), default=0.0)


def contains_answer(texts: Sequence[str], golds: str | Sequence[str]) -> float:
    """1.0 when some normalized gold answer is a substring of the texts joined by a space and normalized."""
    joined = normalize_answer(" ".join(texts))
    return float(any((g := normalize_answer(gold)) and g in joined for gold in _golds(golds)))


def refine_hit(refine_texts: Sequence[str], golds: str | Sequence[str]) -> float:
    """1.0 when the model's refine blocks contain a gold answer (the AutoRefine refine reward)."""
    return contains_answer(refine_texts, golds)


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
class RewardConfig:
    """How a trajectory is scored (defaults: the AutoRefine paper)."""

    outcome_metric: OutcomeMetric = "f1"
    refine_bonus: float = 0.1
    format_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.outcome_metric not in _OUTCOME:
            raise ValueError(f"outcome_metric must be one of {sorted(_OUTCOME)}, got {self.outcome_metric!r}")


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

    def as_dict(self) -> dict[str, float]:
        """Plain dict of all fields."""
        return asdict(self)


_OUTCOME = {"f1": f1_score, "em": exact_match, "cover_em": cover_exact_match}


def score_answer(
    answer: str | None,
    refines: Sequence[str],
    format_ok: bool,
    golds: str | Sequence[str],
    config: RewardConfig = RewardConfig(),
) -> RewardBreakdown:
    """AutoRefine reward: 0 without an answer; the outcome metric when > 0; else the refine bonus on a hit."""
    hit = refine_hit(refines, golds)
    outcome = _OUTCOME[config.outcome_metric](answer, golds)
    if answer is None:
        reward = 0.0
    elif outcome > 0:
        reward = outcome
    else:
        reward = config.refine_bonus * hit
    fmt = float(format_ok)
    return RewardBreakdown(
        reward=reward + config.format_weight * fmt,
        outcome=outcome,
        em=exact_match(answer, golds),
        f1=f1_score(answer, golds),
        cover_em=cover_exact_match(answer, golds),
        refine_hit=hit,
        has_answer=float(answer is not None),
        format=fmt,
    )


def trajectory_reward(
    trajectory: Trajectory, golds: str | Sequence[str], config: RewardConfig = RewardConfig()
) -> RewardBreakdown:
    """The reward of a rollout: its accepted answer, its per-turn refines and block order."""
    answer = trajectory.answer
    return score_answer(
        answer, trajectory.refine_texts, tags_follow_format(trajectory.block_tags, answer), golds, config
    )


def score_model_text(
    model_text: str, golds: str | Sequence[str], config: RewardConfig = RewardConfig()
) -> RewardBreakdown:
    """The reward of one piece of model text read as a single turn (its last answer block is the answer)."""
    return score_answer(
        final_answer(model_text), find_blocks(model_text, REFINE), follows_format(model_text), golds, config
    )
