"""Result tables of an evaluation: one row per dataset, then single-hop, multi-hop and overall averages."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from autorefine.evaluation.datasets import GROUPS
from autorefine.scoring.metrics import column_metrics

# Columns of aggregate-level numbers (per question, not per trajectory), after the metric columns.
SUMMARY_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("samples", "samples/q", "num2"),
    ("saving", "saved vs L", "pct"),
    ("compression", "docs/refine words", "num1"),
    ("finish_answer", "answered", "pct"),
    ("finish_max_turns", "max turns", "pct"),
    ("finish_length", "length", "pct"),
    ("finish_no_action", "no action", "pct"),
)
# Shown only for self-consistency runs (their rows have a `saving`); greedy draws one sample per question.
VOTING_ONLY = {"samples", "saving"}


def columns() -> list[tuple[str, str, str]]:
    """(metric key, column header, style) of every table column: n, each metric column, then the summaries."""
    metrics = [(m.name, m.column or m.name, m.style) for m in column_metrics()]
    return [("count", "n", "int"), *metrics, *SUMMARY_COLUMNS]


GROUP_LABELS = {"single_hop": "single-hop avg", "multi_hop": "multi-hop avg", "overall": "overall avg"}


def group_averages(per_dataset: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Macro averages (each dataset weighs the same, as papers report them); `count` is summed."""
    members = {group: [n for n in names if n in per_dataset] for group, names in GROUPS.items()}
    members["overall"] = list(per_dataset)
    out: dict[str, dict[str, Any]] = {}
    for group, names in members.items():
        if not names:
            continue
        rows = [per_dataset[n] for n in names]
        keys = [k for k, v in rows[0].items() if isinstance(v, int | float) and all(k in r for r in rows)]
        avg: dict[str, Any] = {k: sum(r[k] for r in rows) / len(rows) for k in keys}
        avg["count"] = sum(r.get("count", 0) for r in rows)
        avg["datasets"] = names
        out[group] = avg
    return out


def table_rows(metrics: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, metrics) for every dataset, then for every average."""
    rows = list(metrics["datasets"].items())
    rows += [(GROUP_LABELS[g], m) for g, m in metrics.get("averages", {}).items()]
    return rows


def _columns(rows: Sequence[tuple[str, dict[str, Any]]]) -> list[tuple[str, str, str]]:
    voting = any("saving" in m for _, m in rows)
    return [c for c in columns() if voting or c[0] not in VOTING_ONLY]


def _cell(value: Any, kind: str) -> str:
    if value is None:
        return "–"
    if kind == "pct":
        return f"{100 * value:.1f}"
    if kind == "int":
        return f"{value:.0f}"
    return f"{value:.{kind[-1]}f}"


def markdown_table(metrics: dict[str, Any]) -> str:
    """The results table in markdown (rates in %, token counts per question)."""
    rows = table_rows(metrics)
    columns = _columns(rows)
    lines = [
        "| dataset | " + " | ".join(header for _, header, _ in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for label, m in rows:
        lines.append(f"| {label} | " + " | ".join(_cell(m.get(k), kind) for k, _, kind in columns) + " |")
    return "\n".join(lines)


def write_csv(metrics: dict[str, Any], path: Path) -> None:
    """The results table as CSV with raw values (rates as fractions), one row per dataset and average."""
    rows = table_rows(metrics)
    columns = _columns(rows)
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["dataset", *(key for key, _, _ in columns)])
        for label, m in rows:
            writer.writerow([label, *(m.get(key, "") for key, _, _ in columns)])


def log_to_wandb(
    metrics: dict[str, Any], rows: Sequence[dict[str, Any]], *, project: str, name: str | None, out: Path
) -> str:
    """Summary metrics and a predictions table in a W&B run (WANDB_MODE=offline works without network)."""
    import wandb

    run = wandb.init(project=project, name=name, dir=str(out), config=metrics["settings"], job_type="eval")
    try:
        for section in ("datasets", "averages"):
            for name, m in metrics.get(section, {}).items():
                for key, value in m.items():
                    if isinstance(value, int | float):
                        run.summary[f"{name}/{key}"] = value
        columns = [
            "dataset",
            "id",
            "question",
            "golden_answers",
            "prediction",
            "em",
            "f1",
            "searches",
            "samples",
        ]
        table = wandb.Table(columns=columns)
        for r in rows:
            table.add_data(
                r["dataset"],
                r["id"],
                r["question"],
                " | ".join(r["golden_answers"]),
                r["prediction"],
                r["scores"].get("em"),
                r["scores"].get("f1"),
                r["searches"],
                r["samples"],
            )
        run.log({"predictions": table})
        return run.dir
    finally:
        run.finish()
