"""Generate the synthetic retrieval-only task and its tiny BPE tokenizer into data/synthetic/.

    python scripts/make_synthetic_task.py [--out data/synthetic] [--seed 0]

The output is deterministic for a given seed; the repository ships the result (a few MB).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from autorefine.synthetic import train_tokenizer, write_task

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REPO / "data" / "synthetic")
    parser.add_argument("--people", type=int, default=3000)
    parser.add_argument("--heldout-fraction", type=float, default=0.1)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    counts = write_task(
        args.out, num_people=args.people, heldout_fraction=args.heldout_fraction, seed=args.seed
    )
    tokenizer = train_tokenizer(args.out, vocab_size=args.vocab_size)
    tokenizer.save_pretrained(args.out / "tokenizer")
    counts["vocab"] = len(tokenizer)
    (args.out / "task.json").write_text(
        json.dumps({"seed": args.seed, **counts}, indent=2) + "\n", encoding="utf-8"
    )
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
