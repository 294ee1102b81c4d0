"""Shared setup for benchmarks on the synthetic tasks: the BM25 index, paths, commands, machine load, medians."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # testbed/ (the bench) is not installed; benchmarks run from a clone

from testbed.retriever import ensure_bm25_index  # noqa: E402

SYNTHETIC = REPO / "data" / "synthetic"
MULTIHOP = REPO / "data" / "synthetic_multihop"
INDEX = REPO / "runs" / "bench" / "synthetic-bm25"


def ensure_index(index: Path = INDEX) -> Path:
    """The BM25 index over the synthetic corpus, built on first use (~1 s)."""
    return ensure_bm25_index(SYNTHETIC / "corpus.jsonl", index)


def run(command: list[str], log: Path) -> float:
    """Run a command from the repository root (output appended to `log`); its wall time in seconds."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log.open("a", encoding="utf-8") as out:
        subprocess.run(command, check=True, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    return time.perf_counter() - started


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def hops_of_heldout() -> dict[str, int]:
    """Multi-hop held-out question id → its number of hops."""
    return {
        row["id"]: int(row.get("metadata", {}).get("hops", 1))
        for row in read_jsonl(MULTIHOP / "heldout.jsonl")
    }


def load_average() -> str:
    """The 1-, 5- and 15-minute load averages, as `uptime` prints them."""
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def settings() -> str:
    """Thread settings that change CPU timings several-fold (spinning OpenMP waits on a busy machine)."""
    import torch

    return f"torch threads {torch.get_num_threads()}, OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')}"


def median(values: list[float]) -> float:
    """Middle value (mean of the two middle ones for an even count)."""
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def parse_with_threads(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse arguments with a `--threads` option added, and apply it to torch."""
    import torch

    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: no OpenMP barriers to stall on a shared machine)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args
