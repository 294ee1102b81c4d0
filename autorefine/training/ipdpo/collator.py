"""Pre-tokenized preference data for TRL's DPOTrainer, with environment tokens masked out of the loss.

TRL's preference collator marks every completion token as trained. Ours marks only the tokens the model
sampled (`completion_mask = [0] * len(prompt) + env_mask`): TRL's loss then turns every other label into
-100, so inserted documents and corrective messages stay in the sequence (attended) but add nothing to the
chosen/rejected log-probabilities, the DPO log-ratios or the NLL ("sft") term.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from autorefine.trl_private import preference_collator

COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids", "chosen_env_mask", "rejected_env_mask")


def dpo_example(pair: dict[str, Any]) -> dict[str, list[int]]:
    """The columns the trainer reads, from one checked pair (see `autorefine.training.ipdpo.pairs.check_pair`)."""
    chosen, rejected = pair["chosen"], pair["rejected"]
    return {
        "prompt_ids": chosen["prompt_ids"],
        "chosen_ids": chosen["completion_ids"],
        "rejected_ids": rejected["completion_ids"],
        "chosen_env_mask": chosen["env_mask"],
        "rejected_env_mask": rejected["env_mask"],
    }


def longest_side(example: dict[str, list[int]]) -> int:
    """Tokens of the longer of prompt + chosen and prompt + rejected."""
    return len(example["prompt_ids"]) + max(len(example["chosen_ids"]), len(example["rejected_ids"]))


def pairs_dataset(
    pairs: Iterable[dict[str, Any]], max_length: int | None, chunk: int = 2048
) -> tuple[Any, int]:  # -> (datasets.Dataset | None, pairs dropped for length)
    """A dataset of the pairs that fit `max_length` (longer ones are dropped and counted, never truncated)."""
    from datasets import Dataset, Features, Sequence, Value, concatenate_datasets

    features = Features({name: Sequence(Value("int32")) for name in COLUMNS})
    parts, rows, dropped = [], [], 0
    for pair in pairs:
        example = dpo_example(pair)
        if max_length is not None and longest_side(example) > max_length:
            dropped += 1
            continue
        rows.append(example)
        if len(rows) == chunk:  # Arrow chunks keep memory flat for large rounds
            parts.append(Dataset.from_list(rows, features=features))
            rows = []
    if rows:
        parts.append(Dataset.from_list(rows, features=features))
    return (concatenate_datasets(parts) if parts else None), dropped


@dataclass
class MaskedPreferenceCollator(preference_collator()):
    """TRL's preference collator with `completion_mask` set to the environment masks of the two trajectories.

    Batches are laid out as TRL's: chosen rows first, then rejected rows, right-padded. Nothing is truncated
    here (`max_length` must stay None): over-long pairs are dropped when the dataset is built.
    """

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        """TRL's batch, with model-token-only completion masks."""
        if self.max_length is not None:
            raise ValueError("MaskedPreferenceCollator never truncates; drop long pairs with pairs_dataset")
        batch = super().torch_call(examples)
        prompts = [len(e["prompt_ids"]) for e in examples] * 2
        env_masks = [e["chosen_env_mask"] for e in examples] + [e["rejected_env_mask"] for e in examples]
        completion = batch["completion_mask"]
        masked = torch.zeros_like(completion)
        for row, (prompt, env_mask) in enumerate(zip(prompts, env_masks, strict=True)):
            if int(completion[row].sum()) != len(env_mask):
                raise ValueError(
                    f"row {row}: env_mask has {len(env_mask)} entries for a longer or shorter completion"
                )
            masked[row, prompt : prompt + len(env_mask)] = torch.tensor(env_mask, dtype=completion.dtype)
        batch["completion_mask"] = masked
        return batch
