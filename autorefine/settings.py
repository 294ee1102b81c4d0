"""Typed settings from YAML: presets plus `section.key=value` overrides, checked before anything loads.

Every settings section is a frozen dataclass that lives beside the code that reads it (`RetrieverSettings`
with the retrieval client, `ModelSettings` with model loading, `GuardSettings` with the guard, ...); a run
config (`autorefine.config`) composes them. This module is the machinery: parse YAML, apply overrides, build
the dataclasses, check names and types. An unknown key or a value of the wrong type stops the run at start
with the list of valid keys. The `trainer` section is TRL's own config class, checked against its fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml


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
            # A section given in part keeps the other keys of its default (`guard.heldout_drop.action=stop`).
            default = _default_of(fields[name])
            if dataclasses.is_dataclass(default) and isinstance(value, dict):
                value = {**dataclasses.asdict(default), **value}
            values[name] = build(hint, value, key)
        elif typing.get_origin(hint) is dict and dataclasses.is_dataclass(typing.get_args(hint)[1]):
            if not isinstance(value, dict):
                raise ConfigError(f"{key} must be a mapping of names to sections, got {type(value).__name__}")
            item = typing.get_args(hint)[1]
            values[name] = {str(k): build(item, v, _join(key, str(k))) for k, v in value.items()}
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


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


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
    if typing.get_origin(hint) in (list, tuple) and typing.get_args(hint):
        return f"list, each a {_describe(typing.get_args(hint)[0])}"
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
    """Plain nested dict of a run config (for logging and saving next to checkpoints); a dict is copied."""
    return dict(config) if isinstance(config, dict) else dataclasses.asdict(config)


def write_run_config(folder: str | Path, config: Any) -> None:
    """Write a run config (a dataclass or its dict) as `autorefine_config.yaml` into `folder`: how a policy was made."""
    Path(folder, RUN_CONFIG_FILE).write_text(
        yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8"
    )
