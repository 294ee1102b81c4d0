"""The multi-turn agent loop: generate → parse → search → insert documents, until every trajectory ends.

Token ids are appended turn by turn and never re-tokenized: the model's ids are exactly the ids it sampled,
and inserted text is tokenized on its own, so nothing merges across the model/environment junction.

An engine with a `lockstep` (one built for a multi-process trainer, see `autorefine.rollout.engines`) is called
once per turn on every process until no process has trajectories left, with no prompts once this process's own
are done; a failure on one process (a lost retriever, an engine that raised: `GenerationError`) is then raised on
all of them at the next exchange (see `autorefine.rollout.lockstep`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from autorefine import protocol
from autorefine.protocol import PromptTemplate
from autorefine.rollout.engine import Generation, GenerationEngine, GenerationError, SamplingParams
from autorefine.rollout.trajectory import FinishReason, Segment, SegmentKind, Trajectory

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from autorefine.protocol import Document


class Searcher(Protocol):
    """Anything that answers a batch of queries with top-k documents (e.g. `RetrieverClient`)."""

    def search(self, queries: list[str], topk: int = 3) -> list[list[Document]]:
        """Top-k documents per query."""
        ...


@dataclass(frozen=True)
class RolloutSettings:
    """Turn and token budgets of one rollout (the `rollout` section; defaults: AutoRefine training)."""

    max_turns: int = 5  # searches per trajectory; one more turn without search follows the last one
    max_new_tokens: int = 512  # per model turn
    max_obs_tokens: int = 512  # per documents block
    max_completion_tokens: int = (
        4096  # the whole completion, documents included (TRL's max_completion_length)
    )
    topk: int = 3  # documents per search

    def __post_init__(self) -> None:
        for name in ("max_turns", "max_new_tokens", "max_obs_tokens", "max_completion_tokens", "topk"):
            if getattr(self, name) < (0 if name == "max_turns" else 1):
                raise ValueError(f"rollout.{name} must be positive, got {getattr(self, name)}")


# Questions whose own token count is within this many tokens of the longest get their whole prompt measured.
PROMPT_MARGIN = 8


def longest_prompt(
    questions: Sequence[str], tokenizer: PreTrainedTokenizerBase, template: PromptTemplate, topk: int
) -> tuple[int, str]:
    """Token length of the longest prompt among `questions`, and its question.

    Templating every question of a large training set takes minutes; the rest of a prompt is the same text for
    every question, so only token merges where the question meets it can reorder lengths (by a token or two):
    the questions within `PROMPT_MARGIN` tokens of the longest get their whole prompt built and measured.
    """
    unique = list(dict.fromkeys(questions))
    if not unique:
        raise ValueError("no questions to measure")
    texts = [protocol.normalize_question(q) for q in unique]
    counts = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    cutoff = max(counts) - PROMPT_MARGIN
    candidates = [q for q, n in zip(unique, counts, strict=True) if n >= cutoff]
    return max((len(protocol.prompt_ids(q, tokenizer, template, topk)), q) for q in candidates)


def engine_failure(err: Exception) -> GenerationError:
    """`err`, raised by an engine during a turn, as the GenerationError a run stops on (cause attached)."""
    if isinstance(err, GenerationError):
        return err
    failure = GenerationError(f"the generation engine failed: {type(err).__name__}: {err}")
    failure.__cause__ = err
    return failure


@dataclass
class RolloutTimings:
    """Wall time spent generating and retrieving during one `run`."""

    generation_s: float = 0.0
    retrieval_s: float = 0.0
    turns: int = 0  # engine calls with at least one prompt of this process


@dataclass
class _Active:
    index: int
    trajectory: Trajectory
    searches_left: int
    turns_left: int
    pending_query: str | None = None
    context: list[int] = field(default_factory=list)


class AgentLoop:
    """Runs batches of search-augmented rollouts with any `GenerationEngine` and any `Searcher`."""

    def __init__(
        self,
        engine: GenerationEngine,
        searcher: Searcher,
        config: RolloutSettings = RolloutSettings(),
        template: PromptTemplate | None = None,
    ) -> None:
        self.engine = engine
        self.searcher = searcher
        self.config = config
        self.template = template or PromptTemplate.load()
        self.tokenizer = engine.tokenizer
        self._doc_open = self._encode(protocol.DOCUMENTS_OPEN)
        self._doc_close = self._encode(protocol.DOCUMENTS_CLOSE)
        self._feedback = self._encode(protocol.CORRECTION_MESSAGE)
        self._eos = engine.tokenizer.eos_token_id
        self.last_timings = RolloutTimings()

    def _encode(self, text: str) -> list[int]:
        """Ids of inserted text: a document spelling `<|im_end|>` must not end the turn."""
        return protocol.encode_text(self.tokenizer, text)

    def prompt_ids(self, question: str) -> list[int]:
        """Token ids of the full prompt for one question (its text never becomes a control token)."""
        return protocol.prompt_ids(question, self.tokenizer, self.template, self.config.topk)

    def run(self, questions: Sequence[str], params: SamplingParams) -> list[Trajectory]:
        """One trajectory per question (repeat a question to sample a group)."""
        return self.run_prompt_ids([self.prompt_ids(q) for q in questions], params)

    def run_prompt_ids(self, prompts: Sequence[list[int]], params: SamplingParams) -> list[Trajectory]:
        """One trajectory per already-tokenized prompt."""
        timings = RolloutTimings()
        cfg = self.config
        active = [
            _Active(i, Trajectory(prompt_ids=list(p)), cfg.max_turns, cfg.max_turns + 1, context=list(p))
            for i, p in enumerate(prompts)
        ]
        done: list[_Active] = []
        lockstep = getattr(self.engine, "lockstep", None)
        failure: Exception | None = None
        while True:
            if lockstep is None:
                if not active:
                    break
            elif not lockstep.next_turn(bool(active), failure):
                break
            started = time.perf_counter()
            # One slot stays free so a finished trajectory can always end with EOS.
            budgets = [min(cfg.max_new_tokens, self._room(a) - 1) for a in active]
            try:
                generations = self.engine.generate(
                    [a.context for a in active], budgets, params, protocol.STOP_STRINGS
                )
            except Exception as err:
                failure = engine_failure(err)
                if lockstep is None:
                    raise failure from err
                continue  # the next exchange raises it on every process, none is left waiting for this one
            timings.generation_s += time.perf_counter() - started
            timings.turns += 1 if active else 0
            try:
                self._act(active, generations, timings)
            except Exception as err:
                if lockstep is None:
                    raise
                failure = err  # (a lost retriever, most likely) the next exchange raises it on every process
                continue
            still = []
            for a in active:
                (done if a.trajectory.finish_reason is not None else still).append(a)
            active = still
        # An engine may keep the last turn's KV cache for the next one; nothing continues these rollouts.
        release = getattr(self.engine, "release_cache", None)
        if release is not None:
            release()
        self.last_timings = timings
        return [a.trajectory for a in sorted(done, key=lambda a: a.index)]

    def _act(self, active: list[_Active], generations: list[Generation], timings: RolloutTimings) -> None:
        """Append each turn, then answer, search, correct or stop; searches of the turn go in one batch."""
        searching: list[_Active] = []
        for a, gen in zip(active, generations, strict=True):
            text = self._append(a, "model", gen.token_ids, gen.logprobs, gen.entropies)
            a.trajectory.num_turns += 1
            a.turns_left -= 1
            action = protocol.parse_action(text)
            if action is not None and action.kind == protocol.ANSWER:
                self._finish(a, FinishReason.ANSWER)
            elif gen.finish == "eos":
                self._finish(a, FinishReason.NO_ACTION)
            elif self._room(a) <= 1:
                self._finish(a, FinishReason.LENGTH)
            elif action is not None and a.searches_left > 0 and a.turns_left > 0:
                a.pending_query = action.content
                searching.append(a)
            elif action is not None:
                self._finish(a, FinishReason.MAX_TURNS)
            elif a.turns_left > 0:
                self._insert(a, "feedback", self._feedback)
            else:
                self._finish(a, FinishReason.NO_ACTION)
        if not searching:
            return
        started = time.perf_counter()
        results = self.searcher.search([a.pending_query or "" for a in searching], topk=self.config.topk)
        timings.retrieval_s += time.perf_counter() - started
        for a, docs in zip(searching, results, strict=True):
            a.trajectory.queries.append(a.pending_query or "")
            a.trajectory.retrieved_ids.append([d.id for d in docs])
            a.searches_left -= 1
            a.pending_query = None
            self._insert(a, "documents", self._documents_ids(docs))

    def _documents_ids(self, docs: list[Document]) -> list[int]:
        body = self._encode(protocol.format_documents(docs))[: self.config.max_obs_tokens]
        return self._doc_open + body + self._doc_close

    def _room(self, a: _Active) -> int:
        return self.config.max_completion_tokens - len(a.trajectory.completion_ids)

    def _append(
        self,
        a: _Active,
        kind: SegmentKind,
        ids: list[int],
        logprobs: list[float] | None = None,
        entropies: list[float] | None = None,
    ) -> str:
        """Add tokens to the trajectory and the model's context; returns their text."""
        t = a.trajectory
        start = len(t.completion_ids)
        t.completion_ids += ids
        a.context += ids
        t.env_mask += [1 if kind == "model" else 0] * len(ids)
        t.logprobs += list(logprobs) if logprobs is not None else [0.0] * len(ids)
        t.entropies += list(entropies) if entropies is not None else [math.nan] * len(ids)
        # Model text drops special tokens (an EOS is no part of an answer); environment text is kept verbatim.
        text = self.tokenizer.decode(ids, skip_special_tokens=kind == "model")
        t.segments.append(Segment(kind, text, start, start + len(ids)))
        return text

    def _insert(self, a: _Active, kind: SegmentKind, ids: list[int]) -> None:
        """Append environment tokens, cut to the completion budget; a trajectory that fills it ends as LENGTH."""
        room = self._room(a) - 1
        self._append(a, kind, ids[: max(room, 0)])
        if room <= len(ids):
            self._finish(a, FinishReason.LENGTH)

    def _finish(self, a: _Active, reason: FinishReason) -> None:
        t = a.trajectory
        t.finish_reason = reason
        # TRL treats a completion whose last id is not EOS as truncated; only LENGTH really is.
        ends_with_eos = bool(t.completion_ids) and t.completion_ids[-1] in self.engine_eos_ids
        if reason != FinishReason.LENGTH and not ends_with_eos and self._room(a) > 0:
            self._append(a, "eos", [self._eos])

    @property
    def engine_eos_ids(self) -> set[int]:
        """Ids that count as end of sequence."""
        return getattr(self.engine, "eos_ids", {self._eos})
