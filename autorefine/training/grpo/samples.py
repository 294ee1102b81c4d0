"""Sample trajectories of a GRPO run: a few every N steps (samples/step-N.jsonl), or every one (rollouts/).

Both read the latest `ScoredBatch`. The W&B table of samples is TRL's completions table
(`trainer.log_completions`), with the model's own text, answer, golds and finish reason as extra columns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

if TYPE_CHECKING:
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from autorefine.training.rewards import ScoredBatch


@dataclass(frozen=True)
class LoggingSettings:
    """What a GRPO run logs besides TRL's own metrics (the `logging` section)."""

    sample_table_every: int = 10  # steps between files of sample trajectories (0: never)
    sample_table_rows: int = 4
    save_rollouts: bool = False  # every trajectory (ids, masks, reward) to <output_dir>/rollouts/rank-R.jsonl


def sample_records(scored: ScoredBatch) -> list[dict[str, Any]]:
    """This process's trajectories of a scored batch with their question id, golds and reward."""
    return [
        {
            "id": qid,
            "question": question,
            "golds": " | ".join(golds),
            "trajectory": "".join(f"[{s.kind}] {s.text}\n" for s in t.segments if s.kind != "eos"),
            "answer": t.answer or "",
            "reward": reward,
            "finish": str(t.finish_reason),
            "searches": t.num_searches,
            "prompt_ids": t.prompt_ids,
            "completion_ids": t.completion_ids,
            "env_mask": t.env_mask,
        }
        for qid, question, golds, t, reward in zip(
            scored.ids, scored.questions, scored.golds, scored.trajectories, scored.rewards, strict=True
        )
    ]


class LatestSamples:
    """`ScoredBatch` subscriber keeping this process's latest training batch as records."""

    def __init__(self) -> None:
        self.batch = 0  # index of the latest recorded batch
        self.records: list[dict[str, Any]] = []

    def __call__(self, scored: ScoredBatch) -> None:
        if scored.training:
            self.batch, self.records = scored.index, sample_records(scored)


class SampleTableCallback(TrainerCallback):
    """Every `every` steps, a few of the latest trajectories in samples/step-N.jsonl (main process)."""

    def __init__(self, every: int, rows: int, latest: LatestSamples) -> None:
        self.every = every
        self.rows = rows
        self.latest = latest

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.every <= 0 or state.global_step % self.every != 0 or not state.is_world_process_zero:
            return
        samples = self.latest.records[: self.rows]
        if not samples:
            return
        out = Path(args.output_dir) / "samples" / f"step-{state.global_step}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples), encoding="utf-8")


class SaveRolloutsCallback(TrainerCallback):
    """Appends every new rollout batch of this process to <output_dir>/rollouts/rank-R.jsonl.

    Rows carry exact prompt/completion ids and env masks, so `train-sft traces_file=...` can learn from them.
    """

    def __init__(self, latest: LatestSamples) -> None:
        self.latest = latest
        self.written = 0

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.latest.batch == self.written or not self.latest.records:
            return
        self.written = self.latest.batch
        rank = args.process_index
        out = Path(args.output_dir) / "rollouts" / f"rank-{rank}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a", encoding="utf-8") as f:
            for row in self.latest.records:
                f.write(
                    json.dumps({"step": state.global_step, "rank": rank, **row}, ensure_ascii=False) + "\n"
                )
