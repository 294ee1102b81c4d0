"""Loading policies and tokenizers (HF folders, hub names or GGUF files), LoRA adapters, and tiny Qwen2 models."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from autorefine.files import atomic_path
from autorefine.settings import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class ModelSettings:
    """Which policy to train and how to load it (the `model` section)."""

    name_or_path: str = "Qwen/Qwen2.5-3B"
    tokenizer: str | None = None  # defaults to name_or_path
    # "auto": float32 weights for full fine-tuning (bf16 compute comes from trainer.bf16); bf16 for LoRA's
    # frozen base, references and inference on a bf16 GPU; float32 elsewhere.
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    attn_implementation: str | None = None
    gguf_file: str | None = None  # a GGUF file inside name_or_path: weights and tokenizer load from it


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters through peft (the `lora` section; off unless `enabled`)."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # "auto": peft's "all-linear" (every linear projection of the decoder layers); or explicit names
    target_modules: list[str] | Literal["auto"] = "auto"


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


def load_tokenizer(name_or_path: str | Path, gguf_file: str | None = None) -> PreTrainedTokenizerBase:
    """A tokenizer with a pad token (EOS stands in when the tokenizer has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), gguf_file=gguf_file)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_gguf(
    gguf_file: str | Path, dtype: str = "float32"
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel, PreTrainedModel]:
    """Tokenizer, the model as transformers loads the GGUF, and the same weights as a plain (trainable) model.

    A GGUF-loaded model carries a quantizer that refuses `save_pretrained` and training; the plain model is
    built from the same config without it and receives the very same tensors.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_file}")
    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # dequantize=True: plain tensors whether or not a GGUF matmul kernel is installed.
    loaded = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=resolve_dtype(dtype), quantization_config=GgufConfig(dequantize=True)
    )
    values = {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    config = type(loaded.config).from_dict(values)
    plain = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(dtype))
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    return tokenizer, loaded.eval(), plain.eval()


def save_gguf_as_folder(gguf_file: str | Path, out: str | Path) -> None:
    """A GGUF file as a plain HF model folder in `out`: tokenizer (chat template included), config, generation
    config and the dequantized weights in float32, written to a sibling folder and renamed into place."""
    tokenizer, _, plain = load_gguf(gguf_file, dtype="float32")
    tokenizer.model_max_length = plain.config.max_position_embeddings  # GGUF tokenizers carry no limit
    with atomic_path(out) as partial:
        plain.save_pretrained(partial)
        tokenizer.save_pretrained(partial)


def load_policy(
    name_or_path: str | Path, dtype: str = "auto", device: str | None = None, gguf_file: str | None = None
) -> PreTrainedModel:
    """A causal LM in the requested dtype (TRL would otherwise load float32); from a GGUF file when given."""
    if gguf_file is not None:
        # The plain copy: a GGUF-loaded model carries a quantizer that refuses training and saving.
        model = load_gguf(Path(name_or_path) / gguf_file, dtype=dtype)[2]
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=resolve_dtype(dtype))
    return model.to(device) if device else model


def apply_adapter(model: PreTrainedModel, adapter: str | Path) -> PreTrainedModel:
    """`model` with the PEFT LoRA adapter saved in folder `adapter` merged into its weights (for inference)."""
    from peft import PeftModel

    folder = Path(adapter)
    if not (folder / "adapter_config.json").is_file():
        raise ConfigError(
            f"--adapter {folder}: no adapter_config.json there; expected a PEFT adapter folder "
            "(e.g. a LoRA run's final/adapter, or data/adapters/smollm2-sft-lora)"
        )
    try:
        # Merged: generation then runs at the base model's speed, with no adapter layers in the way.
        return PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    except (RuntimeError, ValueError, KeyError) as err:  # shapes or module names of another base model
        raise ConfigError(f"--adapter {folder} does not fit this base model: {err}") from err


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


def trained_weights_dtype(model: ModelSettings, lora: LoraSettings) -> str:
    """The dtype a policy is trained in: float32 master weights for full fine-tuning; LoRA's frozen base as
    configured ("auto": bf16 on a bf16 GPU).

    Compute still runs in bf16 with `trainer.bf16` (autocast). Weights stored in bf16 would not move: near a
    weight of 0.02 one bf16 step is ~1.2e-4, so an AdamW update of ~1e-6 (lr 1e-6) rounds away, and plain DDP
    (like one GPU) keeps no fp32 copy of its own.
    """
    if lora.enabled:
        return model.dtype
    if model.dtype in ("bfloat16", "float16"):
        raise ConfigError(
            f"model.dtype={model.dtype} with full fine-tuning would train {model.dtype} weights, whose updates "
            "round away at small learning rates (no fp32 master copy under DDP or on one GPU); set "
            "model.dtype=auto (or float32) and keep trainer.bf16=true for bf16 compute, or train LoRA adapters "
            "(lora.enabled=true), whose frozen base may stay in bf16"
        )
    return "float32"


def load_model_tokenizer(model: ModelSettings) -> PreTrainedTokenizerBase:
    """The tokenizer of a `model` section, without the weights."""
    # A separate tokenizer folder is read as such; otherwise it comes from where the weights do.
    if model.tokenizer:
        return load_tokenizer(model.tokenizer)
    return load_tokenizer(model.name_or_path, gguf_file=model.gguf_file)


def load_tokenizer_and_policy(
    model: ModelSettings,
    tiny_model: dict[str, int] | None = None,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    lora: LoraSettings | None = None,
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """The tokenizer (unless given) and the policy (a fresh tiny Qwen2 with `tiny_model`); given the run's
    `lora` settings, in the dtype it is trained in (`trained_weights_dtype`), else in its configured dtype."""
    tokenizer = tokenizer or load_model_tokenizer(model)
    dtype = model.dtype if lora is None else trained_weights_dtype(model, lora)
    if tiny_model is not None:
        return tokenizer, tiny_qwen2(tokenizer, **tiny_model).to(resolve_dtype(dtype))
    policy = load_policy(model.name_or_path, dtype=dtype, gguf_file=model.gguf_file)
    if model.attn_implementation:
        policy.set_attn_implementation(model.attn_implementation)
    return tokenizer, policy


def linear_module_names(model: PreTrainedModel) -> list[str]:
    """Names (last path component) of the linear projections inside the model's repeated decoder layers
    (what an explicit `lora.target_modules` may name).

    The output head and anything outside the layers (embeddings, vision towers) are left out; Conv1D
    (GPT-2 style) counts as linear.
    """
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    names: set[str] = set()
    for module_list in (m for m in model.modules() if isinstance(m, nn.ModuleList)):
        for layer in module_list:
            for name, module in layer.named_modules():
                if isinstance(module, nn.Linear | Conv1D) and module is not head and name:
                    names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def check_lora_targets(settings: LoraSettings, model: PreTrainedModel) -> None:
    """Refuse configured target names the model lacks, listing the linear layers it has."""
    if settings.target_modules == "auto":
        return
    available = linear_module_names(model)
    unknown = sorted(set(settings.target_modules) - set(available))
    if unknown:
        raise ConfigError(
            f"lora.target_modules {unknown} are not linear layers of {type(model).__name__}; "
            f"available: {', '.join(available)}"
        )


def lora_config(settings: LoraSettings, model: PreTrainedModel | None = None) -> Any:
    """A peft LoraConfig, or None when LoRA is off; "auto" is peft's "all-linear" (explicit names are
    checked against `model` when one is given)."""
    if not settings.enabled:
        return None
    from peft import LoraConfig

    if model is not None:
        check_lora_targets(settings, model)
    targets = "all-linear" if settings.target_modules == "auto" else list(settings.target_modules)
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
