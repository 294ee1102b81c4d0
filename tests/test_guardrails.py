"""Collapse detection: every default rule on synthetic metric series, the actions on the real TRL trainer."""

from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from autorefine.config import GRPORunConfig
from autorefine.settings import load_config
from autorefine.training.arguments import RunError
from autorefine.training.guard import Alarm, Guard, GuardRule, GuardSettings, check_guard
from autorefine.training.guardrails import send_alert

DEFAULTS = GuardSettings()


def stable_step(rng: random.Random, step: int) -> dict[str, float]:
    """Signals of a healthy run: small noise around levels measured on the tiny-cpu preset."""
    values = {
        "entropy": 0.18 + rng.gauss(0, 0.012),
        "health/corrective_rate": max(0.0, 0.01 + rng.gauss(0, 0.01)),
        "rollout/finish_length": max(0.0, rng.gauss(0, 0.01)),
    }
    if step % 5 == 0:
        values["heldout/em"] = 0.45 + 0.002 * step + rng.gauss(0, 0.012)
    return values


def run(guard: Guard, series: list[dict[str, float]]) -> list[Alarm]:
    return [alarm for step, values in enumerate(series) for alarm in guard.observe(step, values)]


def test_no_default_rule_fires_on_a_noisy_stable_run():
    for seed in range(5):
        rng = random.Random(seed)
        assert run(Guard(DEFAULTS), [stable_step(rng, s) for s in range(200)]) == []


# (rule, signal, value the signal takes from step 30 on)
COLLAPSES = [
    ("entropy_floor", "entropy", 0.01),
    ("entropy_fall", "entropy", 0.05),
    ("entropy_rise", "entropy", 0.4),
    ("malformed_rise", "health/corrective_rate", 0.3),
    ("length_cap_rise", "rollout/finish_length", 0.25),
    ("heldout_drop", "heldout/em", 0.3),
]


@pytest.mark.parametrize(("rule", "signal", "collapsed"), COLLAPSES, ids=[c[0] for c in COLLAPSES])
def test_each_default_rule_fires_on_its_collapse(rule, signal, collapsed):
    rng = random.Random(0)
    series = [stable_step(rng, s) for s in range(60)]
    for step in range(30, 60):
        if signal in series[step]:
            series[step][signal] = collapsed
    alarms = [a for a in run(Guard(DEFAULTS), series) if a.rule == rule]
    patience = getattr(DEFAULTS, rule).patience
    first_collapsed = [s for s in range(30, 60) if signal in series[s]]
    assert len(alarms) == 1, alarms  # once per episode, not every step
    assert alarms[0].step == first_collapsed[patience - 1]
    assert (alarms[0].signal, alarms[0].value, alarms[0].action) == (signal, collapsed, "warn")


def test_patience_ignores_a_single_spike_and_rearms_after_recovery():
    settings = GuardSettings(
        malformed_rise=GuardRule("health/corrective_rate", "rise", 0.15, patience=2), warmup=3, window=5
    )
    rates = [0.0, 0.01, 0.0, 0.02, 0.5, 0.0, 0.01, 0.4, 0.45, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.6, 0.6]
    alarms = run(Guard(settings), [{"health/corrective_rate": r} for r in rates])
    assert [a.step for a in alarms if a.rule == "malformed_rise"] == [8, 16]


def test_median_rules_wait_for_warmup_observations():
    settings = GuardSettings(warmup=4)
    series = [{"entropy": v} for v in (0.2, 0.2, 0.2, 0.01, 0.01)]
    # the floor needs no history; the fall from the median waits for 4 earlier observations
    assert [(a.rule, a.step) for a in run(Guard(settings), series)] == [("entropy_floor", 4)]


def test_drop_from_best_starts_from_the_first_observation():
    guard = Guard(DEFAULTS)
    assert guard.observe(0, {"heldout/em": 0.45}) == []  # the warm start, evaluated before step 1
    assert guard.observe(10, {"heldout/em": 0.41}) == []  # 4 points down: allowed
    [alarm] = guard.observe(20, {"heldout/em": 0.39})
    assert (alarm.rule, alarm.reference, alarm.step) == ("heldout_drop", 0.45, 20)


@pytest.mark.parametrize(("best", "dropped"), [(0.45, 0.40), (0.50, 0.45), (0.47, 0.42)])
def test_drop_from_best_fires_on_a_drop_of_exactly_the_threshold(best, dropped):
    # Held-out EM moves in steps of 1/300: a drop of exactly 15 questions is 5 points, whatever the float
    # rounding of best − 0.05 (0.50 − 0.45 is 0.0499999… in floats; the benchmark met 0.45 → 0.40).
    guard = Guard(DEFAULTS)
    guard.observe(0, {"heldout/em": best})
    [alarm] = guard.observe(3, {"heldout/em": dropped})
    assert (alarm.rule, alarm.step) == ("heldout_drop", 3)
    assert guard.observe(6, {"heldout/em": best - 0.049}) == []  # recovered to less than 5 points down


def test_alarm_message_names_signal_value_and_step():
    alarm = Alarm("heldout_drop", "heldout/em", "drop_from_best", 0.39, 0.45, 0.05, 20, "rollback")
    assert alarm.message == (
        "step 20: heldout/em = 0.39 is 0.06 below its best 0.45 (limit 0.05) [rule heldout_drop → rollback]"
    )


def test_guard_state_round_trips_through_json():
    rng = random.Random(3)
    guard = Guard(DEFAULTS)
    run(guard, [stable_step(rng, s) for s in range(12)])
    restored = Guard(DEFAULTS)
    restored.load_state(json.loads(json.dumps(guard.state())))
    nxt = {"entropy": 0.01, "heldout/em": 0.2}
    assert restored.observe(13, nxt) == guard.observe(13, nxt)
    assert restored.state() == guard.state()


def test_rules_off_are_not_evaluated():
    settings = load_config(GRPORunConfig, None, ["guard.entropy_floor.action=off"]).guard
    assert "entropy_floor" not in settings.rules
    assert not [a for a in run(Guard(settings), [{"entropy": 0.0}] * 5) if a.rule == "entropy_floor"]


def test_bad_rules_are_refused_with_the_key():
    from autorefine.settings import ConfigError

    with pytest.raises(
        ConfigError, match=re.escape("guard.entropy_fall: a fall_factor threshold is a factor > 1")
    ):
        load_config(GRPORunConfig, None, ["guard.entropy_fall.threshold=0.5"])
    with pytest.raises(ConfigError, match=re.escape("guard.heldout_drop.test")):
        load_config(GRPORunConfig, None, ["guard.heldout_drop.test=sideways"])


def test_alerts_never_crash_a_run(tmp_path, monkeypatch, caplog):
    import wandb

    alarm = Alarm("entropy_floor", "entropy", "below", 0.01, 0.02, 0.02, 7, "stop")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_ = wandb.init(project="autorefine-test", dir=str(tmp_path))
    try:
        send_alert(alarm, ["wandb"])  # an offline run accepts the alert
        monkeypatch.setattr(wandb, "alert", lambda **kw: (_ for _ in ()).throw(ConnectionError("no network")))
        with caplog.at_level(logging.WARNING):
            send_alert(alarm, ["wandb"])
        assert "could not send the W&B alert (ConnectionError): no network" in caplog.text
    finally:
        run_.finish()
    send_alert(alarm, [])  # W&B off: nothing to do


# --- refused at start ---------------------------------------------------------------------------------------


def _config(*overrides: str) -> GRPORunConfig:
    return load_config(
        GRPORunConfig,
        Path(__file__).parents[1] / "configs/grpo/tiny-cpu.yaml",
        ["trainer.report_to=[]", *overrides],
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            [
                "trainer.use_vllm=true",
                "guard.entropy_fall.signal=health/entropy/think",
                "guard.entropy_fall.action=stop",
            ],
            "guard.entropy_fall (signal health/entropy/think): per-kind entropies",
        ),
        (
            ["guard.malformed_rise.signal=kl", "guard.malformed_rise.action=stop"],
            "guard.malformed_rise (signal kl): TRL logs kl only with trainer.beta > 0",
        ),
        (
            ["heldout.every=0", "guard.heldout_drop.action=stop"],
            "guard.heldout_drop (signal heldout/em): needs held-out evaluation",
        ),
        (
            ["guard.entropy_floor.action=rollback", "heldout.save_best=false"],
            "guard.entropy_floor.action=rollback: needs a best checkpoint",
        ),
    ],
)
def test_acting_rules_that_cannot_work_are_refused_before_anything_loads(overrides, message):
    from autorefine.training.grpo.trainer import make_grpo_args

    config = _config(*overrides)
    with pytest.raises(RunError, match=re.escape(message)):
        check_guard(config.guard, config.heldout, make_grpo_args(config))
    assert (
        check_guard(_config().guard, _config().heldout, make_grpo_args(_config())) == _config().guard
    )  # the shipped preset passes


def test_warn_rules_that_cannot_work_are_switched_off_with_a_notice(caplog):
    from autorefine.training.grpo.trainer import make_grpo_args

    config = _config("heldout.every=0", "guard.entropy_fall.signal=kl")
    with caplog.at_level(logging.WARNING):
        settings = check_guard(config.guard, config.heldout, make_grpo_args(config))
    assert set(config.guard.rules) - set(settings.rules) == {"heldout_drop", "entropy_fall"}
    assert "guard.heldout_drop (signal heldout/em) is not evaluated: needs held-out evaluation" in caplog.text
    assert (
        "guard.entropy_fall (signal kl) is not evaluated: TRL logs kl only with trainer.beta > 0"
        in caplog.text
    )


# --- actions on the real TRL trainer ------------------------------------------------------------------------


class WeightsAfterGuard(TrainerCallback):
    """Added after the guard: records, at each log, the weights and learning rate the guard left behind."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.seen: dict[int, tuple[dict[str, torch.Tensor], float, dict[str, torch.Tensor] | None]] = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" not in (logs or {}):
            return
        best = Path(args.output_dir) / "best" / "model.safetensors"
        weights = {k: v.detach().clone() for k, v in self.trainer.model.state_dict().items()}
        lr = self.trainer.optimizer.param_groups[0]["lr"]
        self.seen[state.global_step] = (weights, lr, load_file(best) if best.is_file() else None)


def test_rollback_restores_best_weights_lowers_lr_then_stop_leaves_a_resumable_checkpoint(
    synthetic_bm25_server, tmp_path
):
    from autorefine.training.checkpoints import latest_checkpoint
    from autorefine.training.grpo.trainer import build_trainer, run_grpo
    from tests.helpers import tiny_grpo_config as tiny_config

    # A rule that fires on every step (every trajectory takes > 0 turns): step 1 rolls back, step 2 would roll
    # back again but max_rollbacks is 1, so it stops the run.
    rule = ["guard.entropy_floor.signal=rollout/turns", "guard.entropy_floor.test=above",
            "guard.entropy_floor.threshold=0", "guard.entropy_floor.patience=1"]  # fmt: skip
    overrides = (
        "trainer.max_steps=4",
        "trainer.seed=4",
        "trainer.learning_rate=1e-3",
        "heldout.every=2",
        "heldout.limit=16",
        "guard.max_rollbacks=1",
        "guard.rollback_lr_factor=0.25",
        "guard.heldout_drop.action=off",  # 16 questions: one question is 6 points
    )
    config = tiny_config(
        synthetic_bm25_server, tmp_path, *overrides, *rule, "guard.entropy_floor.action=rollback"
    )
    trainer, _ = build_trainer(config)
    seen = WeightsAfterGuard(trainer)
    trainer.add_callback(seen)
    with pytest.raises(RunError) as err:
        run_grpo(trainer, command="autorefine train-grpo --config tiny.yaml")

    # step 1: the best weights (the warm start, evaluated before step 1) are back, the learning rate is 1/4
    weights, lr, best = seen.seen[1]
    assert best is not None
    for name, value in best.items():
        assert torch.equal(weights[name], value), name
    assert lr == pytest.approx(1e-3 * 0.25)
    assert trainer.lr_scheduler.base_lrs == [pytest.approx(1e-3 * 0.25)] * len(trainer.optimizer.param_groups)
    # step 2: the rule fires again, no rollback left: the run stops with a full checkpoint and says how to resume
    assert trainer.state.global_step == 2
    checkpoint = latest_checkpoint(tmp_path)
    assert checkpoint is not None and checkpoint.endswith("checkpoint-2")
    message = str(err.value)
    assert (
        "the guard stopped training: step 2: rollout/turns = 2 is above 0 [rule entropy_floor → rollback]"
        in message
    )
    assert f"Resume with: autorefine train-grpo --config tiny.yaml --resume {checkpoint}" in message
    events = [json.loads(line) for line in (tmp_path / "guard.jsonl").read_text().splitlines()]
    assert [(e["step"], e.get("rule"), e.get("rollback")) for e in events] == [
        (1, "entropy_floor", None), (1, None, 1), (2, "entropy_floor", None),
    ]  # fmt: skip
    assert json.loads((Path(checkpoint) / "guard_state.json").read_text())["rollbacks"] == 1

    # resuming (with the rule off) goes on from step 2 at the lowered learning rate and finishes
    resumed, _ = build_trainer(
        tiny_config(synthetic_bm25_server, tmp_path, *overrides, *rule, "guard.entropy_floor.action=off")
    )
    run_grpo(resumed, resume="latest")
    assert resumed.state.global_step == 4
    logged = [h["learning_rate"] for h in resumed.state.log_history if "loss" in h and h["step"] > 2]
    assert logged == [pytest.approx(1e-3 * 0.25)] * 2
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_dropped_flat_groups_leave_the_loss(synthetic_bm25_server, tmp_path):
    from autorefine.scoring.reward import trajectory_reward
    from autorefine.training.grpo.trainer import build_trainer
    from tests.helpers import tiny_grpo_config as tiny_config

    config = tiny_config(
        synthetic_bm25_server,
        tmp_path,
        "drop_flat_groups=true",
        "trainer.max_steps=1",
        "trainer.num_generations=4",
        "trainer.seed=1",
    )
    trainer, _ = build_trainer(config)
    batches = []
    score = trainer._generate_and_score_completions  # already wrapped by the flat-group filter

    def keep(inputs):
        batch = score(inputs)
        batches.append((inputs, batch))
        return batch

    trainer._generate_and_score_completions = keep
    trainer.train()
    [(inputs, batch)] = batches
    rewards = [trajectory_reward(x["trajectory"], x["golden_answers"], config.reward).reward for x in inputs]
    groups = [rewards[i : i + 4] for i in range(0, len(rewards), 4)]
    flat = [max(g) == min(g) for g in groups]
    assert any(flat) and not all(flat), f"seed must give both kinds of groups: {groups}"
    for row, x in enumerate(inputs):
        mask = batch["tool_mask"][row].tolist()
        env = x["trajectory"].env_mask
        if flat[row // 4]:
            assert sum(mask) == 0, f"row {row} of a flat group still in the loss"
        else:
            assert mask[: len(env)] == env
    kept = (batch["completion_mask"] * batch["tool_mask"]).sum()
    assert batch["num_items_in_batch"] == kept
    assert kept < sum(sum(x["trajectory"].env_mask) for x in inputs)


def test_extra_rules_by_name():
    from autorefine.settings import ConfigError

    settings = load_config(
        GRPORunConfig,
        None,
        ["guard.extra={clip_spike: {signal: clip_ratio/region_mean, test: above, threshold: 0.2}}"],
    ).guard
    series = [{"clip_ratio/region_mean": v} for v in (0.01, 0.02, 0.3)]
    assert [(a.rule, a.step) for a in run(Guard(settings), series)] == [("clip_spike", 2)]
    with pytest.raises(
        ConfigError, match=re.escape("guard.extra.k: GuardRule.__init__() missing 2 required")
    ):
        load_config(GRPORunConfig, None, ["guard.extra.k.signal=kl"])
    with pytest.raises(ConfigError, match=re.escape("extra rules may not reuse the names ['window']")):
        load_config(GRPORunConfig, None, ["guard.extra={window: {signal: a, test: above, threshold: 1}}"])
