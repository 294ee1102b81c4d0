"""GRPO training as `autorefine train-grpo` runs it, for tests that `accelerate launch` several processes.

    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml tests/launch_grpo.py \
        --report DIR [--fake-vllm] [--fail-search-on-rank R --fail-at-search N]
        [--fail-generate-on-rank R --fail-generate-after-step S] [--build-only] -- OVERRIDE...

`--fake-vllm` swaps vLLM and TRL's vLLM server client for tests/fake_vllm.py (colocate or server mode, as the
overrides say). `--fail-search-on-rank R` makes rank R's retriever connection drop at its N-th search call (as
a lost server would: `RetrieverUnavailableError`). `--fail-generate-on-rank R` makes rank R's engine raise (as
TRL's vLLM client does on an HTTP 400) once S optimizer steps are done. Each rank writes DIR/rank-R.json: its held-out history,
how often its engine was called with and without prompts of its own, the vLLM calls it saw, its retriever
client's per-replica counters, and the error that stopped it, if any. The exit status is `autorefine`'s: 0, or 2 for a run that stopped with a message.
With `data.difficulty_filter` on, the report also holds the filter's batches this rank sampled (question ids;
an empty one took its turns without prompts), what the filter returned on that rank (kept ids, rates,
questions sampled), the ids still trained on at the end, and the re-filter's latest group of each question.
`--build-only` builds the trainer (the filter included) and stops before training.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


class FailingSearcher:
    """A retriever connection whose server disappears at the `fail_at`-th search call."""

    def __init__(self, client: Any, fail_at: int) -> None:
        self.client = client
        self.fail_at = fail_at
        self.calls = 0

    def search(self, queries: list[str], topk: int = 3) -> Any:
        from autorefine.retrieval import RetrieverUnavailableError

        self.calls += 1
        if self.calls >= self.fail_at:
            raise RetrieverUnavailableError(
                f"retriever at {self.client.url} unreachable (connection refused)"
            )
        return self.client.search(queries, topk=topk)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--report", required=True)
    parser.add_argument("--fake-vllm", action="store_true")
    parser.add_argument("--fail-search-on-rank", type=int)
    parser.add_argument("--fail-at-search", type=int, default=1)
    parser.add_argument("--fail-generate-on-rank", type=int)
    parser.add_argument("--fail-generate-after-step", type=int, default=1)
    parser.add_argument("--build-only", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.fake_vllm:
        from tests import fake_vllm

        fake_vllm.install()

    from autorefine.config import GRPORunConfig
    from autorefine.retrieval import connect_retriever
    from autorefine.settings import load_config
    from autorefine.training.arguments import RunError
    from autorefine.training.callbacks import HeldoutEvalCallback
    from autorefine.training.grpo import difficulty
    from autorefine.training.grpo import trainer as grpo_trainer
    from autorefine.training.grpo.difficulty import KeptQuestions, Refilter
    from autorefine.training.grpo.trainer import build_trainer, run_grpo
    from tests.helpers import REPO_ROOT

    rank = int(os.environ.get("RANK", "0"))
    config = load_config(GRPORunConfig, REPO_ROOT / "configs/grpo/tiny-cpu.yaml", args.overrides)
    client = connect_retriever(config.retriever)
    connection = client
    if args.fail_search_on_rank == rank:
        client = FailingSearcher(client, args.fail_at_search)
    report: dict[str, Any] = {"rank": rank, "calls_with_prompts": 0, "calls_without_prompts": 0}
    report["filter_batches"] = []
    sample_batch = difficulty.sample_batch

    def recording_batch(chunk: Any, *rest: Any) -> Any:
        report["filter_batches"].append([q.id for q in chunk])
        return sample_batch(chunk, *rest)

    difficulty.sample_batch = recording_batch
    apply_difficulty_filter = grpo_trainer.apply_difficulty_filter

    def reporting_filter(*given: Any, **named: Any) -> Any:
        result = apply_difficulty_filter(*given, **named)
        kept = [q.id for q in result.kept]
        report["difficulty"] = {"kept": kept, "rates": result.rates, "sampled": result.sampled}
        return result

    grpo_trainer.apply_difficulty_filter = reporting_filter
    trainer, rollout = build_trainer(config, client=client)
    if args.build_only:
        write_report(Path(args.report), report)
        return 0
    engine = rollout.engine.engine
    generate = engine.generate

    def counting_generate(prompts: Any, *rest: Any) -> Any:
        report["calls_with_prompts" if prompts else "calls_without_prompts"] += 1
        broken = args.fail_generate_on_rank == rank
        if broken and prompts and trainer.state.global_step >= args.fail_generate_after_step:
            raise RuntimeError(f"Request failed: 400, injected engine failure on rank {rank}")
        return generate(prompts, *rest)

    engine.generate = counting_generate
    status = 0
    try:
        run_grpo(trainer, command="autorefine train-grpo")
    except RunError as err:
        report["error"] = str(err)
        status = 2
    finally:
        heldout = [c for c in trainer.callback_handler.callbacks if isinstance(c, HeldoutEvalCallback)]
        report["heldout"] = (
            [{k: v for k, v in h.items() if k != "seconds"} for h in heldout[0].history] if heldout else []
        )
        llm = getattr(getattr(trainer, "vllm_generation", None), "llm", None)
        report["vllm_calls"] = getattr(llm, "calls", None)
        report["global_step"] = trainer.state.global_step
        report["retriever"] = connection.stats()
        if isinstance(trainer.train_dataset, KeptQuestions):
            report["train_ids"] = trainer.train_dataset.active_ids()
        refilter = [c for c in trainer.callback_handler.callbacks if isinstance(c, Refilter)]
        report["refilter_latest"] = refilter[0].latest if refilter else None
        write_report(Path(args.report), report)
    if status:
        print(f"error: {report['error']}", file=sys.stderr)
    return status


def write_report(folder: Path, report: dict[str, Any]) -> None:
    """This rank's report, as DIR/rank-R.json."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank-{report['rank']}.json").write_text(json.dumps(report, indent=1), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
