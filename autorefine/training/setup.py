"""Pieces both trainers build the same way: retriever connection, policy and tokenizer, LoRA, metric recording."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from autorefine.config import LoraSettings, ModelSettings, RetrieverSettings
from autorefine.retrieval import RetrieverClient, RetrieverUnavailableError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer

logger = logging.getLogger(__name__)


class RunError(RuntimeError):
    """A run cannot start or continue; the message says what to do."""


def connect_retriever(settings: RetrieverSettings) -> RetrieverClient:
    """A client to a retriever that answered /health: checked before any model is loaded."""
    client = RetrieverClient(settings.url, timeout=settings.timeout_s, max_retries=settings.max_retries)
    try:
        status = client.wait_until_ready(timeout=settings.startup_wait_s)
    except RetrieverUnavailableError as err:
        client.close()
        raise RunError(
            f"{err}\nStart one first, e.g. `retriever-server serve --index DIR --port PORT`, "
            "and point retriever.url at it."
        ) from None
    logger.info("retriever at %s: %s", settings.url, status)
    # Never send more queries per request than the server accepts (its --max-queries).
    limit = status.get("max_queries")
    if isinstance(limit, int) and limit > 0:
        client.max_batch = min(client.max_batch, limit)
    return client


def load_tokenizer_and_policy(
    model: ModelSettings, tiny_model: dict[str, int] | None = None
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """The tokenizer and the policy in its configured dtype (or a fresh tiny Qwen2 when `tiny_model` is set)."""
    from autorefine.modeling import load_policy, load_tokenizer, tiny_qwen2

    tokenizer = load_tokenizer(model.tokenizer or model.name_or_path)
    if tiny_model is not None:
        return tokenizer, tiny_qwen2(tokenizer, **tiny_model)
    policy = load_policy(model.name_or_path, dtype=model.dtype)
    if model.attn_implementation:
        policy.set_attn_implementation(model.attn_implementation)
    return tokenizer, policy


def lora_config(settings: LoraSettings) -> Any:
    """A peft LoraConfig, or None when LoRA is off."""
    if not settings.enabled:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        task_type="CAUSAL_LM",
    )


def with_trainer_defaults(values: dict[str, Any]) -> dict[str, Any]:
    """Trainer arguments with bf16 on only where a GPU supports it, unless the config says otherwise."""
    import torch

    # TRL turns bf16 on by default; on a CPU that means bf16 autocast, several times slower than float32.
    values.setdefault("bf16", bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()))
    # TRL's default `gradient_checkpointing=True` is a deprecated alias in transformers 5 that warns on every
    # run; the same default under its new name.
    values.setdefault("activation_checkpointing", values.get("gradient_checkpointing", True))
    return values


def record_metric(trainer: Trainer, key: str, value: float) -> None:
    """Queue a training metric; TRL averages its queued metrics and logs them at the next logging step."""
    # TRL's trainers keep `_metrics[mode][key] -> list`; reusing it keeps our metrics on TRL's logging
    # cadence and in the same W&B run and console lines as TRL's own.
    trainer._metrics["train"][key].append(float(value))
