"""What an IP-DPO round reports: console table, W&B metrics and example-pair tables, pair examples as markdown."""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autorefine.training.ipdpo.pairs import pair_text, read_pairs

if TYPE_CHECKING:
    from trl import DPOConfig


@dataclass(frozen=True)
class IPDPOLoggingSettings:
    """What IP-DPO logs besides TRL's own DPO metrics."""

    pair_table_rows: int = 8  # example pairs per round (W&B table and round-k/pair_examples.md)
    pair_accuracy_pairs: int = 512  # training pairs re-scored after each round's epoch (0: skip)


def sample_summary(rows: Any) -> dict[str, float]:
    """Mean scores, searches and model tokens of every sample of a round."""
    totals: dict[str, float] = {}
    count = 0
    for row in rows:
        count += 1
        for key, value in row["scores"].items():
            totals[key] = totals.get(key, 0.0) + float(value)
        totals["searches"] = totals.get("searches", 0.0) + len(row.get("queries", []))
    return {"count": count, **{k: v / count for k, v in totals.items()}} if count else {"count": 0}


def example_pairs(pairs_file: Path, rows: int) -> list[dict[str, Any]]:
    """The first pairs of each negative type, round-robin, up to `rows`."""
    by_type: dict[str, list[dict[str, Any]]] = {}
    for pair in read_pairs(pairs_file):
        bucket = by_type.setdefault(pair.get("type", "?"), [])
        if len(bucket) < rows:
            bucket.append(pair)
    out = []
    while len(out) < rows and any(by_type.values()):
        for bucket in by_type.values():
            if bucket and len(out) < rows:
                out.append(bucket.pop(0))
    return out


def pair_examples_markdown(pairs: list[dict[str, Any]]) -> str:
    """Example pairs for reading: question, negative type, both trajectories and their scores."""
    parts = ["# Example pairs\n"]
    for pair in pairs:
        parts.append(f"## {pair.get('question') or pair['id']} — {pair.get('type', '?')}\n")
        parts.append(f"gold: {' | '.join(pair.get('golden_answers', []))}\n")
        for side in ("chosen", "rejected"):
            scores = pair[side].get("scores", {})
            shown = ", ".join(f"{k} {v:.2f}" for k, v in scores.items())
            parts.append(f"**{side}** ({shown})\n\n```\n{pair_text(pair[side])}\n```\n")
    return "\n".join(parts)


def print_round(summary: dict[str, Any], baseline: dict[str, float] | None) -> None:
    """A round's numbers on the console."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    index = summary["round"]
    heldout = summary.get("heldout") or {}
    if index == 0:
        if heldout:
            console.print(f"[bold]start policy[/] {heldout_line(heldout)}")
        return
    pairs, dpo, samples = summary["pairs"], summary["dpo"], summary.get("samples", {})
    table = Table(title=f"IP-DPO round {index} ({summary['seconds'] / 60:.1f} min)", show_header=True)
    table.add_column("")
    table.add_column("chosen", justify="right")
    table.add_column("rejected", justify="right")
    for key in ("outcome", "process", "format", "steps", "model_tokens"):
        if key in pairs["chosen"]:
            table.add_row(key, f"{pairs['chosen'][key]:.2f}", f"{pairs['rejected'][key]:.2f}")
    console.print(table)
    by_type = ", ".join(f"{t} {n}" for t, n in pairs["by_type"].items())
    console.print(
        f"samples {samples.get('count', 0):.0f} (outcome {samples.get('outcome', 0):.2f}, searches "
        f"{samples.get('searches', 0):.2f}) · pairs {pairs['pairs']} ({by_type}) · skipped "
        f"{100 * pairs['skip_rate']:.0f}% {dict(pairs['skipped'])}"
    )
    if dpo.get("pairs_reward_accuracy") is not None:
        console.print(
            f"DPO: reward accuracy {dpo['pairs_reward_accuracy']:.2f}, margin {dpo['pairs_reward_margin']:.3f} "
            f"on {dpo['pairs_evaluated']} training pairs after the epoch; loss {dpo.get('train_loss', float('nan')):.3f}"
        )
    if heldout:
        console.print(heldout_line(heldout, baseline))


def heldout_line(heldout: dict[str, float], baseline: dict[str, float] | None = None) -> str:
    """Held-out EM (and its change since the start policy), F1, searches (per hop count) and model tokens."""
    delta = f" ({heldout['em'] - baseline['em']:+.3f} vs start)" if baseline else ""
    hops = ", ".join(f"{k.split('_')[1]} {v:.2f}" for k, v in heldout.items() if k.startswith("searches_"))
    return (
        f"held-out EM {heldout['em']:.3f}{delta}  F1 {heldout['f1']:.3f}  searches {heldout['searches']:.2f}"
        f"{f' ({hops})' if hops else ''}  model tokens {heldout['model_tokens']:.1f}"
    )


def start_wandb(config: dict[str, Any], root: Path, args: DPOConfig) -> Any:
    """One W&B run for every round (resumed with the run), or None when W&B is not in `report_to`."""
    if "wandb" not in (args.report_to or []):
        return None
    import wandb

    id_file = root / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    run = wandb.init(
        project=os.environ.get("WANDB_PROJECT", "autorefine"),
        name=config["trainer"].get("run_name") or root.name,
        id=run_id,
        resume="allow",
        dir=str(root),
        config=config,
    )
    run.define_metric("round")
    for prefix in ("round/*", "pairs/*", "dpo/*", "heldout/*", "samples/*"):
        run.define_metric(prefix, step_metric="round")
    return run


def round_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """A round's summary flattened into W&B metric names."""
    out: dict[str, float] = {"round": summary["round"]}
    for key, value in (summary.get("heldout") or {}).items():
        out[f"heldout/{key}"] = value
    if summary["round"] == 0:
        return out
    pairs = summary["pairs"]
    out["pairs/count"] = pairs["pairs"]
    out["pairs/skip_rate"] = pairs["skip_rate"]
    for kind, count in pairs["by_type"].items():
        out[f"pairs/{kind}"] = count
    for reason, count in pairs["skipped"].items():
        out[f"pairs/skipped_{reason}"] = count
    for side in ("chosen", "rejected"):
        for key, value in pairs[side].items():
            out[f"pairs/{side}_{key}"] = value
    for key, value in summary.get("samples", {}).items():
        out[f"samples/{key}"] = value
    for key, value in summary["dpo"].items():
        if isinstance(value, int | float):
            out[f"dpo/{key}"] = value
    out["round/seconds"] = summary["seconds"]
    return out


def log_round_to_wandb(run: Any, summary: dict[str, Any], examples: list[dict[str, Any]]) -> None:
    """Per-round metrics and a table of example pairs."""
    import wandb

    data = round_metrics(summary)
    if examples:
        columns = ["question", "gold", "type", "chosen", "chosen scores", "rejected", "rejected scores"]
        rows = [
            [
                p.get("question", p["id"]),
                " | ".join(p.get("golden_answers", [])),
                p.get("type", "?"),
                pair_text(p["chosen"]),
                json.dumps(p["chosen"].get("scores", {})),
                pair_text(p["rejected"]),
                json.dumps(p["rejected"].get("scores", {})),
            ]
            for p in examples
        ]
        data[f"pairs/examples_round_{summary['round']}"] = wandb.Table(columns=columns, data=rows)
    run.log(data)
