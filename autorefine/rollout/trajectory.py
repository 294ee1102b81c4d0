"""What one multi-turn rollout produced: exact token ids, which of them the model sampled, and why it ended."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, Literal

from autorefine.protocol import REFINE, final_answer, find_blocks

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


@dataclass
class Trajectory:
    """One rollout. `env_mask[i]` is 1 where the model sampled `completion_ids[i]` and 0 where the environment did."""

    prompt_ids: list[int]
    completion_ids: list[int] = field(default_factory=list)
    env_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
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
    def answer(self) -> str | None:
        """The model's final answer, if it gave one."""
        return final_answer(self.model_text)

    @property
    def refine_texts(self) -> list[str]:
        """Bodies of the model's refine blocks."""
        return find_blocks(self.model_text, REFINE)

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
