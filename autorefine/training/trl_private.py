"""The only place that touches private TRL / transformers trainer internals; `tests/test_trl_private.py` pins them.

Each helper says why no public API does the job. When a TRL or transformers upgrade changes one of these,
the pinning test fails with the name of the attribute, instead of a run failing hours in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import Trainer


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
