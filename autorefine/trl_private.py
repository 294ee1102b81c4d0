"""Every private TRL / transformers internal autorefine relies on, wrapped here; `tests/test_trl_private.py`
pins each one.

Each helper says why no public API does the job. When a TRL or transformers upgrade changes one of these,
the pinning test fails with the name of the attribute, instead of a run failing hours in.

One reach lies outside this module, because it is a class the engine is built on rather than a call:
`autorefine.rollout.hf_engine._ReservedLayer` subclasses transformers' `cache_utils.DynamicLayer` and relies on
its `keys`/`values`/`lazy_initialization`/`get_seq_length`/`batch_select_indices` contract (a KV cache that
writes into reserved room instead of concatenating). `tests/test_trl_private.py` pins that contract too.
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


def gathered_rewards(trainer: GRPOTrainer, names: list[str], weights: list[float]) -> list[float]:
    """The total reward of every process's rows of the batch TRL just scored, in TRL's (group) order."""
    # TRL gathers each reward function's scores over processes and keeps the latest generation batch in
    # `_logs["rewards"][name]` (a deque of the generation batch size); there is no public accessor, and
    # gathering them again would cost another collective per step.
    columns = [list(trainer._logs["rewards"][name]) for name in names]
    return [sum(w * v for w, v in zip(weights, row, strict=True)) for row in zip(*columns, strict=True)]


def latest_metric(trainer: Trainer, key: str) -> float | None:
    """The value TRL queued last for a training metric (e.g. `frac_reward_zero_std`), or None."""
    # TRL queues its own metrics in `_metrics["train"][key]` until the next logging step (see record_metric).
    values = trainer._metrics["train"].get(key)
    return float(values[-1]) if values else None


def colocated_vllm(trainer: GRPOTrainer) -> tuple[Any, Any]:
    """The `vllm.LLM` TRL runs inside the training processes (colocate mode), and its tensor-parallel group."""
    # TRL builds and owns the colocated engine in `trainer.vllm_generation`; it exposes no accessor for
    # generating outside its own single-turn rollout.
    generation = trainer.vllm_generation
    return generation.llm, getattr(generation, "tp_group", None)


def push_weights_to_vllm(trainer: GRPOTrainer) -> None:
    """Copy the policy's current weights into vLLM (colocated or server), as TRL does before a rollout batch."""
    # A held-out evaluation between TRL's own rollouts must generate with the current weights; TRL's sync is
    # a method of its private `vllm_generation` helper.
    trainer.vllm_generation.sync_weights()


def preference_collator() -> type:
    """TRL's preference collator class (not exported by `trl`), to extend with environment masks."""
    # The collator lays out chosen and rejected rows the way DPOTrainer's loss expects; writing our own would
    # duplicate that layout and drift from it.
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    return DataCollatorForPreference
