"""Typed run configurations: YAML presets plus `section.key=value` overrides, checked before anything loads.

Every section is a dataclass; the `trainer` section is TRL's own `GRPOConfig` / `SFTConfig`, checked against
its fields. An unknown key or a value of the wrong type stops the run at start with the list of valid keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from autorefine.rewards import RewardConfig
from autorefine.rollout.agent import RolloutConfig


class _Yaml12Loader(yaml.SafeLoader):
    """YAML with 1.2 booleans: only true/false, so `save_strategy: no` stays the string "no"."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def parse_yaml(text: str) -> Any:
    """Parse YAML with 1.2 booleans (see `_Yaml12Loader`)."""
    return yaml.load(text, Loader=_Yaml12Loader)  # a SafeLoader subclass: no arbitrary objects


# Written by the trainers into every run folder, checkpoint and final policy: how that policy was made.
RUN_CONFIG_FILE = "autorefine_config.yaml"


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key and the valid choices."""


@dataclass(frozen=True)
class ModelSettings:
    """Which policy to train and how to load it."""

    name_or_path: str = "Qwen/Qwen2.5-3B"
    tokenizer: str | None = None  # defaults to name_or_path
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    attn_implementation: str | None = None
    gguf_file: str | None = None  # a GGUF file inside name_or_path: weights and tokenizer load from it


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters through peft (off unless `enabled`)."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # "auto": every linear projection inside the decoder layers (found from the model); or explicit names
    target_modules: list[str] | Literal["auto"] = "auto"


@dataclass(frozen=True)
class DataSettings:
    """Training questions in FlashRAG format (`id`, `question`, `golden_answers`)."""

    train_file: str = "data/prepared/train.jsonl"


@dataclass(frozen=True)
class HeldoutSettings:
    """Periodic greedy evaluation on held-out (validation) questions during training."""

    file: str | None = None  # FlashRAG questions; None: no held-out evaluation
    limit: int | None = None  # use only the first N questions
    every: int = 0  # steps between evaluations (0: never); also evaluated before the first step
    batch_size: int = 64
    save_best: bool = True  # keep the best-reward policy in <output_dir>/best
    stop_at_em: float | None = None  # stop training once held-out EM reaches this


@dataclass(frozen=True)
class RetrieverSettings:
    """Where the retrieval server is and how patiently to talk to it."""

    url: str = "http://127.0.0.1:8000"
    timeout_s: float = 60.0
    max_retries: int = 5
    startup_wait_s: float = 30.0


@dataclass(frozen=True)
class LoggingSettings:
    """What is logged besides TRL's own metrics."""

    sample_table_every: int = 10  # steps between tables of sample trajectories (0: never)
    sample_table_rows: int = 4
    save_rollouts: bool = False  # every trajectory (ids, masks, reward) to <output_dir>/rollouts/rank-R.jsonl


@dataclass(frozen=True)
class RunConfig:
    """Sections every training run has."""

    model: ModelSettings = field(default_factory=ModelSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataSettings = field(default_factory=DataSettings)
    heldout: HeldoutSettings = field(default_factory=HeldoutSettings)
    retriever: RetrieverSettings = field(default_factory=RetrieverSettings)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    template: str | None = None  # prompt template file (None: the packaged AutoRefine-style template)
    trainer: dict[str, Any] = field(default_factory=dict)  # trl.GRPOConfig / trl.SFTConfig arguments


@dataclass(frozen=True)
class GRPORunConfig(RunConfig):
    """Everything `autorefine train-grpo` needs."""

    reward: RewardConfig = field(default_factory=RewardConfig)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    eval_temperature: float = 0.0  # validation decoding (0: greedy)


@dataclass(frozen=True)
class SFTRunConfig(RunConfig):
    """Everything `autorefine train-sft` needs."""

    traces_file: str | None = None  # saved trajectories to imitate; None: build gold-like traces from data
    require_evidence: bool = True  # gold traces only where the retrieved documents contain the answer
    tiny_model: dict[str, int] | None = None  # build a fresh tiny Qwen2 of this shape instead of loading one


def load_config(cls: type, path: str | Path | None, overrides: list[str] = ()) -> Any:
    """Read a YAML preset (or defaults), apply `a.b=value` overrides, and build a checked `cls` instance."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = parse_yaml(path.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        data = loaded
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        _set_path(data, key.strip().split("."), parse_yaml(raw) if raw.strip() else None)
    return build(cls, data, "")


def build(cls: type, data: Any, where: str) -> Any:
    """Construct dataclass `cls` from a mapping, recursing into nested sections, checking names and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _reject_unknown(set(data) - set(fields), fields, where, where)
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        key = _join(where, name)
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = build(hint, value, key)
        else:
            values[name] = check_type(value, hint, key)
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where or 'config'}: {err}") from err


_OLD_TRAINER_NAMES = {
    "activation_checkpointing": "gradient_checkpointing",
    "activation_checkpointing_kwargs": "gradient_checkpointing_kwargs",
}


def check_trainer_args(
    args_cls: type, data: dict[str, Any], forbidden: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Check a `trainer` section against a TRL config class; `forbidden` maps keys to where they must be set."""
    fields = {f.name for f in dataclasses.fields(args_cls) if f.init}
    # Presets use the names of transformers >= 5.23; older 5.x releases take the same options under the old ones.
    data = {
        (
            _OLD_TRAINER_NAMES[key] if key not in fields and _OLD_TRAINER_NAMES.get(key) in fields else key
        ): value
        for key, value in data.items()
    }
    _reject_unknown(set(data) - fields, fields, "trainer", f"trainer (trl.{args_cls.__name__})")
    for key, instead in (forbidden or {}).items():
        if key in data:
            raise ConfigError(f"trainer.{key} is derived from {instead}; set that instead")
    hints = typing.get_type_hints(args_cls)
    return {key: check_type(value, hints[key], f"trainer.{key}") for key, value in data.items()}


def _reject_unknown(unknown: set[str], valid: Any, where: str, section: str) -> None:
    if not unknown:
        return
    hints = []
    for key in sorted(unknown):
        close = difflib.get_close_matches(key, list(valid), n=1)
        hints.append(_join(where, key) + (f" (did you mean {close[0]}?)" if close else ""))
    raise ConfigError(
        f"unknown key(s) {', '.join(hints)}; valid keys{' in ' + section if section else ''}: "
        + ", ".join(sorted(valid))
    )


def check_type(value: Any, hint: Any, key: str) -> Any:
    """Return `value` (floats from numeric strings like '3e-4') if it fits `hint`, else raise ConfigError."""
    ok, converted = _fits(value, hint)
    if not ok:
        raise ConfigError(f"{key} = {value!r} is not a valid {_describe(hint)}")
    return converted


def _fits(value: Any, hint: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(hint)
    if hint is Any or hint is object:
        return True, value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            ok, converted = _fits(value, option)
            if ok:
                return True, converted
        return False, value
    if hint is type(None):
        return value is None, value
    if origin is Literal:
        return value in typing.get_args(hint), value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, int | float):
            return True, float(value)
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if hint is str:
        return isinstance(value, str), value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            return False, value
        (item_hint, *_) = typing.get_args(hint) or (Any,)
        items = [_fits(v, item_hint) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    if origin is dict or hint is dict:
        return isinstance(value, dict), value
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return value in {m.value for m in hint} or isinstance(value, hint), value
    if isinstance(hint, type):
        return isinstance(value, hint), value
    return True, value  # exotic annotations: let the library validate


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "choice among " + ", ".join(repr(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(option) for option in typing.get_args(hint))
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _set_path(data: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        node = data.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {'.'.join(keys)}: {key} is not a section")
        data = node
    data[keys[-1]] = value


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict of a run config (for logging and saving next to checkpoints)."""
    return dataclasses.asdict(config)
