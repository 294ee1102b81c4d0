"""TRL trainer arguments as autorefine sets them, and the error a run raises when it cannot start or go on."""

from __future__ import annotations

from typing import Any


class RunError(RuntimeError):
    """A run cannot start or continue; the message says what to do."""


def with_trainer_defaults(values: dict[str, Any]) -> dict[str, Any]:
    """Trainer arguments with bf16 on only where a GPU supports it, unless the config says otherwise."""
    import torch

    # TRL turns bf16 on by default; on a CPU that means bf16 autocast, several times slower than float32.
    values.setdefault("bf16", bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()))
    # TRL's default `gradient_checkpointing=True` is a deprecated alias in transformers 5 that warns on every
    # run; the same default under its new name.
    values.setdefault("activation_checkpointing", values.get("gradient_checkpointing", True))
    return values
