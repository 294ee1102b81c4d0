"""Collapse detection, the pure part: rules over the logged health signals, checked before a run starts.

`Guard` sees one observation of the signals per logged step and returns the rules that fire;
`autorefine.training.guardrails` feeds it a trainer's logs and carries out what fired rules ask for
(warn, stop, rollback).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from autorefine.training.arguments import RunError

if TYPE_CHECKING:
    from autorefine.training.callbacks import HeldoutSettings

logger = logging.getLogger(__name__)

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
    """Collapse detection over the logged health signals, and what to do when a rule fires (the `guard` section)."""

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
class Alarm:
    """A rule that fired: which, on what value, against what reference, at which step, and what it asks for."""

    rule: str
    signal: str
    test: str
    value: float
    reference: float
    threshold: float
    step: int
    action: str

    @property
    def message(self) -> str:
        """One line a person can act on."""
        v, ref, t = f"{self.value:.4g}", f"{self.reference:.4g}", f"{self.threshold:.4g}"
        why = {
            "below": f"is below {t}",
            "above": f"is above {t}",
            "fall_factor": f"fell below its running median {ref} ÷ {t}",
            "rise_factor": f"rose above its running median {ref} × {t}",
            "rise": f"rose above its running median {ref} + {t}",
            "drop_from_best": f"is {self.reference - self.value:.4g} below its best {ref} (limit {t})",
        }[self.test]
        return f"step {self.step}: {self.signal} = {v} {why} [rule {self.rule} → {self.action}]"


class Guard:
    """Evaluates every rule on each observation; a rule fires once per episode of `patience` failing observations."""

    def __init__(self, settings: GuardSettings) -> None:
        self.settings = settings
        self.rules = settings.rules
        self.history: dict[str, deque[float]] = {}
        self.best: dict[str, float] = {}
        self.streak: dict[str, int] = dict.fromkeys(self.rules, 0)

    def _reference(self, rule: GuardRule) -> float | None:
        """What the rule compares against now, or None while it cannot judge yet."""
        history = self.history.get(rule.signal, ())
        if rule.test in ("below", "above"):
            return rule.threshold
        if rule.test == "drop_from_best":
            return self.best.get(rule.signal)
        if len(history) < self.settings.warmup:
            return None
        return statistics.median(history)

    @staticmethod
    def _fails(rule: GuardRule, value: float, reference: float) -> bool:
        t = rule.threshold
        if rule.test == "below":
            return value < t
        if rule.test == "above":
            return value > t
        if rule.test == "fall_factor":
            return value < reference / t
        if rule.test == "rise_factor":
            return value > reference * t
        if rule.test == "rise":
            return value > reference + t
        # drop_from_best: a drop of at least `t`; the tolerance keeps an exact drop (15 of 300 questions is
        # 5 points) from depending on how best − t rounds in floats.
        return reference - value >= t - 1e-9

    def observe(self, step: int, values: Mapping[str, float]) -> list[Alarm]:
        """Feed one observation (signals absent from `values` are not judged); returns the rules that fire now."""
        alarms = []
        for name, rule in self.rules.items():
            value = values.get(rule.signal)
            if value is None or math.isnan(value):
                continue
            reference = self._reference(rule)
            if reference is None or not self._fails(rule, value, reference):
                self.streak[name] = 0
                continue
            self.streak[name] += 1
            if self.streak[name] == rule.patience:
                alarms.append(
                    Alarm(name, rule.signal, rule.test, value, reference, rule.threshold, step, rule.action)
                )
        for signal in {rule.signal for rule in self.rules.values()}:
            value = values.get(signal)
            if value is None or math.isnan(value):
                continue
            self.history.setdefault(signal, deque(maxlen=self.settings.window)).append(float(value))
            self.best[signal] = max(self.best.get(signal, -math.inf), float(value))
        return alarms

    def forget_recent(self) -> None:
        """After a rollback: the collapsed values leave the medians and streaks; bests stay."""
        self.history.clear()
        self.streak = dict.fromkeys(self.rules, 0)

    def state(self) -> dict[str, Any]:
        """JSON-ready state, saved with every checkpoint."""
        return {
            "history": {k: list(v) for k, v in self.history.items()},
            "best": self.best,
            "streak": self.streak,
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Continue from a saved `state()`."""
        self.history = {k: deque(v, maxlen=self.settings.window) for k, v in state.get("history", {}).items()}
        self.best = dict(state.get("best", {}))
        self.streak.update({k: v for k, v in state.get("streak", {}).items() if k in self.streak})


def check_guard(settings: GuardSettings, heldout: HeldoutSettings, args: Any) -> GuardSettings:
    """The guard settings this run can apply, checked before anything loads.

    A rule that stops or rolls back on a signal this run can never log, or that has nothing to roll back to, is
    refused with the reason; a `warn` rule on such a signal is switched off with a logged notice (the defaults
    include `heldout_drop`, which runs without held-out evaluation cannot evaluate).
    """
    heldout_on = bool(heldout.file) and heldout.every > 0
    refused, switched_off = [], {}
    for name, rule in settings.rules.items():
        where = f"guard.{name} (signal {rule.signal})"
        unavailable = None
        if rule.signal.startswith("health/entropy/") and args.use_vllm:
            unavailable = (
                "per-kind entropies come from the transformers engine; vLLM returns only top-k log-probs "
                "(use TRL's `entropy`, all model tokens, as the signal)"
            )
        elif rule.signal == "kl" and args.beta == 0:
            unavailable = "TRL logs kl only with trainer.beta > 0"
        elif rule.signal.startswith("heldout/") and not heldout_on:
            unavailable = "needs held-out evaluation (heldout.file and heldout.every > 0)"
        if unavailable and rule.action == "warn":
            logger.warning("%s is not evaluated: %s", where, unavailable)
            switched_off[name] = dataclasses.replace(rule, action="off")
        elif unavailable:
            refused.append(f"{where}: {unavailable}")
        if rule.action == "rollback" and not (heldout_on and heldout.save_best):
            refused.append(
                f"guard.{name}.action=rollback: needs a best checkpoint to return to "
                "(heldout.file, heldout.every > 0 and heldout.save_best: true)"
            )
    if refused:
        raise RunError("the guard cannot work as configured:\n- " + "\n- ".join(refused))
    return dataclasses.replace(settings, **switched_off)
