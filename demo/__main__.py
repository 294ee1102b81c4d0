"""`python -m demo [--quick] [--out DIR]`: run the whole pipeline and write its report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from demo.run import main


def cli(argv: list[str] | None = None) -> int:
    """Parse the demo's two options and run it."""
    parser = argparse.ArgumentParser(
        prog="python -m demo",
        description="The whole pipeline on this machine: indexes, retrievers, SFT, GRPO, evaluation, report.",
    )
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument(
        "--quick", action="store_true", help="a few steps of everything (a smoke test, ~2 min)"
    )
    args = parser.parse_args(argv)
    return main(Path(args.out), quick=args.quick)


if __name__ == "__main__":
    sys.exit(cli())
