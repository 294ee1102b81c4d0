"""Groups whose rewards are all equal leave the loss (`drop_flat_groups: true`).

TRL 1.16 has no such option. A group whose samples all got the same reward has zero advantage everywhere, so
its policy-gradient term is already zero; what it still does is add its tokens to the loss normaliser (diluting
the groups that do carry a signal) and take part in the KL and entropy terms. Here the loss mask (TRL's
`tool_mask`, our `env_mask`) of every sample of such a group is zeroed after TRL computed the advantages, and
`num_items_in_batch` is recounted, so:

- `loss_type` dapo and bnpo (token-normalised): the flat groups leave the policy loss, the normaliser, the
  KL term and the entropy bonus entirely — DAPO's dynamic-sampling filter, without re-sampling to refill
  the batch;
- grpo and dr_grpo (per-sequence mean, or a constant per sequence): they leave the KL term and the entropy
  bonus, but each still counts as one (zero) row in the batch mean, so the update is not renormalised.

Groups are TRL's: `num_generations` consecutive samples of the generation batch gathered over processes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from autorefine.training.health import flat_groups

if TYPE_CHECKING:
    from trl import GRPOTrainer

    from autorefine.training.rewards import ScoredBatch


class DropFlatGroups:
    """`ScoredBatch` subscriber: zero the loss mask of samples in groups whose rewards are all equal."""

    def __init__(self, trainer: GRPOTrainer) -> None:
        self.trainer = trainer
        self.dropped_groups = 0
        self.groups = 0

    def __call__(self, scored: ScoredBatch) -> None:
        """Mask this process's rows of flat groups out of the loss (training batches only)."""
        if not scored.training:
            return
        acc = self.trainer.accelerator
        batch = scored.batch
        flat = flat_groups(scored.all_rewards, scored.group_size)
        per_sample = torch.tensor(flat, device=acc.device).repeat_interleave(scored.group_size)
        rows = len(scored.trajectories)
        mine = per_sample[acc.process_index * rows : (acc.process_index + 1) * rows]
        keep = (~mine).to(batch["completion_mask"].dtype).unsqueeze(1)
        mask_key = "tool_mask" if "tool_mask" in batch else "completion_mask"
        batch[mask_key] = batch[mask_key] * keep
        loss_mask = (
            batch["completion_mask"] * batch["tool_mask"]
            if "tool_mask" in batch
            else batch["completion_mask"]
        )
        batch["num_items_in_batch"] = acc.gather(loss_mask.sum()).sum()
        self.dropped_groups += sum(flat)
        self.groups += len(flat)
