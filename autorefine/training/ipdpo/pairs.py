"""Preference pairs from scored samples: one chosen trajectory per question against typed negatives.

For each question, its K sampled trajectories are ranked on (format, outcome, process, fewer model tokens) —
the `ranking` keys, in order. The chosen one is the best that clears every threshold of a ranked score; the
rejected ones rank strictly below it and are typed:

- `weaker`: well-formed and correct, but a process score lower by at least `min_process_gap` (more steps,
  or steps that gathered less of the evidence): weaker but plausible;
- `wrong`: well-formed, with an outcome under `min_outcome`;
- `malformed`: breaks the protocol or ends without an answer (format under `min_format`).

A pair keeps both trajectories' exact token ids and environment masks, as they were sampled. Pair files are
JSONL with one pair per line, each side a trajectory row (`prompt_ids`, `completion_ids`, `env_mask`, and
`scores`); `read_pairs` checks pairs made anywhere before anything trains on them.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

RankKey = Literal["format", "outcome", "process", "tokens"]
NegativeType = Literal["weaker", "wrong", "malformed"]
NEGATIVE_TYPES: tuple[NegativeType, ...] = ("weaker", "wrong", "malformed")

# Why a question gave no pair.
NO_SAMPLE_CLEARS = "none_clears_thresholds"
ALL_TIED = "all_tied"
NO_NEGATIVE = "no_eligible_negative"
SKIP_REASONS = (NO_SAMPLE_CLEARS, ALL_TIED, NO_NEGATIVE)


class PairError(ValueError):
    """A pair or samples file is malformed; the message names the file, the line and the question id."""


@dataclass(frozen=True)
class PairSettings:
    """How chosen and rejected trajectories are picked (the `pairs` section of an IP-DPO run)."""

    ranking: list[RankKey] = field(default_factory=lambda: ["format", "outcome", "process", "tokens"])
    min_format: float = 1.0  # follows the protocol and ends with an answer
    min_outcome: float = 0.5  # answer F1 (or the configured outcome metric)
    min_process: float = 0.0  # evidence coverage per step
    min_process_gap: float = 0.1  # a correct negative must trail the chosen one's process score by this much
    max_pairs_per_question: int = 2
    negative_types: list[NegativeType] = field(default_factory=lambda: list(NEGATIVE_TYPES))
    min_pairs: int = 8  # a round with fewer pairs stops instead of training on (almost) nothing
    file: str | None = None  # train the first round on these pairs instead of sampling

    def __post_init__(self) -> None:
        if not self.ranking or len(set(self.ranking)) != len(self.ranking):
            raise ValueError(f"pairs.ranking must list distinct keys, got {self.ranking}")
        if "outcome" not in self.ranking:
            raise ValueError("pairs.ranking must include 'outcome': a pair has to prefer the right answer")
        unknown = set(self.negative_types) - set(NEGATIVE_TYPES)
        if unknown or not self.negative_types:
            raise ValueError(
                f"pairs.negative_types must be among {list(NEGATIVE_TYPES)}, got {self.negative_types}"
            )
        if self.max_pairs_per_question < 1:
            raise ValueError("pairs.max_pairs_per_question must be at least 1")
        if self.min_pairs < 1:
            raise ValueError("pairs.min_pairs must be at least 1")

    def thresholds(self) -> dict[str, float]:
        """The threshold of every ranked score."""
        limits = {"format": self.min_format, "outcome": self.min_outcome, "process": self.min_process}
        return {key: limits[key] for key in self.ranking if key in limits}


@dataclass(frozen=True)
class Selection:
    """One question's outcome: the chosen sample and its negatives, or why there is no pair."""

    chosen: int | None
    rejected: list[tuple[int, NegativeType]]
    skipped: str | None = None


def rank_key(scores: Mapping[str, float], ranking: Sequence[RankKey]) -> tuple[float, ...]:
    """Larger is better: the ranked scores in order, fewer model tokens for `tokens`."""
    return tuple(-float(scores["model_tokens"]) if key == "tokens" else float(scores[key]) for key in ranking)


def negative_type(scores: Mapping[str, float], settings: PairSettings) -> NegativeType:
    """What kind of negative a trajectory would be."""
    if scores["format"] < settings.min_format:
        return "malformed"
    if scores["outcome"] < settings.min_outcome:
        return "wrong"
    return "weaker"


def select_pairs(
    scores: Sequence[Mapping[str, float]],
    settings: PairSettings,
    completions: Sequence[Sequence[int]] | None = None,
) -> Selection:
    """Pick the chosen sample and up to `max_pairs_per_question` typed negatives among one question's samples.

    `completions` (the sampled ids) make identical samples count as one; ties on every ranked key are never
    a pair.
    """
    keys = [rank_key(s, settings.ranking) for s in scores]
    limits = settings.thresholds()
    clearing = [i for i, s in enumerate(scores) if all(s[k] >= v for k, v in limits.items())]
    if not clearing:
        return Selection(None, [], NO_SAMPLE_CLEARS)
    chosen = max(clearing, key=lambda i: (keys[i], -i))  # the first of equally ranked samples
    below = [i for i in range(len(scores)) if keys[i] < keys[chosen]]
    if completions is not None:
        below = [i for i in below if list(completions[i]) != list(completions[chosen])]
    if not below:
        return Selection(chosen, [], ALL_TIED)

    by_type: dict[NegativeType, list[int]] = {t: [] for t in NEGATIVE_TYPES}
    for i in below:
        kind = negative_type(scores[i], settings)
        if kind == "weaker" and not _weaker_enough(scores[i], scores[chosen], settings):
            continue
        by_type[kind].append(i)
    # Clearest contrast first: the worst-ranked negative of each type.
    queues = [sorted(by_type[t], key=lambda i: (keys[i], i)) for t in settings.negative_types]
    picked: list[tuple[int, NegativeType]] = []
    seen: list[Sequence[int]] = []
    while len(picked) < settings.max_pairs_per_question and any(queues):
        for kind, queue in zip(settings.negative_types, queues, strict=True):
            if not queue or len(picked) >= settings.max_pairs_per_question:
                continue
            i = queue.pop(0)
            if completions is not None:
                if any(list(completions[i]) == list(s) for s in seen):
                    continue
                seen.append(completions[i])
            picked.append((i, kind))
    if not picked:
        return Selection(chosen, [], NO_NEGATIVE)
    return Selection(chosen, picked)


def _weaker_enough(
    candidate: Mapping[str, float], chosen: Mapping[str, float], settings: PairSettings
) -> bool:
    # A correct, well-formed negative is only a pair when the process score says it gathered less per step;
    # without the process score (the outcome-only ablation) correct samples are ties, never negatives.
    if "process" not in settings.ranking:
        return False
    return chosen["process"] - candidate["process"] >= settings.min_process_gap - 1e-9


# --- building pairs from a samples file -------------------------------------------------------------------


@dataclass
class PairStats:
    """What pair building found, for the round's logs."""

    questions: int = 0
    samples: int = 0
    pairs: int = 0
    by_type: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    chosen: dict[str, float] = field(default_factory=dict)  # mean scores of the chosen side of every pair
    rejected: dict[str, float] = field(default_factory=dict)
    rejected_by_type: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def skip_rate(self) -> float:
        """Share of questions that gave no pair."""
        return sum(self.skipped.values()) / self.questions if self.questions else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "questions": self.questions,
            "samples": self.samples,
            "pairs": self.pairs,
            "by_type": {
                t: self.by_type.get(t, 0)
                for t in (*NEGATIVE_TYPES, *sorted(set(self.by_type) - set(NEGATIVE_TYPES)))
            },
            "skipped": {r: self.skipped.get(r, 0) for r in SKIP_REASONS},
            "skip_rate": self.skip_rate,
            "chosen": self.chosen,
            "rejected": self.rejected,
            "rejected_by_type": self.rejected_by_type,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PairStats:
        """Inverse of `to_dict`."""
        return cls(
            questions=data["questions"],
            samples=data["samples"],
            pairs=data["pairs"],
            by_type=Counter(data["by_type"]),
            skipped=Counter(data["skipped"]),
            chosen=dict(data["chosen"]),
            rejected=dict(data["rejected"]),
            rejected_by_type={k: dict(v) for k, v in data.get("rejected_by_type", {}).items()},
        )


SIDE_KEYS = ("prompt_ids", "completion_ids", "env_mask")
QUESTION_KEYS = ("id", "question", "golden_answers", "round", "rank")  # kept once per pair, not per side


def pair_row(question_id: str, kind: str, chosen: Mapping[str, Any], rejected: Mapping[str, Any]) -> dict:
    """One pair as written to pairs.jsonl: each side keeps the sample's exact ids, mask, scores and text."""

    def side(row: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in row.items() if k not in QUESTION_KEYS}

    return {
        "id": question_id,
        "type": kind,
        "question": chosen.get("question", ""),
        "golden_answers": chosen.get("golden_answers", []),
        "chosen": side(chosen),
        "rejected": side(rejected),
    }


def question_groups(rows: Iterable[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    """Consecutive rows of the same question id (samples files keep each question's samples together)."""
    group: list[dict[str, Any]] = []
    for row in rows:
        if group and row["id"] != group[0]["id"]:
            yield group
            group = []
        group.append(row)
    if group:
        yield group


def build_pairs(
    sample_rows: Iterable[dict[str, Any]], settings: PairSettings
) -> tuple[list[dict[str, Any]], PairStats]:
    """Pairs from sample rows (grouped by question, each with `scores`), and what building them found."""
    pairs: list[dict[str, Any]] = []
    questions = samples = 0
    skipped: Counter[str] = Counter()
    for group in question_groups(sample_rows):
        questions += 1
        samples += len(group)
        selection = select_pairs([g["scores"] for g in group], settings, [g["completion_ids"] for g in group])
        if selection.skipped:
            skipped[selection.skipped] += 1
            continue
        chosen = group[selection.chosen]  # type: ignore[index]
        pairs += [pair_row(chosen["id"], kind, chosen, group[index]) for index, kind in selection.rejected]
    stats = stats_of_pairs(pairs)
    stats.questions, stats.samples, stats.skipped = questions, samples, skipped
    return pairs, stats


def stats_of_pairs(pairs: Sequence[Mapping[str, Any]]) -> PairStats:
    """Counts by negative type and mean scores of each side (scores are optional in pairs made elsewhere)."""
    sums: dict[str, Counter[str]] = {"chosen": Counter(), "rejected": Counter()}
    type_sums: dict[str, Counter[str]] = {}
    by_type: Counter[str] = Counter()
    for pair in pairs:
        kind = pair.get("type", "unknown")
        by_type[kind] += 1
        sums["chosen"].update(_summary_scores(pair["chosen"].get("scores", {})))
        sums["rejected"].update(_summary_scores(pair["rejected"].get("scores", {})))
        type_sums.setdefault(kind, Counter()).update(_summary_scores(pair["rejected"].get("scores", {})))
    n = len(pairs)
    return PairStats(
        questions=len({p["id"] for p in pairs}),
        pairs=n,
        by_type=by_type,
        chosen={k: v / n for k, v in sums["chosen"].items()},
        rejected={k: v / n for k, v in sums["rejected"].items()},
        rejected_by_type={t: {k: v / by_type[t] for k, v in c.items()} for t, c in type_sums.items()},
    )


def _summary_scores(scores: Mapping[str, float]) -> dict[str, float]:
    keys = ("format", "outcome", "process", "coverage", "steps", "model_tokens", "em")
    return {k: float(scores[k]) for k in keys if k in scores}


def pair_text(side: Mapping[str, Any]) -> str:
    """A trajectory for reading: each segment tagged with its source (model, documents, feedback)."""
    segments = side.get("segments")
    if not segments:
        return (
            f"({len(side['completion_ids'])} completion tokens, {sum(side['env_mask'])} sampled by the model)"
        )
    return "".join(f"[{s['kind']}] {s['text']}\n" for s in segments if s["kind"] != "eos").rstrip()


def too_few_pairs_message(stats: PairStats, settings: PairSettings, where: str) -> str:
    """Why a round has fewer than `min_pairs` pairs, and what to change."""
    limits = ", ".join(f"{k} ≥ {v:g}" for k, v in settings.thresholds().items())
    lines = [
        f"{where}: {stats.pairs} pairs from {stats.questions} questions × their samples "
        f"(pairs.min_pairs = {settings.min_pairs}); not training on so little.",
    ]
    if stats.skipped[NO_SAMPLE_CLEARS]:
        lines.append(
            f"- {stats.skipped[NO_SAMPLE_CLEARS]} questions had no sample clearing the thresholds ({limits}): "
            "the policy is too weak for them; lower pairs.min_outcome / pairs.min_process, or warm-start longer."
        )
    if stats.skipped[ALL_TIED]:
        lines.append(
            f"- {stats.skipped[ALL_TIED]} questions had every sample tied with the best one: raise "
            "sampling.temperature or sampling.samples_per_question."
        )
    if stats.skipped[NO_NEGATIVE]:
        lines.append(
            f"- {stats.skipped[NO_NEGATIVE]} questions had only near-ties as negatives: lower "
            f"pairs.min_process_gap ({settings.min_process_gap:g}) or allow more pairs.negative_types."
        )
    return "\n".join(lines)


# --- reading and writing ----------------------------------------------------------------------------------


def read_pairs(path: str | Path) -> Iterator[dict[str, Any]]:
    """Pairs of a pairs file, each checked (see `check_pair`); a file with none is an error."""
    path = Path(path)
    if not path.is_file():
        raise PairError(f"pairs file not found: {path}")
    count = 0
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise PairError(
                    f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})"
                ) from None
            check_pair(row, f"{path}:{number}")
            count += 1
            yield row
    if count == 0:
        raise PairError(f"{path} holds no pairs")


def check_pair(row: Any, where: str) -> None:
    """Raise PairError naming `where` and the id unless `row` is a usable pair."""
    if not isinstance(row, dict):
        raise PairError(f"{where}: expected a JSON object, got {type(row).__name__}")
    label = f"{where} (id {row.get('id', '?')})"
    for side in ("chosen", "rejected"):
        data = row.get(side)
        if not isinstance(data, dict):
            raise PairError(f"{label}: missing '{side}' (an object with {', '.join(SIDE_KEYS)})")
        for key in SIDE_KEYS:
            values = data.get(key)
            if not isinstance(values, list) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in values
            ):
                raise PairError(f"{label}: '{side}.{key}' must be a list of integers")
        ids, mask = data["completion_ids"], data["env_mask"]
        if len(mask) != len(ids):
            raise PairError(
                f"{label}: '{side}.env_mask' has {len(mask)} entries for {len(ids)} completion ids"
            )
        if any(m not in (0, 1) for m in mask):
            raise PairError(f"{label}: '{side}.env_mask' may hold only 0 (environment) and 1 (model)")
        if not any(mask):
            raise PairError(f"{label}: '{side}.env_mask' marks no model token: nothing to compare")
        if not data["prompt_ids"]:
            raise PairError(f"{label}: '{side}.prompt_ids' is empty")
    chosen, rejected = row["chosen"], row["rejected"]
    if chosen["prompt_ids"] != rejected["prompt_ids"]:
        first = next(
            (
                i
                for i, (a, b) in enumerate(zip(chosen["prompt_ids"], rejected["prompt_ids"], strict=False))
                if a != b
            ),
            min(len(chosen["prompt_ids"]), len(rejected["prompt_ids"])),
        )
        raise PairError(
            f"{label}: chosen and rejected start from different prompts (first difference at prompt token {first})"
        )
    if chosen["completion_ids"] == rejected["completion_ids"] and chosen["env_mask"] == rejected["env_mask"]:
        raise PairError(f"{label}: chosen and rejected are the same trajectory")
