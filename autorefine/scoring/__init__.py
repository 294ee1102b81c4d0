"""Scoring, in one place: answer metrics, the AutoRefine reward, the process score, and every metric of a
trajectory (`score_trajectories`), each defined once in `METRICS`."""

from autorefine.scoring.answers import (
    contains_answer,
    cover_exact_match,
    exact_match,
    f1_score,
    normalize_answer,
    refine_hit,
)
from autorefine.scoring.metrics import METRICS, Metric, ScoreContext
from autorefine.scoring.process import (
    ChannelWeights,
    EmbeddingMatcher,
    LexicalMatcher,
    Matcher,
    ProcessScore,
    build_matcher,
)
from autorefine.scoring.reward import RewardBreakdown, RewardSettings, score_model_text, trajectory_reward
from autorefine.scoring.trajectory import TrajectoryScores, score_trajectories, score_trajectory

__all__ = [
    "METRICS",
    "ChannelWeights",
    "EmbeddingMatcher",
    "LexicalMatcher",
    "Matcher",
    "Metric",
    "ProcessScore",
    "RewardBreakdown",
    "RewardSettings",
    "ScoreContext",
    "TrajectoryScores",
    "build_matcher",
    "contains_answer",
    "cover_exact_match",
    "exact_match",
    "f1_score",
    "normalize_answer",
    "refine_hit",
    "score_model_text",
    "score_trajectories",
    "score_trajectory",
    "trajectory_reward",
]
