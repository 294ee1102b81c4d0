"""Worked example: a small training method built from the shared pieces — rejection-sampling fine-tuning.

Sample K trajectories per question with the current policy (the same agent loop GRPO and IP-DPO use), score
each once, keep the best correct one per question, and fine-tune on those trajectories with the SFT trainer
(documents stay masked out of the loss, token ids stay exactly as sampled).
"""

from __future__ import annotations

from pathlib import Path

from autorefine.data import Question
from autorefine.protocol import PromptTemplate
from autorefine.rollout.agent import AgentLoop, RolloutSettings, Searcher
from autorefine.rollout.engine import SamplingParams
from autorefine.rollout.engines import engine_from_checkpoint
from autorefine.scoring.trajectory import score_trajectories
from autorefine.training.sft.traces import save_trajectories


def sample_best_traces(
    policy: str,
    questions: list[Question],
    searcher: Searcher,
    out: Path,
    *,
    samples: int = 4,
    rollout: RolloutSettings = RolloutSettings(),
    template: PromptTemplate | None = None,
    min_f1: float = 1.0,
) -> int:
    """Write the best correct trajectory of each question (of `samples`) to `out`; returns how many."""
    loop = AgentLoop(engine_from_checkpoint(policy, device="cpu"), searcher, rollout, template)
    repeated = [q for q in questions for _ in range(samples)]
    trajectories = loop.run([q.question for q in repeated], SamplingParams(temperature=1.0))
    scores = score_trajectories(trajectories, repeated)
    best: dict[str, tuple[float, int]] = {}
    for i, (question, s) in enumerate(zip(repeated, scores, strict=True)):
        key = (s["f1"], -s["model_tokens"])  # correct first, then shorter
        if (
            s["f1"] >= min_f1
            and s["format"] == 1.0
            and (question.id not in best or key > best[question.id][0])
        ):
            best[question.id] = (key, i)
    rows = [(repeated[i].id, trajectories[i], {"f1": scores[i]["f1"]}) for _, i in best.values()]
    return save_trajectories(out, rows)
