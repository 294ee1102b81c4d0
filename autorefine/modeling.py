"""Loading policies and tokenizers, LoRA adapters, and tiny randomly initialised Qwen2 models for CPU work."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from autorefine.config import LoraSettings, ModelSettings

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    """Torch dtype from its config name ('auto' picks bf16 on a bf16-capable GPU, else float32)."""
    if name == "auto":
        return (
            torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
        )
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {['auto', *DTYPES]}, got {name!r}")
    return DTYPES[name]


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    """A tokenizer with a pad token (EOS stands in when the tokenizer has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(name_or_path: str | Path, dtype: str = "auto", device: str | None = None) -> PreTrainedModel:
    """A causal LM in the requested dtype (TRL would otherwise load float32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=resolve_dtype(dtype))
    return model.to(device) if device else model


def tiny_qwen2(
    tokenizer: PreTrainedTokenizerBase,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 4096,
    vocab_size: int | None = None,
    seed: int = 0,
) -> PreTrainedModel:
    """A randomly initialised Qwen2 causal LM sized for CPU tests, matched to `tokenizer`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def load_tokenizer_and_policy(
    model: ModelSettings, tiny_model: dict[str, int] | None = None
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """The tokenizer and the policy in its configured dtype (or a fresh tiny Qwen2 when `tiny_model` is set)."""
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
