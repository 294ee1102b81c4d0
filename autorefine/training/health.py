"""Health signals of an online RL run, computed from each scored rollout batch and averaged over every process.

Logged every step (console and W&B) next to TRL's own `entropy`, `kl` (with `beta > 0`), `clip_ratio/*` and
`frac_reward_zero_std`. Signals every process has the same number of (one per trajectory) are logged through
TRL's reward-function `log_metric` (`rollout_means`); the others are summed and counted on each process and
combined at the end of the step (`HealthCallback`):

| key | meaning |
|---|---|
| `health/entropy/<kind>` | mean entropy (nats) of the model's tokens inside `<think>`, `<search>`, `<refine>`, `<answer>` blocks, outside any complete block (`other`), and over all of them (`model`); transformers engine only |
| `health/corrective_rate` | model turns answered with a corrective message (no usable action) / model turns |
| `health/repeated_queries` | searches per trajectory that repeat an earlier query of the same trajectory |
| `health/searches/<source>` | searches per trajectory for questions of one source (the id prefix `prepare-data` adds) |
| `health/flat_groups` | fraction of GRPO groups whose rewards are all equal (no learning signal): TRL's `frac_reward_zero_std` |
| `health/answer_words` | words in the accepted answer, over trajectories that gave one |
| `health/reward_gap` | this step's training reward minus the latest held-out EM |
| `rollout/*` | searches, turns, model/document tokens, refine/document words, `finish_<reason>` rates |

Entropies come from the engine at sampling time (the full next-token distribution at the sampling
temperature). vLLM hands back only the sampled token's log-prob and at most `max_logprobs` top candidates
(after top-k/top-p in TRL's `processed_logprobs` mode), so with vLLM the per-kind entropies are not logged;
TRL's `entropy` (all model tokens, from its training forward) still is.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from autorefine.protocol import ANSWER, REFINE, SEARCH, THINK, block_spans
from autorefine.rollout.trajectory import FinishReason, Trajectory
from autorefine.trl_private import latest_metric, record_metric

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, Trainer, TrainerControl, TrainerState, TrainingArguments

    from autorefine.training.rewards import ScoredBatch

ENTROPY_KINDS = (THINK, SEARCH, REFINE, ANSWER, "other")
NO_SOURCE = "unprefixed"

# key -> [sum, count]: means that stay exact when tallies of several processes or batches are added up.
Tally = dict[str, list[float]]


def question_source(question_id: str) -> str:
    """The source prefix of a question id (`nq-123` → `nq`); ids without one count as `unprefixed`."""
    prefix, sep, _ = str(question_id).partition("-")
    return prefix if sep and prefix else NO_SOURCE


def _normalized_query(query: str) -> str:
    return " ".join(query.lower().split())


class TokenKinds:
    """Labels each completion token with the block it sits in (think/search/refine/answer/other)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self._piece_length: dict[int, int] = {}

    def _ends(self, ids: list[int], text: str) -> list[int]:
        """Character offset in `text` where each token's text ends."""
        lengths = []
        for token in ids:
            if token not in self._piece_length:
                self._piece_length[token] = len(self.tokenizer.decode([token], skip_special_tokens=True))
            lengths.append(self._piece_length[token])
        # Tokens that decode on their own to exactly the turn's text (no character split across tokens).
        if sum(lengths) == len(text):
            return list(itertools.accumulate(lengths))
        # A character split across tokens decodes differently alone: decode every prefix instead (slow, rare).
        return [len(self.tokenizer.decode(ids[: i + 1], skip_special_tokens=True)) for i in range(len(ids))]

    def of(self, trajectory: Trajectory) -> list[str | None]:
        """One label per completion token: a block kind for model tokens, None for environment tokens."""
        labels: list[str | None] = [None] * len(trajectory.completion_ids)
        for segment in trajectory.segments:
            if not segment.is_model:
                continue
            ids = trajectory.completion_ids[segment.start : segment.end]
            ends = self._ends(ids, segment.text)
            kinds = ["other"] * len(ids)
            for tag, start, end in block_spans(segment.text):
                for i, token_end in enumerate(ends):
                    token_start = ends[i - 1] if i else 0
                    # A token belongs to the first block its text overlaps.
                    if token_end > start and token_start < end and kinds[i] == "other":
                        kinds[i] = tag
            labels[segment.start : segment.end] = kinds
        return labels


def _add(tally: Tally, key: str, value: float, count: float = 1.0) -> None:
    entry = tally.setdefault(key, [0.0, 0.0])
    entry[0] += value
    entry[1] += count


def rollout_means(trajectories: Sequence[Trajectory]) -> dict[str, float]:
    """Per-trajectory means of one batch: searches, turns, tokens, words, finish reasons, repeated queries."""
    n = len(trajectories)
    if not n:
        return {}
    sums: dict[str, float] = {}
    for t in trajectories:
        values = {
            "rollout/searches": t.num_searches,
            "rollout/turns": t.num_turns,
            "rollout/model_tokens": t.num_model_tokens,
            "rollout/document_tokens": t.tokens_of("documents"),
            "rollout/refine_words": sum(len(x.split()) for x in t.refine_texts),
            "rollout/document_words": len(t.documents_text.split()),
            "health/repeated_queries": repeated_queries(t.queries),
            **{f"rollout/finish_{r.value}": float(t.finish_reason == r) for r in FinishReason},
        }
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + float(value)
    return {key: total / n for key, total in sums.items()}


def repeated_queries(queries: Sequence[str]) -> int:
    """Searches that repeat an earlier query of the same trajectory (case and spacing ignored)."""
    seen: set[str] = set()
    repeats = 0
    for query in queries:
        normalized = _normalized_query(query)
        repeats += normalized in seen
        seen.add(normalized)
    return repeats


def trajectory_tally(
    trajectories: Sequence[Trajectory], question_ids: Sequence[str], kinds: TokenKinds
) -> Tally:
    """Sums and counts of the signals whose counts differ between processes (this process's share)."""
    tally: Tally = {}
    for t, qid in zip(trajectories, question_ids, strict=True):
        model_turns = sum(1 for s in t.segments if s.is_model)
        _add(tally, "health/corrective_rate", sum(1 for s in t.segments if s.kind == "feedback"), model_turns)
        _add(tally, f"health/searches/{question_source(qid)}", t.num_searches)
        if t.answer is not None:
            _add(tally, "health/answer_words", len(t.answer.split()))

        if t.entropies:
            for label, entropy in zip(kinds.of(t), t.entropies, strict=True):
                if label is None or math.isnan(entropy):
                    continue
                _add(tally, f"health/entropy/{label}", entropy)
                _add(tally, "health/entropy/model", entropy)
    return tally


def flat_groups(rewards: Sequence[float], group_size: int, tolerance: float = 1e-6) -> list[bool]:
    """Per group of `group_size` consecutive rewards (TRL's grouping), whether all its rewards are equal."""
    if group_size < 1 or len(rewards) % group_size:
        raise ValueError(f"{len(rewards)} rewards do not split into groups of {group_size}")
    groups = [rewards[i : i + group_size] for i in range(0, len(rewards), group_size)]
    return [max(g) - min(g) <= tolerance for g in groups]


def merge_tallies(tallies: Sequence[Tally]) -> Tally:
    """Sum of several tallies (processes, batches)."""
    merged: Tally = {}
    for tally in tallies:
        for key, (total, count) in tally.items():
            _add(merged, key, total, count)
    return merged


def means(tally: Tally) -> dict[str, float]:
    """The mean of every signal that has at least one observation."""
    return {key: total / count for key, (total, count) in sorted(tally.items()) if count > 0}


class HealthCallback(TrainerCallback):
    """Collects each scored training batch (`observe`, a `ScoredBatch` subscriber) and logs the health signals
    at the end of the step.

    `observe` runs on every process with its own share of the batch; `on_step_end` gathers every process's
    sums and counts (one collective per step, called by every rank), so the logged values, and every decision
    taken on them, are the same everywhere. The reward and flat-group share come from TRL, already over every
    process.
    """

    def __init__(self, trainer: Trainer, heldout_em: Callable[[], float | None] = lambda: None) -> None:
        self.trainer = trainer
        self.kinds = TokenKinds(trainer.processing_class)
        self.heldout_em = heldout_em
        self._tallies: list[Tally] = []
        self._rewards: list[float] = []
        self._flat: list[float] = []

    def observe(self, batch: ScoredBatch) -> None:
        """Record one scored batch of this process (training batches only)."""
        if not batch.training:
            return
        self._tallies.append(trajectory_tally(batch.trajectories, batch.ids, self.kinds))
        self._rewards += batch.all_rewards
        flat = latest_metric(self.trainer, "frac_reward_zero_std")
        if flat is not None:
            self._flat.append(flat)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        tallies, rewards, flat = self._tallies, self._rewards, self._flat
        self._tallies, self._rewards, self._flat = [], [], []
        batches = self._gather(tallies)
        if not batches:
            return
        values = means(merge_tallies(batches))
        values["health/flat_groups"] = sum(flat) / len(flat) if flat else math.nan
        heldout = self.heldout_em()
        if heldout is not None and rewards:
            values["health/reward_gap"] = sum(rewards) / len(rewards) - heldout
        for key, value in values.items():
            if not math.isnan(value):
                record_metric(self.trainer, key, value)

    def _gather(self, tallies: list[Tally]) -> list[Tally]:
        """Every process's tallies of this step (all processes score the same number of batches)."""
        acc = self.trainer.accelerator
        if acc.num_processes == 1:
            return tallies
        from accelerate.utils import gather_object

        per_rank: list[list[Tally]] = gather_object([tallies])
        counts = {len(batches) for batches in per_rank}
        if len(counts) != 1:
            raise RuntimeError(
                f"processes scored different numbers of rollout batches this step: {sorted(counts)}"
            )
        return [tally for batches in per_rank for tally in batches]
