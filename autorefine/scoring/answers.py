"""Answer metrics (the one copy rewards, ESC, traces and evaluation use): normalize, EM, F1, cover-EM."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
# Special answers that only match themselves: partial token overlap with "yes" is meaningless.
_CLOSED_ANSWERS = frozenset({"yes", "no", "noanswer"})


def normalize_answer(text: str) -> str:
    """Lowercase, drop ASCII punctuation, drop the words a/an/the, collapse whitespace."""
    text = text.lower().translate(_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _golds(golds: str | Sequence[str]) -> list[str]:
    return [golds] if isinstance(golds, str) else list(golds)


def exact_match(pred: str | None, golds: str | Sequence[str]) -> float:
    """1.0 when the normalized prediction equals some normalized gold answer that is not empty."""
    if pred is None:
        return 0.0
    p = normalize_answer(pred)
    return float(any((g := normalize_answer(gold)) and p == g for gold in _golds(golds)))


def cover_exact_match(pred: str | None, golds: str | Sequence[str]) -> float:
    """1.0 when some normalized gold answer is a substring of the normalized prediction."""
    if pred is None:
        return 0.0
    p = normalize_answer(pred)
    return float(any((g := normalize_answer(gold)) and g in p for gold in _golds(golds)))


def _token_f1(pred: str, gold: str) -> float:
    if (pred in _CLOSED_ANSWERS or gold in _CLOSED_ANSWERS) and pred != gold:
        return 0.0
    common = Counter(pred.split()) & Counter(gold.split())
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred.split())
    recall = overlap / len(gold.split())
    return 2 * precision * recall / (precision + recall)


def f1_score(pred: str | None, golds: str | Sequence[str]) -> float:
    """Token-level F1 between normalized prediction and gold, maximised over the gold answers."""
    if pred is None:
        return 0.0
    p = normalize_answer(pred)
    return max((_token_f1(p, normalize_answer(g)) for g in _golds(golds)), default=0.0)


def contains_answer(texts: Sequence[str], golds: str | Sequence[str]) -> float:
    """1.0 when some normalized gold answer is a substring of the texts joined by a space and normalized."""
    joined = normalize_answer(" ".join(texts))
    return float(any((g := normalize_answer(gold)) and g in joined for gold in _golds(golds)))


def refine_hit(refine_texts: Sequence[str], golds: str | Sequence[str]) -> float:
    """1.0 when the model's refine blocks contain a gold answer (the AutoRefine refine reward)."""
    return contains_answer(refine_texts, golds)
