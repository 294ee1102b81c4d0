"""Keeping the processes of a distributed job in step, turn by turn, while they generate.

A sharded policy (FSDP, DeepSpeed ZeRO-3) runs collectives in every forward pass, and a tensor-parallel vLLM
needs every rank of its group in each `generate` call: if one process runs a turn that another skips, both wait
forever. So every process calls the engine once per turn, with no prompts once its own trajectories are done,
until a group-wide flag says that no process has work left. The same exchange carries failures: a rank whose
searcher or engine raised stops, and its exception is raised on every rank, so none is left waiting in a
collective. (An engine that fails inside a collective of its own — a sharded forward pass, a tensor-parallel
vLLM's gather — still leaves the ranks already in that collective waiting until its timeout.)
"""

from __future__ import annotations

import logging
import pickle
from typing import Any

import torch

logger = logging.getLogger(__name__)


class Lockstep:
    """One process group that generates in step (default: every process of the job)."""

    def __init__(self, group: Any = None, device: torch.device | str = "cpu") -> None:
        import torch.distributed as dist

        self.group = group
        self.device = torch.device(device)
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def next_turn(self, active: bool, error: BaseException | None = None) -> bool:
        """True while any rank still has trajectories to continue; raises everywhere once any rank failed."""
        import torch.distributed as dist

        flags = torch.tensor([float(active), float(error is not None)], device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        if flags[1].item() > 0:
            self._raise_shared(error)
        return flags[0].item() > 0

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on some rank."""
        import torch.distributed as dist

        value = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.group)
        return value.item() > 0

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order."""
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def _raise_shared(self, error: BaseException | None) -> None:
        reports = self.gather(_portable(error) if error is not None else None)
        if error is not None:
            raise error
        rank, shared = next((r, e) for r, e in enumerate(reports) if e is not None)
        shared.add_note(f"(raised on rank {rank}; rank {self.rank} stopped with it)")
        raise shared


def _portable(error: BaseException) -> BaseException:
    """`error` itself when it survives pickling (so other ranks raise the same type), else a RuntimeError."""
    try:
        return pickle.loads(pickle.dumps(error))
    except Exception:  # any exception type may fail to pickle or to rebuild
        return RuntimeError(f"{type(error).__name__}: {error}")
