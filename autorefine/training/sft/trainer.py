"""Supervised warm start on trajectories, with environment tokens (documents) masked out of the loss."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autorefine.config import SFTRunConfig
from autorefine.data import read_questions
from autorefine.modeling import load_tokenizer_and_policy, lora_config, trained_weights_dtype
from autorefine.protocol import PromptTemplate
from autorefine.retrieval import connect_retriever
from autorefine.settings import check_trainer_args
from autorefine.training.arguments import RunError, check_saving, require_devices, with_trainer_defaults
from autorefine.training.callbacks import HeldoutEvalCallback, SaveRunConfigCallback, add_heldout_evaluation
from autorefine.training.checkpoints import save_final
from autorefine.training.distributed import (
    agreed_resume,
    check_shared_folder,
    on_every_process,
    process_hosts,
    start_processes,
)
from autorefine.training.preflight import Preflight
from autorefine.training.sft.traces import build_gold_traces, load_trajectory_rows

if TYPE_CHECKING:
    from trl import SFTTrainer

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


def sft_example(
    prompt_ids: list[int], completion_ids: list[int], env_mask: list[int]
) -> dict[str, list[int]]:
    """input_ids and labels: only model tokens of the completion are learned; prompt and documents are context."""
    labels = [IGNORE_INDEX] * len(prompt_ids) + [
        token if keep else IGNORE_INDEX for token, keep in zip(completion_ids, env_mask, strict=True)
    ]
    return {"input_ids": prompt_ids + completion_ids, "labels": labels}


def sft_dataset(examples: Iterable[dict[str, list[int]]]):  # -> datasets.Dataset
    """A pre-tokenized dataset TRL's SFTTrainer uses as is (its `labels` carry the mask)."""
    from datasets import Dataset

    rows = list(examples)
    if not rows:
        raise RunError("no SFT examples: no trajectory had its evidence retrieved (see require_evidence)")
    return Dataset.from_list(rows)


def preflight(config: SFTRunConfig, pre: Preflight) -> dict[str, Any]:
    """Every check an SFT start runs before it contacts a server or loads a model, in order; what they built."""
    from trl import SFTConfig

    if pre.checking:
        pre.trainer(config.trainer, SFTConfig)
    built: dict[str, Any] = {"values": pre.run("trainer", lambda: sft_trainer_values(config, pre.checking))}
    pre.run("model", lambda: trained_weights_dtype(config.model, config.lora))
    built["template"] = pre.run("template", lambda: PromptTemplate.load(config.template))
    if config.traces_file:
        built["rows"] = pre.file("traces_file", config.traces_file, lambda f: load_trajectory_rows(Path(f)))
    else:
        built["questions"] = pre.file("data.train_file", config.data.train_file, read_questions)
    if config.heldout.file and config.heldout.every > 0:
        pre.file("heldout.file", config.heldout.file, lambda f: read_questions(f, limit=config.heldout.limit))
    if needs_retriever(config):
        pre.retriever(config.retriever)
    return built


def sft_trainer_values(config: SFTRunConfig, check_only: bool = False) -> dict[str, Any]:
    """The `trainer` section checked against trl.SFTConfig, with autorefine's defaults."""
    from trl import SFTConfig

    values = with_trainer_defaults(check_trainer_args(SFTConfig, config.trainer), SFTConfig)
    require_devices(values, check_only=check_only)
    check_saving(values)
    values.setdefault("output_dir", "runs/sft")
    return values


def needs_retriever(config: SFTRunConfig) -> bool:
    """Gold traces search the retriever, and so does held-out evaluation."""
    return config.traces_file is None or bool(config.heldout.file and config.heldout.every)


def check_sft(config: SFTRunConfig) -> int:
    """`train-sft --check`: every configuration check, reported; 0 when none refuses, else 2."""
    pre = Preflight("train-sft", checking=True)
    preflight(config, pre)
    return pre.report(config)


def build_trainer(config: SFTRunConfig) -> SFTTrainer:
    """The configured SFTTrainer, its data built from saved trajectories or gold traces over real retrieval."""
    from trl import SFTConfig, SFTTrainer

    built = preflight(config, Preflight("train-sft"))
    values, template = built["values"], built["template"]
    state = start_processes(SFTConfig(**values))  # the process group, set up as the trainer will use it
    process_hosts(state)
    check_shared_folder(state, values["output_dir"])
    client = (
        on_every_process(state, lambda: connect_retriever(config.retriever))
        if needs_retriever(config)
        else None
    )
    tokenizer, model = load_tokenizer_and_policy(config.model, config.tiny_model, lora=config.lora)

    if config.traces_file:
        examples = [sft_example(r["prompt_ids"], r["completion_ids"], r["env_mask"]) for r in built["rows"]]
    else:
        questions = built["questions"]
        traces = build_gold_traces(
            questions, client, tokenizer, config.rollout, template, require_evidence=config.require_evidence
        )
        logger.info("gold traces: %d of %d questions kept", len(traces), len(questions))
        examples = [sft_example(t.prompt_ids, t.completion_ids, t.env_mask) for _, t in traces]

    values["max_length"] = sequence_length_limit(examples, values.get("max_length"))
    args = SFTConfig(**values)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=sft_dataset(examples),
        processing_class=tokenizer,
        peft_config=lora_config(config.lora, model),
    )
    trainer.add_callback(SaveRunConfigCallback(config))
    add_heldout_evaluation(trainer, config.heldout, config.rollout, template, client)
    return trainer


def sequence_length_limit(examples: list[dict[str, list[int]]], configured: int | None) -> int:
    """SFT's `max_length`: the longest example unless the config sets it, and never one that cuts an example.

    TRL truncates at 1024 tokens by default, which would cut the answer (the last model tokens) off any
    trajectory longer than that: a rollout allows up to `rollout.max_completion_tokens` after its prompt.
    """
    longest = max((len(e["input_ids"]) for e in examples), default=1)
    if configured is None:
        return longest
    cut = sum(len(e["input_ids"]) > configured for e in examples)
    if cut:
        raise RunError(
            f"trainer.max_length={configured} would truncate {cut} of {len(examples)} SFT examples (the longest "
            f"has {longest} tokens, prompt and documents included); raise it or leave it unset"
        )
    return configured


def train_sft(config: SFTRunConfig, resume: str | None = None) -> Path:
    """Run the warm start (`resume`: a checkpoint, or `latest`); the final policy goes to <output_dir>/final."""
    trainer = build_trainer(config)
    trainer.train(
        resume_from_checkpoint=agreed_resume(trainer.accelerator.state, trainer.args.output_dir, resume)
    )
    return save_final(trainer)


def heldout_history(trainer: Any) -> list[dict[str, float]]:
    """Held-out evaluations recorded during a run."""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, HeldoutEvalCallback):
            return callback.history
    return []
