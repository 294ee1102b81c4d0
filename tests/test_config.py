"""Run configurations: presets load, typos and wrong types fail at start with the valid keys listed."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from trl import GRPOConfig, SFTConfig

from autorefine.config import GRPORunConfig, SFTRunConfig
from autorefine.modeling import trained_weights_dtype
from autorefine.settings import ConfigError, check_trainer_args, load_config, parse_yaml
from autorefine.training.arguments import RunError
from autorefine.training.grpo.trainer import make_grpo_args
from tests.helpers import REPO_ROOT

GRPO_PRESETS = sorted((REPO_ROOT / "configs" / "grpo").glob("*.yaml"))
SFT_PRESETS = sorted((REPO_ROOT / "configs" / "sft").glob("*.yaml"))


@pytest.mark.parametrize("preset", GRPO_PRESETS, ids=lambda p: p.stem)
def test_grpo_presets_are_valid(preset):
    config = load_config(GRPORunConfig, preset)
    values = check_trainer_args(GRPOConfig, config.trainer)
    assert values["num_generations"] >= 2
    assert "max_completion_length" not in values  # derived from rollout.max_completion_tokens


@pytest.mark.parametrize("preset", SFT_PRESETS, ids=lambda p: p.stem)
def test_sft_presets_are_valid(preset):
    config = load_config(SFTRunConfig, preset)
    check_trainer_args(SFTConfig, config.trainer)


@pytest.mark.parametrize("name", ["base", "instruct", "base-lora"])
def test_3b_presets_map_the_paper_recipe_onto_one_8_gpu_node(name):
    config = load_config(GRPORunConfig, REPO_ROOT / f"configs/grpo/autorefine-qwen2.5-3b-{name}.yaml")
    t = config.trainer
    gpus = 8
    trajectories_per_round = t["per_device_train_batch_size"] * gpus * t["steps_per_generation"]
    assert t["num_generations"] == 5
    assert trajectories_per_round == 1280 and trajectories_per_round // t["num_generations"] == 256
    assert t["steps_per_generation"] == 5  # 5 optimizer updates per rollout round
    assert t["epsilon"] == 0.2 and t["beta"] == 0.001 and t["entropy_coef"] == 0.001
    # no nucleus filter: vLLM's processed log-probs must match the trainer's (see test_importance_sampling.py)
    assert t["temperature"] == 1.0 and t["top_p"] == 1.0
    assert t["bf16"] is True and t["activation_checkpointing"] is True
    assert t["use_vllm"] is True and t["vllm_mode"] == "colocate"
    assert t["save_steps"] % t["steps_per_generation"] == 0  # exact resume
    # full fine-tuning: fp32 master weights, bf16 compute (bf16 weights lose lr-1e-6 updates); LoRA: a
    # frozen bf16 base
    trained = trained_weights_dtype(config.model, config.lora)
    assert trained == ("bfloat16" if name == "base-lora" else "float32")
    assert config.rollout.max_turns == 5 and config.rollout.topk == 3
    assert config.rollout.max_new_tokens == 512 and config.rollout.max_obs_tokens == 512
    assert config.eval_temperature == 0.0  # greedy validation
    assert config.lora.enabled == (name == "base-lora")
    # building the TRL arguments works once the GPU-only switches are off (this machine has no GPU)
    cpu = load_config(
        GRPORunConfig,
        REPO_ROOT / f"configs/grpo/autorefine-qwen2.5-3b-{name}.yaml",
        ["trainer.bf16=false", "trainer.use_vllm=false", "trainer.report_to=[]"],
    )
    args = make_grpo_args(cpu)
    assert args.max_completion_length == config.rollout.max_completion_tokens
    assert args.generation_batch_size == t["per_device_train_batch_size"] * t["steps_per_generation"]


def test_unknown_key_lists_valid_keys_and_suggests():
    with pytest.raises(ConfigError) as err:
        load_config(GRPORunConfig, None, ["rollout.max_turn=3"])
    message = str(err.value)
    assert "rollout.max_turn" in message and "did you mean max_turns" in message
    assert "max_obs_tokens" in message  # the valid keys are listed


def test_unknown_trainer_key_is_checked_against_trl():
    config = load_config(GRPORunConfig, None, ["trainer.learnin_rate=1e-6"])
    with pytest.raises(ConfigError, match=r"trainer.learnin_rate \(did you mean learning_rate\?\)"):
        make_grpo_args(config)


def test_unknown_section_in_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("rollouts:\n  max_turns: 2\n")
    with pytest.raises(ConfigError, match=r"unknown key.*rollouts.*did you mean rollout"):
        load_config(GRPORunConfig, path)


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("rollout.max_turns=abc", "rollout.max_turns = 'abc' is not a valid int"),
        ("rollout.max_turns=true", "is not a valid int"),
        ("rollout.max_turns=2.5", "is not a valid int"),
        ("model.dtype=fp8", "choice among"),
        ("reward.outcome_metric=accuracy", "choice among|outcome_metric"),
        ("rollout.max_new_tokens=0", "must be positive"),
        ("lora.target_modules=q_proj", "is not a valid list"),
        ("rollout=3", "rollout must be a mapping"),
        ("novalue", "section.key=value"),
    ],
)
def test_wrong_values_are_rejected(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(GRPORunConfig, None, [override])


def test_wrong_trainer_type_is_rejected():
    config = load_config(GRPORunConfig, None, ["trainer.num_generations=many"])
    with pytest.raises(ConfigError, match=r"trainer\.num_generations = 'many'"):
        make_grpo_args(config)


def test_values_are_converted_where_unambiguous():
    config = load_config(GRPORunConfig, None, ["trainer.learning_rate=3e-4", "reward.refine_bonus=1"])
    assert config.reward.refine_bonus == 1.0 and isinstance(config.reward.refine_bonus, float)
    assert check_trainer_args(GRPOConfig, config.trainer)["learning_rate"] == pytest.approx(3e-4)


def test_yaml_12_booleans_keep_no_as_a_string():
    assert parse_yaml("a: no\nb: yes\nc: true\nd: False\ne: off") == {
        "a": "no",
        "b": "yes",
        "c": True,
        "d": False,
        "e": "off",
    }
    config = load_config(GRPORunConfig, None, ["trainer.save_strategy=no"])
    assert config.trainer["save_strategy"] == "no"


def test_derived_trainer_keys_are_refused():
    config = load_config(GRPORunConfig, None, ["trainer.max_completion_length=100"])
    with pytest.raises(ConfigError, match=r"rollout\.max_completion_tokens"):
        make_grpo_args(config)


def test_checkpoints_must_fall_on_generation_boundaries():
    config = load_config(
        GRPORunConfig,
        None,
        [
            "trainer.steps_per_generation=4",
            "trainer.save_strategy=steps",
            "trainer.save_steps=6",
            "trainer.use_cpu=true",
            "trainer.report_to=[]",
        ],
    )
    with pytest.raises(RunError, match="multiple of steps_per_generation"):
        make_grpo_args(config)


def test_a_checkpoint_every_optimizer_step_is_allowed_when_each_step_generates():
    # The SmolLM2 preset's shape: 8 micro-batches per optimizer step, one generation per optimizer step, so
    # every optimizer step ends on a generation boundary (TRL counts both in micro-batches).
    config = load_config(
        GRPORunConfig,
        None,
        [
            "trainer.gradient_accumulation_steps=8",
            "trainer.steps_per_generation=8",
            "trainer.save_strategy=steps",
            "trainer.save_steps=1",
            "trainer.use_cpu=true",
            "trainer.report_to=[]",
        ],
    )
    assert make_grpo_args(config).save_steps == 1


def test_cli_reports_config_errors_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "autorefine.cli", "train-grpo", "--config", str(tmp_path / "missing.yaml")],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: config file not found: {tmp_path / 'missing.yaml'}"


def test_trainer_args_take_the_old_checkpointing_names_on_older_transformers():
    @dataclasses.dataclass
    class OlderTrainingArguments:  # transformers < 5.23 knows only the old names
        gradient_checkpointing: bool = False
        gradient_checkpointing_kwargs: dict | None = None

    values = check_trainer_args(
        OlderTrainingArguments,
        {"activation_checkpointing": True, "activation_checkpointing_kwargs": {"use_reentrant": False}},
    )
    assert values == {
        "gradient_checkpointing": True,
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
    }
    with pytest.raises(ConfigError, match="activation_checkpointin"):
        check_trainer_args(OlderTrainingArguments, {"activation_checkpointin": True})


def test_a_section_given_in_part_keeps_the_rest_of_its_default():
    config = load_config(
        GRPORunConfig,
        REPO_ROOT / "configs/grpo/tiny-cpu.yaml",
        ["guard.heldout_drop.action=rollback", "rollout.max_turns=3"],
    )
    assert config.guard.heldout_drop.action == "rollback"
    assert (config.guard.heldout_drop.signal, config.guard.heldout_drop.threshold) == ("heldout/em", 0.05)
    assert (
        config.rollout.max_turns == 3 and config.rollout.max_new_tokens == 48
    )  # the preset's own value kept


@pytest.mark.parametrize("preset", GRPO_PRESETS, ids=lambda p: p.stem)
def test_grpo_presets_pass_the_guard_checks(preset):
    from autorefine.training.guard import check_guard

    # GPU presets, checked on a CPU (use_cpu: the device check would refuse use_vllm here)
    config = load_config(GRPORunConfig, preset, ["trainer.bf16=false", "trainer.use_cpu=true"])
    check_guard(config.guard, config.heldout, make_grpo_args(config))
