"""Build the synthetic task's warm-start policy (data/synthetic/warmstart) with `autorefine train-sft`.

    python scripts/make_warmstart.py [--seed 0] [--out data/synthetic/warmstart]

Builds a BM25 index over data/synthetic/corpus.jsonl, serves it on a free loopback port, runs the
`configs/sft/synthetic-warmstart.yaml` preset (SFT until held-out EM reaches its target), and copies the
final policy and tokenizer (no optimizer state, a few MB) to `--out`. CI tests and the GRPO learning
benchmark start from it.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from autorefine.retriever_process import ensure_bm25_index, running_retriever

REPO = Path(__file__).resolve().parents[1]
KEEP = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "data" / "synthetic" / "warmstart")
    parser.add_argument("--work-dir", type=Path, default=REPO / "runs" / "warmstart")
    parser.add_argument("overrides", nargs="*", help="extra train-sft overrides (section.key=value)")
    args = parser.parse_args()

    index = ensure_bm25_index(REPO / "data/synthetic/corpus.jsonl", args.work_dir / "synthetic-bm25")
    sft_dir = args.work_dir / "sft"
    with running_retriever(index) as url:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "autorefine.cli",
                "train-sft",
                "--config",
                str(REPO / "configs/sft/synthetic-warmstart.yaml"),
                f"retriever.url={url}",
                f"trainer.output_dir={sft_dir}",
                f"trainer.seed={args.seed}",
                *args.overrides,
            ],
            check=True,
            cwd=REPO,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    for name in KEEP:
        shutil.copyfile(sft_dir / "final" / name, args.out / name)
    shutil.copyfile(sft_dir / "heldout.jsonl", args.out / "heldout_history.jsonl")
    print(f"warm-start policy written to {args.out}")


if __name__ == "__main__":
    main()
