"""Time per GRPO step on `tiny-cpu`: our multi-turn step (rollout, retrieval, update) against a single-turn
TRL `GRPOTrainer` step with the same model, batch and number of completion tokens.

    python benchmarks/grpo_step.py [--rounds 2] [--steps 8]

(a) `build_trainer` on configs/grpo/tiny-cpu.yaml (warm-start policy, 16 questions × 8 samples, BM25
    retriever on a free port; no checkpoints, held-out evaluation or sample tables): per-step `time/step_s`,
    `time/rollout_s`, `time/retrieval_s`, `time/update_s` and completion lengths from TRL's log history.
(b) a plain `trl.GRPOTrainer` (no rollout_func) with the same policy, GRPOConfig batch settings and prompts
    (the synthetic questions through `build_prompt`, as text), a trivial reward, and every completion forced
    to N tokens (min_new_tokens = max_completion_length = N, N = mean completion length of (a), documents
    included), so both sides train on the same number of tokens per step.

Whole runs alternate A B A B …; the first step of every run is a warm-up and is left out of the medians.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from synthetic_setup import REPO, ensure_index, load_average, median, parse_with_threads, settings
from transformers import TrainerCallback

from autorefine.config import GRPORunConfig
from autorefine.data import read_questions
from autorefine.modeling import load_tokenizer_and_policy
from autorefine.protocol import PromptTemplate, build_prompt
from autorefine.settings import load_config
from autorefine.training.grpo.trainer import build_trainer, make_grpo_args
from testbed.retriever import running_retriever

PRESET = REPO / "configs" / "grpo" / "tiny-cpu.yaml"


class StepClock(TrainerCallback):
    """Wall time of every optimizer step (generation included: TRL generates inside the step)."""

    def __init__(self, completion_lengths: Callable[[], list[int]] | None = None) -> None:
        self.steps: list[float] = []
        self.lengths: list[list[int]] = []  # per step: completion lengths, documents included
        self.completion_lengths = completion_lengths
        self._started = 0.0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Start the clock."""
        self._started = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Stop the clock."""
        self.steps.append(time.perf_counter() - self._started)
        if self.completion_lengths is not None:
            self.lengths.append(self.completion_lengths())


def preset(url: str, out: Path, steps: int) -> GRPORunConfig:
    """tiny-cpu with a local retriever, a scratch output directory and nothing but training."""
    return load_config(
        GRPORunConfig,
        PRESET,
        [
            f"retriever.url={url}",
            f"trainer.output_dir={out}",
            f"trainer.max_steps={steps}",
            "trainer.report_to=[]",
            "trainer.save_strategy=no",
            "heldout.every=0",
            "logging.sample_table_every=0",
        ],
    )


def run_ours(url: str, steps: int) -> dict[str, list[float]]:
    """(a): per-step times and completion lengths of our multi-turn trainer (first step dropped)."""
    with tempfile.TemporaryDirectory() as out:
        trainer, rollout = build_trainer(preset(url, Path(out), steps))
        clock = StepClock(lambda: [len(t.completion_ids) for _, t in rollout.latest])
        trainer.add_callback(clock)
        trainer.train()
    logs = [h for h in trainer.state.log_history if "time/step_s" in h][1:]
    keys = {
        "rollout_s": "time/rollout_s",
        "retrieval_s": "time/retrieval_s",
        "update_s": "time/update_s",
        "model_tokens": "rollout/model_tokens",
        "document_tokens": "rollout/document_tokens",
        "turns": "rollout/turns",
        "searches": "rollout/searches",
    }
    result = {name: [h[key] for h in logs] for name, key in keys.items()}
    result["step_s"] = clock.steps[1:]
    result["completion"] = [sum(x) / len(x) for x in clock.lengths[1:]]
    result["completion_max"] = [max(x) for x in clock.lengths[1:]]
    return result


def constant_length_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    """A reward that costs nothing and still varies (so advantages are not all zero)."""
    return [float(len(str(c)) % 7) for c in completions]


def run_single_turn(url: str, steps: int, new_tokens: int) -> dict[str, list[float]]:
    """(b): per-step and generation times of a plain single-turn GRPOTrainer (first step dropped)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    with tempfile.TemporaryDirectory() as out:
        config = preset(url, Path(out), steps)
        tokenizer, model = load_tokenizer_and_policy(config.model)
        template = PromptTemplate.load(config.template)
        questions = read_questions(config.data.train_file)
        dataset = Dataset.from_list(
            [
                {"prompt": build_prompt(q.question, tokenizer, template, config.rollout.topk)}
                for q in questions
            ]
        )
        ours = make_grpo_args(config).to_dict()
        same = (
            "per_device_train_batch_size",
            "num_generations",
            "steps_per_generation",
            "num_iterations",
            "gradient_accumulation_steps",
            "learning_rate",
            "lr_scheduler_type",
            "epsilon",
            "beta",
            "temperature",
            "top_p",
            "seed",
            "use_cpu",
            "bf16",
            "activation_checkpointing",
            "dataloader_num_workers",
            "max_steps",
            "logging_steps",
        )
        args = GRPOConfig(
            output_dir=out,
            report_to=[],
            save_strategy="no",
            max_completion_length=new_tokens,
            generation_kwargs={"min_new_tokens": new_tokens},
            **{key: ours[key] for key in same},
        )
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=constant_length_reward,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        clock = StepClock()
        trainer.add_callback(clock)
        generation: list[float] = []
        generate = trainer._generate_single_turn

        def timed_generate(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            output = generate(*args, **kwargs)
            generation.append(time.perf_counter() - started)
            return output

        trainer._generate_single_turn = timed_generate
        trainer.train()
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h][1:]
    return {
        "step_s": clock.steps[1:],
        "generation_s": generation[1:],
        "update_s": [s - g for s, g in zip(clock.steps[1:], generation[1:], strict=True)],
        "completion": [h["completions/mean_length"] for h in logs],
    }


def report(ours: list[dict[str, list[float]]], single: list[dict[str, list[float]]], new_tokens: int) -> None:
    """Medians over every measured step of every run, the split and the ratio."""

    def med(runs: list[dict[str, list[float]]], key: str) -> float:
        return median([x for run in runs for x in run[key]])

    step_a, step_b = med(ours, "step_s"), med(single, "step_s")
    print("\n| | step s | rollout / generation s | retrieval s | update s | completion tokens (mean) |")
    print("|---|---:|---:|---:|---:|---:|")
    print(
        f"| (a) ours, multi-turn | {step_a:.2f} | {med(ours, 'rollout_s'):.2f} | {med(ours, 'retrieval_s'):.3f} | "
        f"{med(ours, 'update_s'):.2f} | {med(ours, 'completion'):.1f} (max {med(ours, 'completion_max'):.0f}) |"
    )
    print(
        f"| (b) TRL single-turn | {step_b:.2f} | {med(single, 'generation_s'):.2f} | – | "
        f"{med(single, 'update_s'):.2f} | {med(single, 'completion'):.1f} (forced {new_tokens}) |"
    )
    per_run = [median(a["step_s"]) / median(b["step_s"]) for a, b in zip(ours, single, strict=True)]
    print(
        f"\nratio (a)/(b) step time: {step_a / step_b:.2f} (per pair of runs: "
        f"{', '.join(f'{x:.2f}' for x in per_run)})"
    )
    print(
        f"(a) per trajectory: turns {med(ours, 'turns'):.2f}, searches {med(ours, 'searches'):.2f}, "
        f"model tokens {med(ours, 'model_tokens'):.1f}, document tokens {med(ours, 'document_tokens'):.1f}; "
        "steps measured: "
        f"{sum(len(r['step_s']) for r in ours)} (a), {sum(len(r['step_s']) for r in single)} (b)"
    )


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2, help="A B pairs of whole training runs")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run (the first is warm-up)")
    args = parse_with_threads(parser)

    print(f"load average before: {load_average()}; {settings()}")
    ours, single = [], []
    new_tokens = 0
    with running_retriever(ensure_index()) as url:
        for r in range(args.rounds):
            ours.append(run_ours(url, args.steps))
            if r == 0:
                new_tokens = round(median(ours[0]["completion"]))
            single.append(run_single_turn(url, args.steps, new_tokens))
            a, b = ours[-1], single[-1]
            print(
                f"run pair {r}: (a) step {median(a['step_s']):.2f} s (rollout {median(a['rollout_s']):.2f}, "
                f"update {median(a['update_s']):.2f}), completion {median(a['completion']):.0f} | (b) step "
                f"{median(b['step_s']):.2f} s (generation {median(b['generation_s']):.2f}, update "
                f"{median(b['update_s']):.2f}), completion {median(b['completion']):.0f}"
            )
    report(ours, single, new_tokens)
    print(f"load average after: {load_average()}; {settings()}")


if __name__ == "__main__":
    main()
