"""What one multi-turn rollout produced: exact token ids, which of them the model sampled, and why it ended."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, Literal

from autorefine.protocol import ANSWER, REFINE, Action, block_sequence, find_blocks, parse_action

SegmentKind = Literal["model", "documents", "feedback", "eos"]


class FinishReason(StrEnum):
    """Why a trajectory ended."""

    ANSWER = "answer"  # the model gave a final answer
    MAX_TURNS = "max_turns"  # it still wanted to search when the turn budget was spent
    LENGTH = "length"  # the completion token budget ran out
    NO_ACTION = "no_action"  # it stopped (EOS) or ran out of turns without a usable action


@dataclass(frozen=True)
class Segment:
    """A run of completion tokens from one source; `start:end` indexes `completion_ids`."""

    kind: SegmentKind
    text: str
    start: int
    end: int

    @property
    def is_model(self) -> bool:
        """True for tokens the model sampled."""
        return self.kind == "model"


@dataclass(frozen=True)
class Turn:
    """One model turn read on its own, exactly as the agent loop read it: text, accepted action, refines.

    Nothing is parsed across an inserted block, so a tag opened in one turn and closed in the next (around
    documents or a corrective message) is no block at all.
    """

    text: str
    action: Action | None  # the search or answer the loop acted on; None: the turn had no usable action
    refines: tuple[str, ...]  # bodies of the turn's complete refine blocks
    searches_before: int  # searches run before this turn (its refines distil search number `searches_before`)

    @property
    def tags(self) -> list[str]:
        """Tags of the turn's complete think/search/refine/answer blocks, in order."""
        return block_sequence(self.text)


@dataclass(frozen=True)
class SearchStep:
    """One search: its query, the documents block it inserted, and the refines the model wrote after reading it."""

    query: str
    documents: str
    refines: tuple[str, ...]


@dataclass
class Trajectory:
    """One rollout. `env_mask[i]` is 1 where the model sampled `completion_ids[i]` and 0 where the environment did.

    `entropies[i]` is the entropy of the distribution token i was sampled from (NaN for environment tokens and
    for engines that cannot see the whole distribution, such as vLLM).
    """

    prompt_ids: list[int]
    completion_ids: list[int] = field(default_factory=list)
    env_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    queries: list[str] = field(default_factory=list)
    retrieved_ids: list[list[str]] = field(default_factory=list)
    num_turns: int = 0
    finish_reason: FinishReason | None = None

    @property
    def num_searches(self) -> int:
        """Searches actually run."""
        return len(self.queries)

    @property
    def model_text(self) -> str:
        """Everything the model wrote, with no environment text in between."""
        return "".join(s.text for s in self.segments if s.is_model)

    @property
    def documents_text(self) -> str:
        """Everything the retriever inserted."""
        return "".join(s.text for s in self.segments if s.kind == "documents")

    @property
    def turns(self) -> list[Turn]:
        """Every model turn, parsed on its own with the agent loop's `parse_action`."""
        turns, searches = [], 0
        for segment in self.segments:
            if segment.kind == "documents":
                searches += 1
            elif segment.is_model:
                refines = tuple(find_blocks(segment.text, REFINE))
                turns.append(Turn(segment.text, parse_action(segment.text), refines, searches))
        return turns

    @property
    def answer(self) -> str | None:
        """The answer the agent loop accepted (the action that ended the trajectory), or None."""
        return next((t.action.content for t in self.turns if t.action and t.action.kind == ANSWER), None)

    @property
    def refine_texts(self) -> list[str]:
        """Bodies of the model's refine blocks, turn by turn."""
        return [refine for turn in self.turns for refine in turn.refines]

    @property
    def block_tags(self) -> list[str]:
        """Tags of the model's complete blocks, turn by turn (for the format check)."""
        return [tag for turn in self.turns for tag in turn.tags]

    @property
    def steps(self) -> list[SearchStep]:
        """Each search with its documents and the refines written after reading them (before the next search)."""
        documents = [s.text for s in self.segments if s.kind == "documents"]
        turns = self.turns
        return [
            SearchStep(
                query,
                documents[i] if i < len(documents) else "",
                tuple(r for t in turns if t.searches_before == i + 1 for r in t.refines),
            )
            for i, query in enumerate(self.queries)
        ]

    @property
    def num_model_tokens(self) -> int:
        """Tokens the model sampled."""
        return sum(self.env_mask)

    @property
    def num_env_tokens(self) -> int:
        """Tokens the environment inserted."""
        return len(self.env_mask) - sum(self.env_mask)

    def tokens_of(self, kind: SegmentKind) -> int:
        """Number of completion tokens in segments of one kind."""
        return sum(s.end - s.start for s in self.segments if s.kind == kind)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view (token ids and log-probs omitted), for predictions files and logs."""
        return {
            "segments": [asdict(s) for s in self.segments],
            "queries": self.queries,
            "retrieved_ids": self.retrieved_ids,
            "num_searches": self.num_searches,
            "num_turns": self.num_turns,
            "finish_reason": str(self.finish_reason),
            "model_tokens": self.num_model_tokens,
            "document_tokens": self.tokens_of("documents"),
            "answer": self.answer,
        }
