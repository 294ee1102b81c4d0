"""The small interface every generation engine implements, and the stop logic they share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

GenerationFinish = Literal["stop", "eos", "length"]


class GenerationError(RuntimeError):
    """The generation engine failed during a turn (a vLLM server's error answer, an exception inside it)."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. `temperature == 0` means greedy decoding; every engine applies every field."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    min_p: float = 0.0  # 0: no min-p filter
    repetition_penalty: float = 1.0  # 1: none; both engines penalize prompt and generated tokens
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        """True when decoding takes the arg-max token."""
        return self.temperature == 0


@dataclass
class Generation:
    """One continuation: the sampled ids, their log-probs, and what stopped it.

    `entropies[i]` is the entropy (nats) of the whole next-token distribution the engine sampled token i from,
    at the sampling temperature; None when the engine cannot see that distribution (vLLM returns only top-k
    log-probs).
    """

    token_ids: list[int]
    logprobs: list[float]
    finish: GenerationFinish
    entropies: list[float] | None = None


class GenerationEngine(Protocol):
    """Continues many token sequences at once, each until a stop string, EOS or its own token budget.

    An engine that must be called by every process of a group each turn also has a `lockstep`
    (`autorefine.rollout.lockstep.Lockstep`); `AgentLoop` then keeps the processes in step.
    """

    tokenizer: PreTrainedTokenizerBase

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: Sequence[int],
        params: SamplingParams,
        stop: Sequence[str],
    ) -> list[Generation]:
        """One `Generation` per prompt, in order."""
        ...


def eos_token_ids(
    tokenizer: PreTrainedTokenizerBase, generation_eos: int | Sequence[int] | None = None
) -> set[int]:
    """Every id that ends a generation: the tokenizer's EOS plus the model's generation-config EOS ids."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    if isinstance(generation_eos, int):
        ids.add(generation_eos)
    elif generation_eos is not None:
        ids.update(generation_eos)
    if not ids:
        raise ValueError("the tokenizer has no EOS token and none was given")
    return ids


def finish_generation(
    token_ids: Sequence[int],
    logprobs: Sequence[float],
    budget: int,
    stop: Sequence[str],
    eos_ids: set[int],
    tokenizer: PreTrainedTokenizerBase,
    entropies: Sequence[float] | None = None,
) -> Generation:
    """Cut raw engine output at the first stop string or EOS (inclusive), else at `budget` tokens.

    Engines may run past a row's own stop (batched decoding pads finished rows, a server applies one
    max_tokens to all); this is the single place that decides where each continuation really ends.
    """
    ids = list(token_ids[:budget])
    eos_at = next((i for i, t in enumerate(ids) if t in eos_ids), None)
    searched = ids if eos_at is None else ids[:eos_at]
    cut = _stop_position(searched, stop, tokenizer)
    if cut is not None:
        end, finish = cut, "stop"
    elif eos_at is not None:
        end, finish = eos_at + 1, "eos"
    else:
        end, finish = len(ids), "length"
    return Generation(
        token_ids=ids[:end],
        logprobs=[float(x) for x in logprobs[:end]],
        finish=finish,
        entropies=None if entropies is None else [float(x) for x in entropies[:end]],
    )


def _stop_position(ids: list[int], stop: Sequence[str], tokenizer: PreTrainedTokenizerBase) -> int | None:
    """Smallest n such that the first n tokens decode to text containing a stop string, or None."""
    if not stop or not ids:
        return None

    def contains_stop(n: int) -> bool:
        text = tokenizer.decode(ids[:n], skip_special_tokens=False)
        return any(s in text for s in stop)

    if not contains_stop(len(ids)):
        return None
    # Containment only grows with n, so bisect instead of decoding every prefix.
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if contains_stop(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo
