"""`autorefine` command line: prepare-data, train-sft, train-grpo, evaluate, infer, demo.

Heavy libraries (torch, transformers, TRL) are imported inside each command, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

EPILOG = """examples:
  autorefine prepare-data --data-dir /data/flashrag --out data/prepared
  autorefine train-sft  --config configs/sft/synthetic-warmstart.yaml
  autorefine train-grpo --config configs/grpo/tiny-cpu.yaml trainer.max_steps=5
  accelerate launch --config_file configs/accelerate/multi_gpu_ddp.yaml -m autorefine.cli \\
      train-grpo --config configs/grpo/autorefine-qwen2.5-3b-base.yaml
  autorefine evaluate --model runs/grpo/final --datasets nq,hotpotqa --data-dir data/demo/benchmarks \\
      --retriever-url http://127.0.0.1:8000 --out runs/eval
  autorefine infer --model runs/grpo/final --retriever-url http://127.0.0.1:8000 "Who wrote Hamlet?"
"""


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "httpcore", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_train_grpo(args: argparse.Namespace) -> int:
    """GRPO training from a preset plus overrides."""
    from autorefine.config import GRPORunConfig, load_config
    from autorefine.training.grpo import train_grpo

    config = load_config(GRPORunConfig, args.config, args.overrides)
    command = " ".join(
        ["autorefine train-grpo", f"--config {args.config}" if args.config else "", *args.overrides]
    )
    final = train_grpo(config, resume=args.resume, command=command.replace("  ", " "))
    print(f"final policy: {final}")
    return 0


def cmd_train_sft(args: argparse.Namespace) -> int:
    """Supervised warm start from a preset plus overrides."""
    from autorefine.config import SFTRunConfig, load_config
    from autorefine.training.sft import train_sft

    config = load_config(SFTRunConfig, args.config, args.overrides)
    final = train_sft(config, resume=args.resume)
    print(f"final policy: {final}")
    return 0


def cmd_prepare_data(args: argparse.Namespace) -> int:
    """Mix training sets into train/val files with provenance."""
    from autorefine.data import DataError, find_split_file, load_hub_split, prepare_training_mix

    sources: dict[str, Path] = {}
    for item in args.file or []:
        name, sep, path = item.partition("=")
        if not sep:
            raise DataError(f"--file expects NAME=PATH, got {item!r}")
        sources[name] = Path(path)
    for name in args.datasets.split(",") if args.datasets and not args.file else []:
        found = find_split_file(Path(args.data_dir), name, ("train",)) if args.data_dir else None
        sources[name] = found or load_hub_split(name, "train", Path(args.cache_dir))
    provenance = prepare_training_mix(
        sources, Path(args.out), val_size=args.val_size, seed=args.seed, limit_per_source=args.limit
    )
    print(
        f"{provenance['train_rows']} training and {provenance['val_rows']} validation questions in {args.out}"
    )
    return 0


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML preset (see configs/)")
    parser.add_argument("--resume", help="checkpoint directory to resume from, or 'latest'")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="override config values")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="autorefine",
        description="Train LLMs with RL to search while they reason (AutoRefine / Search-R1 on TRL).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    grpo = sub.add_parser("train-grpo", help="GRPO with multi-turn search rollouts (TRL)")
    _add_run_arguments(grpo)
    grpo.set_defaults(func=cmd_train_grpo)

    sft = sub.add_parser("train-sft", help="supervised warm start on gold-like or saved trajectories")
    _add_run_arguments(sft)
    sft.set_defaults(func=cmd_train_sft)

    prep = sub.add_parser("prepare-data", help="build the training mix (default NQ + HotpotQA train)")
    prep.add_argument(
        "--datasets", default="nq,hotpotqa", help="FlashRAG dataset names (default: nq,hotpotqa)"
    )
    prep.add_argument("--data-dir", help="local FlashRAG folder (<dir>/<name>/train.jsonl); else the hub")
    prep.add_argument(
        "--file", action="append", metavar="NAME=PATH", help="explicit training file (repeatable)"
    )
    prep.add_argument(
        "--val-size", type=int, default=500, help="validation questions carved from training data"
    )
    prep.add_argument("--limit", type=int, help="use at most N rows per source")
    prep.add_argument("--seed", type=int, default=0)
    prep.add_argument("--cache-dir", default=".cache/flashrag", help="where hub downloads are stored")
    prep.add_argument(
        "--out", required=True, help="output folder for train.jsonl, val.jsonl, provenance.json"
    )
    prep.set_defaults(func=cmd_prepare_data)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `autorefine` command."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    func: Callable[[argparse.Namespace], int] = args.func
    from autorefine.config import ConfigError
    from autorefine.data import DataError
    from autorefine.retrieval import RetrieverError
    from autorefine.training.setup import RunError

    try:
        return func(args)
    except (ConfigError, DataError, RetrieverError, RunError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
