"""The only place that touches private TRL / transformers trainer internals; `tests/test_trl_private.py` pins them.

Each helper says why no public API does the job. When a TRL or transformers upgrade changes one of these,
the pinning test fails with the name of the attribute, instead of a run failing hours in.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import Trainer
    from trl import GRPOTrainer


def record_metric(trainer: Trainer, key: str, value: float) -> None:
    """Queue a training metric; TRL averages its queued metrics and logs them at the next logging step."""
    # TRL's trainers keep `_metrics[mode][key] -> list`; reusing it keeps our metrics on TRL's logging
    # cadence and in the same W&B run and console lines as TRL's own (`Trainer.log` has no queue).
    trainer._metrics["train"][key].append(float(value))


def save_full_checkpoint(trainer: Trainer) -> None:
    """Write a complete `checkpoint-N` (model, optimizer, scheduler, RNG, data position) right now."""
    # `save_model` writes weights only; resuming needs the whole state, which only the Trainer's own
    # checkpoint routine writes.
    trainer._save_checkpoint(trainer.model, trial=None)


def pretokenized_dpo_trainer() -> type:
    """A `trl.DPOTrainer` subclass that trains on pre-tokenized pairs exactly as given."""
    from trl import DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        """DPOTrainer on `prompt_ids`/`chosen_ids`/`rejected_ids` plus environment masks, never re-tokenized."""

        # `DPOTrainer.__init__` always runs `_prepare_dataset`, which extracts a prompt from text columns and
        # tokenizes it again: sampled ids would become re-tokenized text. Our pairs are already checked token
        # ids (and over-long ones already dropped), so preparation is the identity. No public option skips it.
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    return PretokenizedDPOTrainer


def load_weights(trainer: Trainer, folder: str | Path) -> None:
    """Load the policy weights saved in `folder` (a `save_model` folder: full model or LoRA adapter) in place."""
    # The Trainer's own loader handles full and sharded safetensors and PEFT adapters; no public API loads
    # weights into a model the optimizer already holds.
    trainer._load_from_checkpoint(str(folder))


def discard_generation_buffer(trainer: GRPOTrainer) -> None:
    """Make TRL generate a fresh batch at the next step instead of training on ones sampled earlier."""
    # With steps_per_generation > 1, TRL keeps one scored generation batch for several steps; after a rollback
    # those samples come from the collapsed policy. TRL regenerates whenever the buffer is None.
    trainer._buffered_inputs = None


def after_scoring(
    trainer: GRPOTrainer, hook: Callable[[list[dict[str, Any]], dict[str, Any]], dict[str, Any]]
) -> None:
    """Run `hook(inputs, batch)` on every scored generation batch, before TRL splits it into micro-batches."""
    # TRL has no hook between advantages and the loss; `_generate_and_score_completions` returns the batch
    # (masks, advantages, `num_items_in_batch`) that every micro-batch's loss reads.
    score = trainer._generate_and_score_completions

    def scored(inputs: list[dict[str, Any]]) -> dict[str, Any]:
        return hook(inputs, score(inputs))

    trainer._generate_and_score_completions = scored
