"""The search-augmented rollout handed to TRL: the agent loop as a `rollout_func` over the trainer's policy.

TRL calls it with this process's prompts (each question repeated per group) and trains on what it returns:
the exact sampled ids, their log-probs, and `env_mask` over the tokens the environment inserted (documents,
corrective messages), which TRL leaves out of the loss, the KL and the entropy while still attending to them.
The trajectories themselves ride along as an extra column, so rewards read the model's own text rather than
TRL's decoded completions (which include the documents).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from autorefine.protocol import PromptTemplate
from autorefine.rollout.agent import AgentLoop, RolloutSettings, Searcher
from autorefine.rollout.engine import SamplingParams
from autorefine.rollout.engines import TrainerEngine
from autorefine.rollout.trajectory import Trajectory
from autorefine.trl_private import record_metric

if TYPE_CHECKING:
    from transformers import Trainer


def rollout_sampling(args: Any, temperature: float | None = None) -> SamplingParams:
    """Token sampling of rollouts from the trainer's arguments (`temperature` overrides theirs, e.g. greedy 0)."""
    return SamplingParams(
        temperature=args.temperature if temperature is None else temperature,
        top_p=args.top_p,
        top_k=args.top_k or 0,
        min_p=args.min_p or 0.0,
        repetition_penalty=args.repetition_penalty,
    )


class SearchRollout:
    """TRL `rollout_func`: the agent loop on this process's prompts (questions, repeated per group)."""

    def __init__(
        self,
        searcher: Searcher,
        rollout: RolloutSettings,
        template: PromptTemplate,
        eval_temperature: float,
    ):
        self.searcher = searcher
        self.rollout = rollout
        self.template = template
        self.eval_temperature = eval_temperature
        self.total_seconds = 0.0
        self.batches = 0  # rollout batches produced so far (training and evaluation)
        self.latest: list[tuple[str, Trajectory]] = []  # the last batch (for inspection: tests, benchmarks)
        self.engine: TrainerEngine | None = None  # the trainer's engine (shared with held-out evaluation)

    def __call__(self, prompts: list[str], trainer: Trainer) -> dict[str, list[Any]]:
        """Run one batch of rollouts; returns TRL's required keys plus `env_mask` and the trajectories."""
        started = time.perf_counter()
        training = trainer.model.training
        params = rollout_sampling(trainer.args, None if training else self.eval_temperature)
        if self.engine is None:
            self.engine = TrainerEngine(trainer)
        # TRL pushed the current weights to vLLM just before calling us.
        with self.engine.current_policy() as engine:
            loop = AgentLoop(engine, self.searcher, self.rollout, self.template)
            trajectories = loop.run(prompts, params)
        elapsed = time.perf_counter() - started
        self.total_seconds += elapsed
        self.batches += 1
        self.latest = list(zip(prompts, trajectories, strict=True))
        if training:
            self._record(trainer, loop.last_timings.retrieval_s, elapsed)
        return {
            "prompt_ids": [t.prompt_ids for t in trajectories],
            "completion_ids": [t.completion_ids for t in trajectories],
            "logprobs": [t.logprobs for t in trajectories],
            "env_mask": [t.env_mask for t in trajectories],
            # TRL's decoded completions include the documents: rewards read the trajectories instead.
            "trajectory": trajectories,
            "finish_reason": [str(t.finish_reason) for t in trajectories],
        }

    def _record(self, trainer: Trainer, retrieval_s: float, rollout_s: float) -> None:
        """Rollout timings, averaged over every process."""
        times = trainer.accelerator.gather(
            torch.tensor([rollout_s, retrieval_s], device=trainer.accelerator.device)
        )
        times = times.view(-1, 2).mean(0)
        record_metric(trainer, "time/rollout_s", times[0].item())
        record_metric(trainer, "time/retrieval_s", times[1].item())
