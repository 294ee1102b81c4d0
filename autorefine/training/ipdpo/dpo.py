"""One round's DPO on TRL's DPOTrainer: arguments, the trainer over checked pairs, and what it logged.

The policy a round starts from is also its frozen reference (a second copy, TRL's precomputed reference
log-probs, or with LoRA the adapter-free model); the loss is sigmoid DPO plus TRL's "sft" NLL term on the
chosen trajectory, over model tokens only (see `dpo_data`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autorefine.config import IPDPORunConfig
from autorefine.files import atomic_path
from autorefine.settings import check_trainer_args
from autorefine.training.arguments import RunError, check_saving, require_devices, with_trainer_defaults
from autorefine.training.distributed import on_main
from autorefine.training.ipdpo.pairs import read_pairs

if TYPE_CHECKING:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer


def make_dpo_args(config: IPDPORunConfig, output_dir: Path, *, check_only: bool = False) -> DPOConfig:
    """TRL arguments of one round's DPO epoch, from the `trainer` section plus what autorefine derives
    (`check_only`: built on the CPU where the GPU they ask for is missing, see `require_devices`)."""
    from trl import DPOConfig

    derived = {
        "loss_type": "nll_weight (sigmoid DPO, plus TRL's 'sft' NLL term when nll_weight > 0)",
        "loss_weights": "nll_weight",
        "remove_unused_columns": "autorefine (the collator reads the environment-mask columns)",
    }
    values = with_trainer_defaults(
        check_trainer_args(DPOConfig, config.trainer, forbidden=derived), DPOConfig
    )
    require_devices(values, check_only=check_only)
    check_saving(values)
    if values.get("sync_ref_model"):
        raise RunError(
            "trainer.sync_ref_model moves the reference during the epoch; IP-DPO keeps each round's starting "
            "policy as its frozen reference. Turn it off."
        )
    values.setdefault("num_train_epochs", 1)
    # Every process waits at the end of sampling for the slowest one; the default 30 min can be too short.
    values.setdefault("ddp_timeout", 4 * 3600)
    values["output_dir"] = str(output_dir)
    loss_type, weights = ["sigmoid"], [1.0]
    if config.nll_weight > 0:
        loss_type, weights = ["sigmoid", "sft"], [1.0, config.nll_weight]
    return DPOConfig(**values, loss_type=loss_type, loss_weights=weights, remove_unused_columns=False)


def pairs_on_disk(pairs_file: Path, max_length: int | None) -> tuple[Dataset | None, int]:
    """The pairs of `pairs_file` that fit `max_length` as a dataset in `<pairs_file stem>.arrow/` beside it, built
    by the main process and memory-mapped by every process; also how many were dropped for length.

    TRL writes its precomputed reference log-probs next to the dataset's files and every process reads them
    back: an in-memory dataset would send each process to a temporary folder of its own. Rebuilt on every
    call, so the folder always matches the pairs file (and stale caches go with it).
    """
    from accelerate import PartialState
    from datasets import load_from_disk

    from autorefine.training.ipdpo.collator import pairs_dataset

    folder = pairs_file.with_suffix(".arrow")

    def build() -> tuple[bool, int]:
        dataset, dropped = pairs_dataset(read_pairs(pairs_file), max_length)
        if dataset is not None:
            with atomic_path(folder) as partial:
                dataset.save_to_disk(str(partial))
        return dataset is not None, dropped

    built, dropped = on_main(PartialState(), build)
    return (load_from_disk(str(folder)) if built else None), dropped


def build_dpo_trainer(
    config: IPDPORunConfig, args: DPOConfig, policy: str, pairs_file: Path, accuracy_pairs: int = 0
) -> tuple[DPOTrainer, dict[str, int]]:
    """A DPOTrainer on the pairs of `pairs_file`, starting from `policy`, which is also the frozen reference."""
    from autorefine.modeling import load_policy, load_tokenizer_and_policy, lora_config
    from autorefine.training.ipdpo.collator import MaskedPreferenceCollator
    from autorefine.trl_private import pretokenized_dpo_trainer

    dataset, dropped = pairs_on_disk(pairs_file, args.max_length)
    if dataset is None:
        raise RunError(
            f"{pairs_file}: every pair is longer than trainer.max_length={args.max_length}; raise it (pairs are "
            "never truncated)"
        )
    tokenizer, model = load_tokenizer_and_policy(
        dataclasses.replace(config.model, name_or_path=policy), lora=config.lora
    )
    # With LoRA the reference is the adapter-free model; with precomputed reference log-probs TRL scores the
    # policy once before its first update. Otherwise a frozen copy of the round's starting policy.
    needs_copy = not config.lora.enabled and not args.precompute_ref_log_probs
    reference = load_policy(policy, dtype=config.model.dtype) if needs_copy else None
    evaluated = dataset.select(range(min(accuracy_pairs, len(dataset)))) if accuracy_pairs > 0 else None
    trainer = pretokenized_dpo_trainer()(
        model=model,
        ref_model=reference,
        args=args,
        data_collator=MaskedPreferenceCollator(pad_token_id=tokenizer.pad_token_id),
        train_dataset=dataset,
        eval_dataset=evaluated,
        processing_class=tokenizer,
        peft_config=lora_config(config.lora),
    )
    return trainer, {"pairs": len(dataset), "dropped_for_length": dropped}


def dpo_metrics(log_history: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means of TRL's logged DPO metrics over the epoch, and their first and last logged values."""
    out: dict[str, Any] = {}
    keys = (
        "loss",
        "rewards/accuracies",
        "rewards/margins",
        "rewards/chosen",
        "rewards/rejected",
        "logps/chosen",
    )
    for key in keys:
        values = [h[key] for h in log_history if key in h]
        if values:
            name = key.replace("/", "_")
            out[f"{name}_mean"] = sum(values) / len(values)
            out[f"{name}_first"] = values[0]
            out[f"{name}_last"] = values[-1]
    final = [h["train_loss"] for h in log_history if "train_loss" in h]
    if final:
        out["train_loss"] = final[-1]  # the epoch's mean loss, logged even when no step reached logging_steps
    steps = [h.get("step", 0) for h in log_history]
    out["steps"] = max(steps) if steps else 0
    return out
