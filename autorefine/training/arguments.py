"""TRL trainer arguments as autorefine sets them, and the error a run raises when it cannot start or go on."""

from __future__ import annotations

import dataclasses
from typing import Any


class RunError(RuntimeError):
    """A run cannot start or continue; the message says what to do."""


def with_trainer_defaults(values: dict[str, Any], args_cls: type | None = None) -> dict[str, Any]:
    """Trainer arguments with bf16 on only where a GPU supports it, unless the config says otherwise."""
    import torch

    # TRL turns bf16 on by default; on a CPU that means bf16 autocast, several times slower than float32.
    values.setdefault("bf16", bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()))
    # TRL's default `gradient_checkpointing=True` is a deprecated alias in newer transformers 5 releases that
    # warns on every run; the same default under the name this transformers knows.
    fields = {f.name for f in dataclasses.fields(args_cls)} if args_cls is not None else set()
    if args_cls is None or "activation_checkpointing" in fields:
        values.setdefault("activation_checkpointing", values.get("gradient_checkpointing", True))
    return values


def gpu_switches(values: dict[str, Any]) -> list[str]:
    """The trainer switches that need a CUDA GPU (bf16/fp16, vLLM), unless `use_cpu` asks for the CPU."""
    # `use_cpu: true` asks for CPU training on purpose (bf16 autocast, vLLM's CPU build).
    return [] if values.get("use_cpu") else [key for key in ("bf16", "fp16", "use_vllm") if values.get(key)]


def require_devices(values: dict[str, Any], *, check_only: bool = False) -> None:
    """Stop with one line when the arguments need a CUDA GPU (bf16/fp16, vLLM) and none is visible.

    `check_only` (`--check` on a machine without the GPU): build the arguments on the CPU instead, so every
    other check still runs; the GPU is reported as something the launch needs.
    """
    import torch

    if torch.cuda.is_available():
        return
    needs = gpu_switches(values)
    if needs and check_only:
        values["use_cpu"] = True
    elif needs:
        raise RunError(
            f"this configuration needs a CUDA GPU (trainer.{', trainer.'.join(f'{k}=true' for k in needs)}) "
            "and none is visible here; on a CPU start from configs/grpo/tiny-cpu.yaml or set those to false"
        )


def check_saving(values: dict[str, Any]) -> None:
    """Refuse `save_on_each_node`: a run's output folder is one folder every node shares, written once."""
    if values.get("save_on_each_node"):
        raise RunError(
            "trainer.save_on_each_node=true makes the first process of every node write the same checkpoint, "
            "while best/, the run config and IP-DPO's round files are written once, by the main process, and read "
            "by every node: leave it false and put trainer.output_dir on a filesystem every node shares "
            "(README: More than one node)"
        )
