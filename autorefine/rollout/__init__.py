"""Search-augmented rollouts: the agent loop, its generation engines and the trajectories they produce."""

from autorefine.rollout.agent import AgentLoop, RolloutSettings, RolloutTimings, Searcher
from autorefine.rollout.engine import Generation, GenerationEngine, GenerationError, SamplingParams
from autorefine.rollout.trajectory import FinishReason, Segment, Trajectory

__all__ = [
    "AgentLoop",
    "FinishReason",
    "Generation",
    "GenerationEngine",
    "GenerationError",
    "RolloutSettings",
    "RolloutTimings",
    "SamplingParams",
    "Searcher",
    "Segment",
    "Trajectory",
]
