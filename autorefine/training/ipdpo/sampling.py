"""The sampling stage of an IP-DPO round: K trajectories per question with the current policy, scored once.

Each process samples its share of the round's questions through the same agent loop as GRPO and appends
every finished batch of questions to its own part file, so a run that stops (a lost retriever, a crash)
keeps what it sampled and `--resume` samples only the rest. Rows keep exact token ids, environment masks and
the parsed segments, so a trajectory can be rebuilt from its row and re-scored offline.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from autorefine.data import Question
from autorefine.files import fsync_dir, write_jsonl
from autorefine.rollout.agent import AgentLoop
from autorefine.rollout.engine import SamplingParams
from autorefine.rollout.trajectory import FinishReason, Segment, Trajectory
from autorefine.scoring.process import Matcher
from autorefine.scoring.reward import RewardSettings
from autorefine.scoring.trajectory import score_trajectories
from autorefine.training.ipdpo.pairs import PairError, question_groups

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingSettings:
    """How each IP-DPO round samples: K trajectories per question with the current policy (the `sampling` section)."""

    samples_per_question: int = 8
    questions_per_round: int | None = None  # None: every training question, every round
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    batch_questions: int = 32  # questions per agent-loop batch (× samples_per_question trajectories)
    engine: Literal["transformers", "vllm"] = "transformers"
    engine_batch_size: int | None = None  # most sequences per generate call (None: the whole batch)
    matcher: str = "lexical"  # process-score evidence matcher: lexical | embedding | embedding:<model>

    def __post_init__(self) -> None:
        if self.samples_per_question < 2:
            raise ValueError("sampling.samples_per_question must be at least 2: a pair needs two samples")
        if self.questions_per_round is not None and self.questions_per_round < 1:
            raise ValueError("sampling.questions_per_round must be positive (or null for all)")
        if self.batch_questions < 1:
            raise ValueError("sampling.batch_questions must be positive")
        kind, _, model = self.matcher.partition(":")
        if not (kind == "embedding" or (kind == "lexical" and not model)):
            raise ValueError(
                f"sampling.matcher must be lexical, embedding or embedding:<model>, got {self.matcher!r}"
            )
        self.params  # noqa: B018  # the same checks as at sampling time

    @property
    def params(self) -> SamplingParams:
        """Token sampling of every trajectory."""
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)


def round_questions(
    questions: Sequence[Question], round_index: int, per_round: int | None, seed: int
) -> list[Question]:
    """The questions of round `round_index` (1-based): successive slices of one seeded shuffle, wrapping."""
    if per_round is None or per_round >= len(questions):
        return list(questions)
    order = list(range(len(questions)))
    random.Random(seed).shuffle(order)
    start = (round_index - 1) * per_round
    return [questions[order[(start + i) % len(order)]] for i in range(per_round)]


# --- rows -----------------------------------------------------------------------------------------------


def sample_row(
    question: Question,
    sample: int,
    trajectory: Trajectory,
    scores: dict[str, float],
    round_index: int,
    rank: int = 0,
) -> dict[str, Any]:
    """One sampled trajectory as a JSON row: exact ids and mask, parsed segments, scores."""
    return {
        "id": question.id,
        "round": round_index,
        "rank": rank,
        "sample": sample,
        "question": question.question,
        "golden_answers": question.golden_answers,
        "prompt_ids": trajectory.prompt_ids,
        "completion_ids": trajectory.completion_ids,
        "env_mask": trajectory.env_mask,
        "segments": [asdict(s) for s in trajectory.segments],
        "queries": trajectory.queries,
        "retrieved_ids": trajectory.retrieved_ids,
        "num_turns": trajectory.num_turns,
        "finish_reason": str(trajectory.finish_reason),
        "answer": trajectory.answer,
        "scores": scores,
    }


def trajectory_from_row(row: dict[str, Any]) -> Trajectory:
    """The trajectory a `sample_row` row describes (log-probs are not kept: zeros)."""
    return Trajectory(
        prompt_ids=list(row["prompt_ids"]),
        completion_ids=list(row["completion_ids"]),
        env_mask=list(row["env_mask"]),
        logprobs=[0.0] * len(row["completion_ids"]),
        segments=[Segment(**s) for s in row["segments"]],
        queries=list(row["queries"]),
        retrieved_ids=[list(r) for r in row["retrieved_ids"]],
        num_turns=int(row["num_turns"]),
        finish_reason=FinishReason(row["finish_reason"])
        if row.get("finish_reason") not in (None, "None")
        else None,
    )


def read_sample_rows(path: Path, *, tolerate_torn_tail: bool = False) -> Iterator[dict[str, Any]]:
    """Rows of a samples file; a row cut short by a crash ends a part file early when tolerated."""
    with path.open(encoding="utf-8") as f:
        lines = f.readlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if tolerate_torn_tail and number == len(lines) and not line.endswith("\n"):
                logger.warning("%s: dropping the last row, cut short by an interruption", path)
                return
            raise PairError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(row, dict) or not {"id", "completion_ids", "env_mask", "scores"} <= set(row):
            raise PairError(f"{path}:{number}: not a sample row (needs id, completion_ids, env_mask, scores)")
        yield row


def complete_groups(rows: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    """Question groups holding all `size` samples (a group cut by an interruption is dropped)."""
    for group in question_groups(rows):
        if len(group) == size:
            yield group


def rescore_rows(
    rows: Iterable[dict[str, Any]],
    questions: dict[str, Question],
    matcher: Matcher,
    reward: RewardSettings,
) -> Iterator[dict[str, Any]]:
    """Rows with their scores recomputed from their trajectories (another matcher or reward setting)."""
    for group in question_groups(rows):
        qid = group[0]["id"]
        if qid not in questions:
            raise PairError(f"question {qid} of the samples file is not in the questions file")
        trajectories = [trajectory_from_row(r) for r in group]
        scores = score_trajectories(trajectories, [questions[qid]] * len(group), matcher, reward)
        for row, s in zip(group, scores, strict=True):
            yield {**row, "scores": s.as_dict()}


# --- the sampling stage -------------------------------------------------------------------------------------


class SampleStore:
    """A round's samples: per-process part files while sampling, one grouped samples.jsonl once complete.

    `compact` folds the part files into `samples.parts/kept.jsonl`. A crash can leave that file next to the
    parts it was made from; readers then see some question groups twice, identical, and keep each once.
    """

    KEPT = "kept.jsonl"
    # What an interrupted compaction of earlier versions left: complete, and read so none of it is lost.
    LEGACY_KEPT = "kept.partial-compact"

    def __init__(self, round_dir: Path, samples_per_question: int) -> None:
        self.final = round_dir / "samples.jsonl"
        self.parts = round_dir / "samples.parts"
        self.size = samples_per_question

    @property
    def complete(self) -> bool:
        """True once every question of the round has its samples in samples.jsonl."""
        return self.final.is_file()

    def part(self, rank: int) -> Path:
        """The part file process `rank` appends to."""
        return self.parts / f"rank-{rank}.jsonl"

    def done_ids(self) -> set[str]:
        """Questions whose samples are all in the part files."""
        return {g[0]["id"] for g in self._groups()}

    def compact(self) -> int:
        """Rewrite the part files as one, keeping whole question groups only (before a resumed sampling).

        Crash-safe: the new kept.jsonl is written, synced and renamed into place before any file it
        replaces is deleted, so every step leaves each sampled question readable at least once.
        """
        if not self.parts.is_dir():
            return 0
        sources = self._part_files()
        kept = write_jsonl(self.parts / self.KEPT, (r for g in self._groups() for r in g))
        fsync_dir(self.parts)  # the rename reaches the disk before the files it supersedes leave it
        for path in sources:
            if path.name != self.KEPT:
                path.unlink()
        return kept // self.size

    def finish(self, order: Sequence[str]) -> int:
        """Merge the part files into samples.jsonl in the round's question order; returns the questions kept."""
        groups = {g[0]["id"]: g for g in self._groups()}
        missing = [qid for qid in order if qid not in groups]
        if missing:
            raise PairError(
                f"{self.parts}: {len(missing)} questions have no complete samples (e.g. {missing[0]})"
            )
        write_jsonl(self.final, (r for qid in order for r in groups[qid]))
        for path in self.parts.glob("*"):
            path.unlink()
        self.parts.rmdir()
        return len(order)

    def rows(self) -> Iterator[dict[str, Any]]:
        """Rows of samples.jsonl."""
        return read_sample_rows(self.final)

    def _part_files(self) -> list[Path]:
        """The files holding samples: kept.jsonl (and a legacy leftover) first, then each process's part."""
        if not self.parts.is_dir():
            return []
        first = [self.parts / name for name in (self.KEPT, self.LEGACY_KEPT)]
        ranks = sorted(p for p in self.parts.glob("*.jsonl") if p.name != self.KEPT)
        return [p for p in first if p.is_file()] + ranks

    def _groups(self) -> Iterator[list[dict[str, Any]]]:
        """Every whole question group of the part files, each question once (the first copy read)."""
        seen: set[str] = set()
        for path in self._part_files():
            # Grouped file by file: a question at the end of one file and the start of the next is two copies.
            for group in complete_groups(read_sample_rows(path, tolerate_torn_tail=True), self.size):
                if group[0]["id"] not in seen:
                    seen.add(group[0]["id"])
                    yield group


def sample_questions(
    loop: AgentLoop,
    questions: Sequence[Question],
    settings: SamplingSettings,
    matcher: Matcher,
    reward: RewardSettings,
    out: Path,
    *,
    round_index: int,
    seed: int,
    rank: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Sample and score `questions` batch by batch, appending each finished batch to `out`; returns rows."""
    import torch

    out.parent.mkdir(parents=True, exist_ok=True)
    k = settings.samples_per_question
    written = 0
    for start in range(0, len(questions), settings.batch_questions):
        batch = questions[start : start + settings.batch_questions]
        torch.manual_seed(seed + start)  # the transformers engine samples from torch's generator
        trajectories = loop.run([q.question for q in batch for _ in range(k)], settings.params)
        repeated = [q for q in batch for _ in range(k)]
        scores = score_trajectories(trajectories, repeated, matcher, reward)
        rows = [
            sample_row(q, i % k, t, s.as_dict(), round_index, rank)
            for i, (q, t, s) in enumerate(zip(repeated, trajectories, scores, strict=True))
        ]
        with out.open(
            "a", encoding="utf-8"
        ) as f:  # whole questions at a time: a crash tears at most the tail
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            f.flush()
        written += len(rows)
        if progress is not None:
            progress(min(start + len(batch), len(questions)), len(questions))
    return written


class Progress:
    """Console progress of one process's sampling, at most every `every_s` seconds."""

    def __init__(self, label: str, every_s: float = 30.0) -> None:
        self.label = label
        self.every_s = every_s
        self.started = time.perf_counter()
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter() - self.started
        if done == total or now - self.last >= self.every_s:
            self.last = now
            logger.info("%s: %d/%d questions (%.0f s)", self.label, done, total, now)
