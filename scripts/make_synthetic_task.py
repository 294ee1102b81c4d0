"""Generate a synthetic retrieval task and its tokenizer.

    python scripts/make_synthetic_task.py [--out data/synthetic] [--seed 0]
    python scripts/make_synthetic_task.py --task multihop [--out data/synthetic_multihop] [--seed 0]

`onehop` (data/synthetic): one fact per question, and a tiny BPE tokenizer trained on it. `multihop`
(data/synthetic_multihop): one-hop questions mixed with two-hop ones that need two linked facts, each
carrying its gold evidence; it reuses the one-hop tokenizer (its warm start starts from the one-hop
policy). The output is deterministic for a given seed; the repository ships the results (a few MB).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # testbed/ (the bench) is not installed

from autorefine.modeling import load_tokenizer
from testbed import synthetic, synthetic_multihop

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = {"onehop": REPO / "data" / "synthetic", "multihop": REPO / "data" / "synthetic_multihop"}


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", choices=sorted(DEFAULT_OUT), default="onehop")
    parser.add_argument("--out", type=Path, default=None, help="default: data/synthetic[_multihop]")
    parser.add_argument("--people", type=int, default=None, help="default: 3000 (onehop), 1500 (multihop)")
    parser.add_argument("--companies", type=int, default=300, help="multihop only")
    parser.add_argument("--heldout-fraction", type=float, default=0.1)
    parser.add_argument("--vocab-size", type=int, default=1024, help="onehop only")
    parser.add_argument(
        "--onehop-tokenizer",
        type=Path,
        default=REPO / "data" / "synthetic" / "tokenizer",
        help="multihop only: the tokenizer it shares with the one-hop task",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = args.out or DEFAULT_OUT[args.task]

    if args.task == "onehop":
        counts = synthetic.write_task(
            out, num_people=args.people or 3000, heldout_fraction=args.heldout_fraction, seed=args.seed
        )
        tokenizer = synthetic.train_tokenizer(out, vocab_size=args.vocab_size)
        tokenizer.save_pretrained(out / "tokenizer")
        counts["vocab"] = len(tokenizer)
    else:
        counts = synthetic_multihop.write_multihop_task(
            out,
            num_people=args.people or 1500,
            num_companies=args.companies,
            heldout_fraction=args.heldout_fraction,
            seed=args.seed,
        )
        # The one-hop task's tokenizer, so that the multi-hop warm start can start from the one-hop policy.
        shutil.copytree(args.onehop_tokenizer, out / "tokenizer", dirs_exist_ok=True)
        counts["vocab"] = len(load_tokenizer(out / "tokenizer"))
    (out / "task.json").write_text(
        json.dumps({"seed": args.seed, **counts}, indent=2) + "\n", encoding="utf-8"
    )
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
