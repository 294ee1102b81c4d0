"""Collapse detection in a running trainer: what a fired rule does (warn, stop, rollback).

The rules and their evaluation are `autorefine.training.guard`. `GuardCallback` feeds them the trainer's logs and the held-out results, says what fired (console, W&B alert,
`<output_dir>/guard.jsonl`) and acts: `warn` only tells; `stop` saves a full checkpoint and ends the run
(`run_grpo` then exits with the command that resumes); `rollback` loads `<output_dir>/best` back into the
policy, multiplies the learning rate by `rollback_lr_factor`, clears the optimizer's moments and goes on — at
most `max_rollbacks` times, after which a rollback rule stops the run instead.

Every rank sees the same logged values (TRL and `HealthCallback` average them over all processes); the
decision is still taken once, on rank 0, and broadcast, so every rank acts the same way.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from autorefine.training.arguments import RunError
from autorefine.training.guard import Alarm, Guard, GuardSettings
from autorefine.training.health import HealthCallback
from autorefine.trl_private import discard_generation_buffer, load_weights

if TYPE_CHECKING:
    from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments

logger = logging.getLogger(__name__)

GUARD_LOG = "guard.jsonl"
GUARD_STATE = "guard_state.json"
SEVERITY = {"warn": 1, "stop": 2, "rollback": 3}


def send_alert(alarm: Alarm, report_to: list[str] | None) -> None:
    """A W&B alert when a W&B run is active; never raises (offline runs, no network)."""
    if "wandb" not in (report_to or []):
        return
    try:
        import wandb

        if wandb.run is not None:
            level = wandb.AlertLevel.WARN if alarm.action == "warn" else wandb.AlertLevel.ERROR
            wandb.alert(
                title=f"autorefine guard: {alarm.rule} ({alarm.signal})", text=alarm.message, level=level
            )
    except Exception as err:  # an alert is a courtesy: it must never end a training run
        logger.warning("could not send the W&B alert (%s): %s", type(err).__name__, err)


class GuardCallback(TrainerCallback):
    """Runs the `Guard` on every logged step and carries out what the fired rules ask for."""

    def __init__(self, trainer: Trainer, settings: GuardSettings, best_dir: Path) -> None:
        if any(r.action == "rollback" for r in settings.rules.values()) and (
            trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled
        ):
            raise RunError(
                "guard rollback reloads the best weights into an unsharded model (one process or DDP); under "
                "DeepSpeed or FSDP use action=stop and resume from the best checkpoint with a lower learning rate"
            )
        self.trainer = trainer
        self.settings = settings
        self.guard = Guard(settings)
        self.best_dir = Path(best_dir)
        self.rollbacks = 0
        self.stopped: Alarm | None = None
        self.alarms: list[Alarm] = []
        self._heldout: dict[str, float] = {}
        self._checked_signals = False

    # --- inputs ----------------------------------------------------------------------------------------------

    def heldout_result(self, step: int, metrics: Mapping[str, float]) -> None:
        """Held-out metrics as the held-out callback computes them (the step-0 baseline included)."""
        values = {f"heldout/{k}": float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        if step == 0:
            self.guard.observe(0, values)  # the warm start is the first best; nothing to judge yet
        else:
            self._heldout = values

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if any(r.action == "rollback" for r in self.guard.rules.values()):
            scheduler = self.trainer.lr_scheduler
            if not hasattr(scheduler, "base_lrs"):
                raise RunError(
                    f"guard rollback needs a learning-rate scheduler with base_lrs (got {type(scheduler).__name__})"
                )
        if state.global_step > 0:
            saved = Path(args.output_dir) / f"checkpoint-{state.global_step}" / GUARD_STATE
            if saved.is_file():
                data = json.loads(saved.read_text(encoding="utf-8"))
                self.guard.load_state(data["guard"])
                self.rollbacks = int(data["rollbacks"])
            else:
                logger.warning("guard: no %s in the resumed checkpoint; rule history starts afresh", saved)

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                state_json = {"guard": self.guard.state(), "rollbacks": self.rollbacks}
                (folder / GUARD_STATE).write_text(json.dumps(state_json), encoding="utf-8")

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        logs = logs or {}
        if "loss" not in logs:  # the end-of-training summary, not a training step
            return
        values = {
            k: float(v)
            for k, v in logs.items()
            if isinstance(v, int | float) and not k.startswith("heldout/")
        }
        values.update(self._heldout)
        self._heldout = {}
        if not self._checked_signals:
            self._check_signals(values)
        alarms = self._agreed(self.guard.observe(state.global_step, values))
        if not alarms:
            return
        self.alarms += alarms
        for alarm in alarms:
            self._report(alarm, args, state)
        worst = max(alarms, key=lambda a: SEVERITY[a.action])
        if worst.action == "rollback":
            if self.rollbacks < self.settings.max_rollbacks and self.best_dir.is_dir():
                self._rollback(worst, args, state)
                return
            why = (
                f"{self.rollbacks} rollback(s) already used (guard.max_rollbacks)"
                if self.best_dir.is_dir()
                else f"no best checkpoint at {self.best_dir}"
            )
            logger.error("guard: cannot roll back (%s); stopping instead", why)
        if worst.action in ("stop", "rollback"):
            self.stopped = worst
            control.should_training_stop = True
            control.should_save = True

    # --- decisions -------------------------------------------------------------------------------------------

    def _agreed(self, alarms: list[Alarm]) -> list[Alarm]:
        """Rank 0's alarms on every rank (all ranks observed the same values; this makes it certain)."""
        acc = self.trainer.accelerator
        if acc.num_processes == 1:
            return alarms
        from accelerate.utils import broadcast_object_list

        box = [alarms]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def _check_signals(self, values: Mapping[str, float]) -> None:
        """At the first logged step, every rule's signal (held-out ones aside) must be among the logged ones."""
        self._checked_signals = True
        missing = {
            name: rule.signal
            for name, rule in self.guard.rules.items()
            if not rule.signal.startswith("heldout/") and rule.signal not in values
        }
        if missing:
            listed = ", ".join(f"guard.{n}.signal={s}" for n, s in missing.items())
            raise RunError(
                f"{listed}: not logged by this run. Logged signals: {', '.join(sorted(values))}. "
                "Point the rule at one of them or set its action to off."
            )

    def _report(self, alarm: Alarm, args: TrainingArguments, state: TrainerState) -> None:
        if not state.is_world_process_zero:
            return
        log = logger.warning if alarm.action == "warn" else logger.error
        log("guard: %s", alarm.message)
        send_alert(alarm, args.report_to)
        out = Path(args.output_dir) / GUARD_LOG
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a", encoding="utf-8") as f:
            f.write(
                json.dumps({**asdict(alarm), "message": alarm.message, "rollbacks": self.rollbacks}) + "\n"
            )

    def _rollback(self, alarm: Alarm, args: TrainingArguments, state: TrainerState) -> None:
        trainer = self.trainer
        load_weights(trainer, self.best_dir)
        factor = self.settings.rollback_lr_factor
        optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        for group in optimizer.param_groups:
            group["lr"] *= factor
        trainer.lr_scheduler.base_lrs = [lr * factor for lr in trainer.lr_scheduler.base_lrs]
        # Moments accumulated while the policy collapsed would push it straight back.
        optimizer.state.clear()
        discard_generation_buffer(trainer)
        self.guard.forget_recent()
        self.rollbacks += 1
        lr = optimizer.param_groups[0]["lr"]
        if state.is_world_process_zero:
            logger.error(
                "guard: rolled back to %s (rollback %d of %d); learning rate now %.3g",
                self.best_dir,
                self.rollbacks,
                self.settings.max_rollbacks,
                lr,
            )
            with (Path(args.output_dir) / GUARD_LOG).open("a", encoding="utf-8") as f:
                f.write(
                    json.dumps({"step": state.global_step, "rollback": self.rollbacks, "learning_rate": lr})
                    + "\n"
                )


class Guardrails:
    """A run's health signals and guard, fed by the reward function (`health.observe`) and the held-out
    evaluation (`heldout_result`); `attach` adds their callbacks to the trainer."""

    def __init__(self, trainer: Trainer, settings: GuardSettings, best_dir: Path) -> None:
        self.trainer = trainer
        self.latest_em: float | None = None
        self.health = HealthCallback(trainer, heldout_em=lambda: self.latest_em)
        self.guard = GuardCallback(trainer, settings, best_dir) if settings.rules else None

    def heldout_result(self, step: int, metrics: Mapping[str, float]) -> None:
        """Every held-out evaluation, the one before step 1 included."""
        self.latest_em = metrics["em"]
        if self.guard is not None:
            self.guard.heldout_result(step, metrics)

    def attach(self) -> None:
        """Add the callbacks (after the held-out one, so a step's signals and rules see its evaluation)."""
        self.trainer.add_callback(self.health)
        if self.guard is not None:
            self.trainer.add_callback(self.guard)
