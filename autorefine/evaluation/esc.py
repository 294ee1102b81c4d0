"""Early-stopping self-consistency (ESC, arXiv 2401.10480) for search-augmented QA.

Self-consistency draws many whole trajectories per question and returns the majority answer. ESC draws them
in windows of `w` and stops a question at the first window whose `w` answers agree, so an easy question
costs one window instead of the full budget of `L` samples — and, here, one window's searches and tokens.

The module knows nothing about models or retrievers: the caller supplies `sample(question_indices)`, which
returns one finished trajectory per index, and any object with an `answer` attribute will do. Answers are
compared after `normalize_answer`, the normalization of exact match.

Rules, for one question:
- An answer that is missing or normalizes to the empty string is invalid: it never agrees and never votes.
- Only a full window of `w` samples can stop a question, and only when all its answers are valid and equal;
  the answer is then that window's answer, even when the window is the last one the budget allows.
- When no window agrees, all `L` samples are drawn and the answer is the majority over the valid ones.
  Ties go to the answer that reached the winning count first in sampling order.
- The returned text is the original (un-normalized) answer of the first sample in the winning class.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from autorefine.scoring.answers import normalize_answer


class Sample(Protocol):
    """One whole trajectory as ESC sees it: only its final answer matters."""

    # A read-only property, so frozen dataclasses and other immutable trajectories satisfy the protocol.
    @property
    def answer(self) -> str | None: ...


S = TypeVar("S", bound=Sample)

Sampler = Callable[[list[int]], Sequence[S]]


@dataclass(frozen=True)
class ESCSettings:
    """Window size `w`, sample budget `L` per question, and the temperature the caller should sample at."""

    window: int = 5
    max_samples: int = 40
    temperature: float = 0.7

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.max_samples < self.window:
            raise ValueError(f"max_samples must be >= window ({self.window}), got {self.max_samples}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")


@dataclass(frozen=True)
class ESCResult(Generic[S]):
    """The chosen answer of one question, how it was reached, and every sample drawn for it, in order."""

    answer: str | None
    samples_used: int
    # True when a window agreed and its answer was returned (possibly on the last window, saving nothing).
    stopped_early: bool
    windows: int
    votes: dict[str, int]  # normalized answer -> count, invalid answers excluded
    samples: list[S]
    max_samples: int


def normalized(answer: str | None) -> str | None:
    """The EM-normalized answer, or None when it is missing or normalizes to nothing."""
    if answer is None:
        return None
    return normalize_answer(answer) or None


def _unanimous(window: Sequence[Sample]) -> str | None:
    """The shared normalized answer when every answer of the window is valid and equal, else None."""
    answers = {normalized(s.answer) for s in window}
    if len(answers) != 1 or None in answers:
        return None
    return answers.pop()


def _majority(answers: Sequence[str | None]) -> str | None:
    """Most frequent valid answer; a tie goes to the answer whose count reached the maximum first."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    top = max(counts.values())
    running: Counter[str] = Counter()
    for a in answers:
        if a is not None:
            running[a] += 1
            if running[a] == top:
                return a
    raise AssertionError("unreachable: some answer reaches the top count")


def _draw(sample: Sampler[S], request: list[int]) -> list[S]:
    # The sampler gets its own copy: it may consume or reorder the list without confusing the bookkeeping.
    got = list(sample(list(request)))
    if len(got) != len(request):
        raise ValueError(f"sampler returned {len(got)} samples for {len(request)} requested")
    return got


def _result(samples: list[S], agreed: str | None, max_samples: int, window: int) -> ESCResult[S]:
    answers = [normalized(s.answer) for s in samples]
    winner = agreed if agreed is not None else _majority(answers)
    text = None
    if winner is not None:
        text = next(s.answer for s, a in zip(samples, answers, strict=True) if a == winner)
    return ESCResult(
        answer=text,
        samples_used=len(samples),
        stopped_early=agreed is not None,
        windows=-(-len(samples) // window),
        votes=dict(Counter(a for a in answers if a is not None)),
        samples=samples,
        max_samples=max_samples,
    )


def _check_num_questions(num_questions: int) -> None:
    if num_questions < 0:
        raise ValueError(f"num_questions must be >= 0, got {num_questions}")


def run_esc(num_questions: int, sample: Sampler[S], config: ESCSettings) -> list[ESCResult[S]]:
    """Early-stopping self-consistency over questions 0..num_questions-1, windows of all questions batched."""
    _check_num_questions(num_questions)
    drawn: list[list[S]] = [[] for _ in range(num_questions)]
    agreed: dict[int, str] = {}
    active = list(range(num_questions))
    # Active questions advance in lockstep, so one `sample` call per round carries every pending window;
    # with a batched engine a round costs about as much as its slowest trajectory.
    for start in range(0, config.max_samples, config.window):
        if not active:
            break
        size = min(config.window, config.max_samples - start)
        batch = _draw(sample, [q for q in active for _ in range(size)])
        still_active = []
        for k, q in enumerate(active):
            window = batch[k * size : (k + 1) * size]
            drawn[q].extend(window)
            # A partial last window never stops: one or two agreeing samples must not outvote the rest.
            answer = _unanimous(window) if size == config.window else None
            if answer is None:
                still_active.append(q)
            else:
                agreed[q] = answer
        active = still_active
    return [_result(drawn[q], agreed.get(q), config.max_samples, config.window) for q in range(num_questions)]


def run_sc(num_questions: int, sample: Sampler[S], max_samples: int) -> list[ESCResult[S]]:
    """Plain self-consistency: majority of `max_samples` samples per question, drawn in one batched call."""
    _check_num_questions(num_questions)
    if max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    if num_questions == 0:
        return []
    # One call with every question repeated max_samples times: nothing is gained by windows without a stop
    # rule, and a sampler that needs smaller batches can split the request itself.
    batch = _draw(sample, [q for q in range(num_questions) for _ in range(max_samples)])
    return [
        _result(batch[q * max_samples : (q + 1) * max_samples], None, max_samples, window=max_samples)
        for q in range(num_questions)
    ]


def _check_budget(window: int, max_samples: int) -> None:
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if max_samples < window:
        raise ValueError(f"max_samples must be >= window ({window}), got {max_samples}")


def agreement_probability(p: Sequence[float], window: int) -> float:
    """q = Σ p_j^w: the chance that one window of i.i.d. samples agrees (missing mass = invalid answers)."""
    if any(x < 0 for x in p) or sum(p) > 1 + 1e-9:
        raise ValueError(f"p must be non-negative and sum to at most 1, got {list(p)}")
    return sum(x**window for x in p)


def expected_samples_from_distribution(p: Sequence[float], window: int, max_samples: int) -> float:
    """Exact E[samples used by run_esc] for i.i.d. answers with valid-answer probabilities `p`."""
    _check_budget(window, max_samples)
    q = agreement_probability(p, window)
    k = max_samples // window
    remainder = max_samples - k * window
    # REFERENCE §4: stop at window i+1 with probability q(1-q)^i, or use all K windows when the first K-1 fail.
    full = sum((i + 1) * q * (1 - q) ** i for i in range(k - 1)) + k * (1 - q) ** (k - 1)
    # A budget that is not a multiple of w adds a partial window whenever all K full windows disagree.
    return window * full + remainder * (1 - q) ** k


def expected_samples(first_window_answers: Sequence[str | None], window: int, max_samples: int) -> float:
    """ESC's control estimate of E[samples]: p taken from the empirical answers of a first window."""
    if not first_window_answers:
        raise ValueError("first_window_answers must not be empty")
    counts = Counter(a for a in map(normalized, first_window_answers) if a is not None)
    n = len(first_window_answers)
    return expected_samples_from_distribution([c / n for c in counts.values()], window, max_samples)


def summarize(results: Sequence[ESCResult[S]]) -> dict[str, float]:
    """Mean samples used, mean saving against the budget (1 - used/L), early-stop rate."""
    if not results:
        raise ValueError("cannot summarize zero results")
    n = len(results)
    return {
        "questions": n,
        "mean_samples_used": sum(r.samples_used for r in results) / n,
        "mean_saving": sum(1 - r.samples_used / r.max_samples for r in results) / n,
        "early_stop_rate": sum(r.stopped_early for r in results) / n,
    }
