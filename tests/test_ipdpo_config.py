"""IP-DPO presets and configuration: they load, map the recipe onto one 8-GPU node, and bad combinations stop
the run at start."""

from __future__ import annotations

import pytest

from autorefine.config import IPDPORunConfig
from autorefine.modeling import trained_weights_dtype
from autorefine.settings import ConfigError, load_config
from autorefine.training.arguments import RunError
from autorefine.training.ipdpo.dpo import make_dpo_args
from autorefine.training.ipdpo.rounds import IPDPORun
from tests.helpers import REPO_ROOT

PRESETS = sorted((REPO_ROOT / "configs" / "ipdpo").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_ipdpo_presets_build_their_trl_arguments(preset, tmp_path):
    config = load_config(IPDPORunConfig, preset, ["trainer.bf16=false", "trainer.report_to=[]"])
    args = make_dpo_args(config, tmp_path)
    assert args.loss_type == ["sigmoid", "sft"] and args.loss_weights == [1.0, config.nll_weight]
    assert args.remove_unused_columns is False and args.num_train_epochs == 1
    assert args.max_length > config.rollout.max_completion_tokens, (
        "room for the prompt: nothing dropped by default"
    )
    assert config.rounds == 3 and config.sampling.samples_per_question == 8  # TeaRAG: 3 rounds, 8 samples


@pytest.mark.parametrize("name", ["base", "instruct", "base-lora"])
def test_3b_presets_fit_one_8_gpu_node(name):
    config = load_config(IPDPORunConfig, REPO_ROOT / f"configs/ipdpo/qwen2.5-3b-{name}.yaml")
    t = config.trainer
    assert t["per_device_train_batch_size"] * t["gradient_accumulation_steps"] * 8 == 128  # pairs per update
    assert config.sampling.questions_per_round == 10_000  # TeaRAG's questions per round
    assert t["bf16"] is True and t["activation_checkpointing"] is True
    # full fine-tuning: fp32 master weights (bf16 compute, bf16 references and rollouts); LoRA: a bf16 base
    trained = trained_weights_dtype(config.model, config.lora)
    assert trained == ("bfloat16" if name == "base-lora" else "float32")
    assert config.rollout.max_turns == 5 and config.rollout.max_completion_tokens == 4096  # as GRPO's presets
    assert config.lora.enabled == (name == "base-lora")
    assert t["learning_rate"] == (5e-6 if name == "base-lora" else 5e-7)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.loss_type=[ipo]", "trainer.loss_type is derived from nll_weight"),
        ("trainer.remove_unused_columns=true", "trainer.remove_unused_columns is derived"),
        ("nll_weight=-1", "nll_weight must be >= 0"),
        ("rounds=0", "rounds must be at least 1"),
        ("sampling.samples_per_question=1", "a pair needs two samples"),
        ("sampling.matcher=bm25", "sampling.matcher must be lexical, embedding or embedding:<model>"),
        ("pairs.ranking=[format, process]", "must include 'outcome'"),
        (
            "pairs.negative_types=[bad]",
            "not a valid list, each a choice among 'weaker', 'wrong', 'malformed'",
        ),
        ("heldout.every=5", "unknown key(s) heldout.every"),
        ("reward.process_weight=0.5", "IP-DPO ranks by the process score itself"),
        ("reward.matcher=embedding", "IP-DPO's evidence matcher is sampling.matcher"),
    ],
)
def test_bad_settings_are_refused_with_the_reason(override, message, tmp_path):
    with pytest.raises(ConfigError) as err:
        config = load_config(IPDPORunConfig, REPO_ROOT / "configs/ipdpo/tiny-cpu.yaml", [override])
        make_dpo_args(config, tmp_path)
    assert message in str(err.value)


def test_deepspeed_zero3_is_refused_at_start(tmp_path, monkeypatch):
    import transformers.integrations

    monkeypatch.setattr(transformers.integrations, "is_deepspeed_zero3_enabled", lambda: True)
    config = load_config(
        IPDPORunConfig, REPO_ROOT / "configs/ipdpo/tiny-cpu.yaml", [f"trainer.output_dir={tmp_path}"]
    )
    with pytest.raises(RunError, match="does not run under DeepSpeed ZeRO-3"):
        IPDPORun(config)
