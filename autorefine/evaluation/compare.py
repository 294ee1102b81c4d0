"""`autorefine compare RUN_A RUN_B`: paired differences between two evaluations of the same questions.

For each dataset and over all questions, the mean of B minus the mean of A for EM, F1, valid format, searches
and model tokens, with a 95% paired-bootstrap confidence interval (question indices resampled with
replacement, the mean difference recomputed each time, the 2.5 and 97.5 percentiles reported), and how many
questions changed in each direction. Two evaluations of different question sets are refused: a difference
between them would mix the policies with the questions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from autorefine.evaluation.benchmark import PREDICTIONS_FILE, read_predictions
from autorefine.evaluation.policy import EvaluationError

# (key in a prediction's scores, label, shown as a percentage)
COMPARED: tuple[tuple[str, str, bool], ...] = (
    ("em", "EM", True),
    ("f1", "F1", True),
    ("format", "valid format", True),
    ("searches", "searches/q", False),
    ("model_tokens", "model tokens", False),
)
OVERALL = "all questions"


@dataclass(frozen=True)
class Difference:
    """One metric on one set of questions: A's and B's means, B − A with its 95% interval, who moved."""

    metric: str
    questions: int
    mean_a: float
    mean_b: float
    difference: float
    low: float
    high: float
    better: int  # questions where B's value is higher
    worse: int
    same: int

    @property
    def significant(self) -> bool:
        """True when the interval excludes 0."""
        return self.low > 0 or self.high < 0


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], *, samples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of b − a and the 2.5 / 97.5 percentiles of that mean over question indices drawn with replacement."""
    import numpy as np

    diff = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    if diff.size == 0:
        raise ValueError("no questions to compare")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, diff.size, size=(samples, diff.size))
    means = diff[draws].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), float(low), float(high)


def difference(metric: str, a: Sequence[float], b: Sequence[float], *, samples: int, seed: int) -> Difference:
    """The paired comparison of one metric over the same questions."""
    mean, low, high = paired_bootstrap(a, b, samples=samples, seed=seed)
    better = sum(y > x for x, y in zip(a, b, strict=True))
    worse = sum(y < x for x, y in zip(a, b, strict=True))
    return Difference(
        metric,
        len(a),
        sum(a) / len(a),
        sum(b) / len(b),
        mean,
        low,
        high,
        better,
        worse,
        len(a) - better - worse,
    )


def _rows(run: Path) -> dict[tuple[str, str], dict[str, Any]]:
    if not (run / PREDICTIONS_FILE).is_file():
        raise EvaluationError(
            f"{run} holds no {PREDICTIONS_FILE}: give the --out folder of `autorefine evaluate`"
        )
    return {(str(r["dataset"]), str(r["id"])): r for r in read_predictions(run)}


def _value(row: dict[str, Any], key: str) -> float:
    return float(row["searches"]) if key == "searches" else float(row["scores"].get(key, 0.0))


def compare_runs(
    run_a: Path, run_b: Path, *, samples: int = 2000, seed: int = 0
) -> dict[str, list[Difference]]:
    """Per dataset and over all questions: every compared metric, B − A, paired."""
    rows_a, rows_b = _rows(run_a), _rows(run_b)
    if set(rows_a) != set(rows_b):
        only_a, only_b = sorted(set(rows_a) - set(rows_b)), sorted(set(rows_b) - set(rows_a))
        example = (only_a or only_b)[0]
        raise EvaluationError(
            f"{run_a} and {run_b} hold different questions ({len(only_a)} only in the first, {len(only_b)} only "
            f"in the second, e.g. {example[0]}/{example[1]}): compare evaluations of the same question files"
        )
    keys = sorted(rows_a)
    groups: dict[str, list[tuple[str, str]]] = {}
    for key in keys:
        groups.setdefault(key[0], []).append(key)
    if len(groups) > 1:
        groups[OVERALL] = keys
    out: dict[str, list[Difference]] = {}
    for name, members in groups.items():
        out[name] = [
            difference(
                label,
                [_value(rows_a[k], metric) for k in members],
                [_value(rows_b[k], metric) for k in members],
                samples=samples,
                seed=seed,
            )
            for metric, label, _ in COMPARED
        ]
    return out


def markdown(result: dict[str, list[Difference]], name_a: str = "A", name_b: str = "B") -> str:
    """The comparison as a markdown table (rates in points, counts of questions that moved)."""
    percent = {label: pct for _, label, pct in COMPARED}
    lines = [
        f"| questions | metric | {name_a} | {name_b} | {name_b} − {name_a} | 95% CI | up / down / same |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for group, diffs in result.items():
        for d in diffs:
            scale, unit = (100.0, "") if percent[d.metric] else (1.0, "")
            mark = " *" if d.significant else ""
            lines.append(
                f"| {group} ({d.questions}) | {d.metric} | {scale * d.mean_a:.2f} | {scale * d.mean_b:.2f} | "
                f"{scale * d.difference:+.2f}{unit}{mark} | [{scale * d.low:+.2f}, {scale * d.high:+.2f}] | "
                f"{d.better} / {d.worse} / {d.same} |"
            )
    lines.append(
        "\n`*`: the 95% paired-bootstrap interval excludes 0. Rates (EM, F1, valid format) in points."
    )
    return "\n".join(lines)


def to_json(result: dict[str, list[Difference]], run_a: Path, run_b: Path, samples: int, seed: int) -> dict:
    """JSON-ready comparison."""
    return {
        "a": str(run_a),
        "b": str(run_b),
        "bootstrap": {"samples": samples, "seed": seed, "interval": 0.95},
        "groups": {
            g: [{**asdict(d), "significant": d.significant} for d in diffs] for g, diffs in result.items()
        },
    }
