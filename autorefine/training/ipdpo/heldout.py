"""IP-DPO's held-out evaluation: a saved policy, greedy, on held-out questions split across processes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from autorefine.data import Question
from autorefine.evaluation.predictions import Prediction, aggregate


@dataclass(frozen=True)
class RoundHeldoutSettings:
    """Greedy evaluation on held-out questions after every IP-DPO round and of the starting policy (the
    `heldout` section of an IP-DPO run)."""

    file: str | None = None  # FlashRAG questions; None: no held-out evaluation
    limit: int | None = None  # use only the first N questions
    batch_size: int = 64
    evaluate_start: bool = True  # also evaluate the starting policy (round 0), the baseline of every round


def hop_metrics(questions: Sequence[Question], predictions: Sequence[Prediction]) -> dict[str, float]:
    """EM and searches per hop count, for questions whose metadata says how many hops they need."""
    # Multi-hop data says how many hops each question needs: searches per hop count show wasted steps.
    hops = {q.id: q.metadata.get("hops") for q in questions}
    out: dict[str, float] = {}
    for count in sorted({h for h in hops.values() if isinstance(h, int)}):
        group = [p for p in predictions if hops.get(p.id) == count]
        out[f"em_{count}hop"] = sum(p.scores["em"] for p in group) / len(group)
        out[f"searches_{count}hop"] = sum(p.searches for p in group) / len(group)
    return out


def heldout_metrics(questions: Sequence[Question], predictions: Sequence[Prediction]) -> dict[str, float]:
    """Aggregate metrics of every prediction, plus the per-hop ones."""
    return {**aggregate(predictions), **hop_metrics(questions, predictions)}
