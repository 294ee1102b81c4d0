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
from autorefine.rollout.engine import SamplingParams
from autorefine.training.pairs import PairSettings


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
    """Where the retrieval server (or its replicas) is and how patiently to talk to it."""

    url: str | list[str] = "http://127.0.0.1:8000"  # one URL, a list, or "URL,URL": replicas of one index
    timeout_s: float = 60.0
    max_retries: int = 5
    startup_wait_s: float = 30.0
    probe_interval_s: float = 5.0  # how often a replica that failed is checked again
    api_key_file: str | None = (
        None  # file holding the server's bearer token (else $AUTOREFINE_RETRIEVER_API_KEY)
    )

    def __post_init__(self) -> None:
        from autorefine.retrieval import parse_urls

        parse_urls(self.url)


@dataclass(frozen=True)
class LoggingSettings:
    """What is logged besides TRL's own metrics."""

    sample_table_every: int = 10  # steps between tables of sample trajectories (0: never)
    sample_table_rows: int = 4
    save_rollouts: bool = False  # every trajectory (ids, masks, reward) to <output_dir>/rollouts/rank-R.jsonl


GuardAction = Literal["off", "warn", "stop", "rollback"]
GuardTest = Literal["below", "above", "fall_factor", "rise_factor", "rise", "drop_from_best"]


@dataclass(frozen=True)
class GuardRule:
    """One collapse rule: fires when `signal` (a logged metric) passes `test` against `threshold`.

    Tests: `below`/`above` a fixed value; `fall_factor`/`rise_factor`: below median ÷ threshold or above
    median × threshold, the median of the signal's previous `guard.window` values; `rise`: above that median +
    threshold; `drop_from_best`: at least threshold below the best value so far. `patience` consecutive observations
    must pass the test before the rule fires.
    """

    signal: str
    test: GuardTest
    threshold: float
    action: GuardAction = "warn"
    patience: int = 1

    def __post_init__(self) -> None:
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")
        if self.test in ("fall_factor", "rise_factor") and self.threshold <= 1:
            raise ValueError(f"a {self.test} threshold is a factor > 1, got {self.threshold}")


@dataclass(frozen=True)
class GuardSettings:
    """Collapse detection over the logged health signals, and what to do when a rule fires."""

    window: int = 10  # previous observations whose median `fall_factor`/`rise_factor`/`rise` compare against
    warmup: int = 5  # observations of a signal before its median-based rules may fire
    max_rollbacks: int = 2  # then a rollback rule stops the run instead
    rollback_lr_factor: float = 0.5  # each rollback multiplies the learning rate by this
    # TRL's `entropy` (mean over the model's tokens, any engine) falls under a floor: the policy turned
    # deterministic ...
    entropy_floor: GuardRule = field(default_factory=lambda: GuardRule("entropy", "below", 0.02, patience=2))
    # ... or to a third of its running median within a few steps.
    entropy_fall: GuardRule = field(
        default_factory=lambda: GuardRule("entropy", "fall_factor", 3.0, patience=2)
    )
    # Degenerate text: entropy climbing well above its running median.
    entropy_rise: GuardRule = field(
        default_factory=lambda: GuardRule("entropy", "rise_factor", 1.5, patience=2)
    )
    # Turns without a usable action (each answered with a corrective message) jump.
    malformed_rise: GuardRule = field(
        default_factory=lambda: GuardRule("health/corrective_rate", "rise", 0.15, patience=2)
    )
    # Completions running into the length cap jump.
    length_cap_rise: GuardRule = field(
        default_factory=lambda: GuardRule("rollout/finish_length", "rise", 0.15, patience=2)
    )
    # Held-out EM falls 5 points or more below the best seen (including the evaluation before the first step).
    heldout_drop: GuardRule = field(
        default_factory=lambda: GuardRule("heldout/em", "drop_from_best", 0.05, action="warn")
    )
    # More rules by name, e.g. {clip_spike: {signal: clip_ratio/region_mean, test: above, threshold: 0.2}}.
    extra: dict[str, GuardRule] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if clash := {f.name for f in dataclasses.fields(self)} & set(self.extra):
            raise ValueError(f"extra rules may not reuse the names {sorted(clash)}")
        if self.window < 1 or self.warmup < 1 or self.max_rollbacks < 0:
            raise ValueError("window and warmup must be >= 1 and max_rollbacks >= 0")
        if not 0 < self.rollback_lr_factor < 1:
            raise ValueError(f"rollback_lr_factor must be in (0, 1), got {self.rollback_lr_factor}")

    @property
    def rules(self) -> dict[str, GuardRule]:
        """Every rule that is not off, by name (the named ones, then `extra`)."""
        named = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        rules = {name: rule for name, rule in named.items() if isinstance(rule, GuardRule)}
        return {name: rule for name, rule in {**rules, **self.extra}.items() if rule.action != "off"}


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
    guard: GuardSettings = field(default_factory=GuardSettings)
    drop_flat_groups: bool = (
        False  # groups whose rewards are all equal leave the loss (see training/flat_groups.py)
    )
    eval_temperature: float = 0.0  # validation decoding (0: greedy)


@dataclass(frozen=True)
class SFTRunConfig(RunConfig):
    """Everything `autorefine train-sft` needs."""

    traces_file: str | None = None  # saved trajectories to imitate; None: build gold-like traces from data
    require_evidence: bool = True  # gold traces only where the retrieved documents contain the answer
    tiny_model: dict[str, int] | None = None  # build a fresh tiny Qwen2 of this shape instead of loading one


@dataclass(frozen=True)
class SamplingSettings:
    """How each IP-DPO round samples: K trajectories per question with the current policy."""

    samples_per_question: int = 8
    questions_per_round: int | None = None  # None: every training question, every round
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    batch_questions: int = 32  # questions per agent-loop batch (× samples_per_question trajectories)
    engine: Literal["transformers", "vllm"] = "transformers"
    engine_batch_size: int | None = None  # most sequences per generate call (None: the whole batch)
    matcher: str = "lexical"  # process-score evidence matcher: lexical | embedding | embedding:<model>

    def __post_init__(self) -> None:
        if self.samples_per_question < 2:
            raise ValueError("sampling.samples_per_question must be at least 2: a pair needs two samples")
        if self.questions_per_round is not None and self.questions_per_round < 1:
            raise ValueError("sampling.questions_per_round must be positive (or null for all)")
        if self.batch_questions < 1:
            raise ValueError("sampling.batch_questions must be positive")
        kind, _, model = self.matcher.partition(":")
        if not (kind == "embedding" or (kind == "lexical" and not model)):
            raise ValueError(
                f"sampling.matcher must be lexical, embedding or embedding:<model>, got {self.matcher!r}"
            )
        self.params  # noqa: B018  # the same checks as at sampling time

    @property
    def params(self) -> SamplingParams:
        """Token sampling of every trajectory."""
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)


@dataclass(frozen=True)
class RoundHeldoutSettings:
    """Greedy evaluation on held-out questions after every IP-DPO round (and of the starting policy)."""

    file: str | None = None  # FlashRAG questions; None: no held-out evaluation
    limit: int | None = None  # use only the first N questions
    batch_size: int = 64
    evaluate_start: bool = True  # also evaluate the starting policy (round 0), the baseline of every round


@dataclass(frozen=True)
class IPDPOLoggingSettings:
    """What IP-DPO logs besides TRL's own DPO metrics."""

    pair_table_rows: int = 8  # example pairs per round (W&B table and round-k/pair_examples.md)
    pair_accuracy_pairs: int = 512  # training pairs re-scored after each round's epoch (0: skip)


@dataclass(frozen=True)
class IPDPORunConfig(RunConfig):
    """Everything `autorefine train-ipdpo` needs; `trainer` holds trl.DPOConfig arguments."""

    heldout: RoundHeldoutSettings = field(default_factory=RoundHeldoutSettings)
    rounds: int = 3
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    reward: RewardConfig = field(default_factory=RewardConfig)  # the outcome metric of the scores
    pairs: PairSettings = field(default_factory=PairSettings)
    nll_weight: float = 1.0  # weight of the NLL ("sft") term on chosen trajectories; 0: DPO alone
    logging: IPDPOLoggingSettings = field(default_factory=IPDPOLoggingSettings)

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {self.rounds}")
        if self.nll_weight < 0:
            raise ValueError(f"nll_weight must be >= 0, got {self.nll_weight}")


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
    """Plain nested dict of a run config (for logging and saving next to checkpoints)."""
    return dataclasses.asdict(config)
