"""Pins the private TRL / transformers internals `autorefine/training/trl_private.py` relies on.

If an upgrade renames or reshapes one of them, this fails naming it, instead of a training run failing late.
"""

from __future__ import annotations

import inspect
from collections import defaultdict

import pytest
import torch
from datasets import Dataset
from transformers import Trainer
from trl import GRPOConfig, GRPOTrainer

from autorefine.modeling import load_tokenizer, tiny_qwen2
from autorefine.trl_private import (
    after_scoring,
    colocated_vllm,
    discard_generation_buffer,
    gathered_rewards,
    latest_metric,
    load_weights,
    preference_collator,
    push_weights_to_vllm,
    record_metric,
)
from tests.helpers import SYNTHETIC_DIR


def test_trainer_save_checkpoint_takes_model_and_trial():
    params = inspect.signature(Trainer._save_checkpoint).parameters
    assert list(params)[:3] == ["self", "model", "trial"], "transformers changed Trainer._save_checkpoint"


def tiny_grpo_trainer(tmp_path, **kwargs) -> GRPOTrainer:
    tokenizer = load_tokenizer(SYNTHETIC_DIR / "tokenizer")
    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[],
                      per_device_train_batch_size=2, num_generations=2, max_steps=1)  # fmt: skip
    return GRPOTrainer(
        model=tiny_qwen2(tokenizer, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1),
        reward_funcs=lambda completions, **kw: [float(len(c)) for c in completions],
        args=args,
        train_dataset=Dataset.from_list([{"prompt": "a"}, {"prompt": "b"}]),
        processing_class=tokenizer,
        **kwargs,
    )


def test_grpo_trainer_queues_metrics_in_a_per_mode_dict_of_lists(tmp_path):
    trainer = tiny_grpo_trainer(tmp_path)
    assert isinstance(trainer._metrics, dict) and isinstance(trainer._metrics["train"], defaultdict), (
        "TRL changed GRPOTrainer._metrics (record_metric queues into _metrics['train'][key])"
    )
    record_metric(trainer, "rollout/searches", 2)
    assert trainer._metrics["train"]["rollout/searches"] == [pytest.approx(2.0)]


def test_dpo_trainer_prepares_every_dataset_through_prepare_dataset(tmp_path):
    from trl import DPOConfig, DPOTrainer

    from autorefine.training.ipdpo.collator import MaskedPreferenceCollator
    from autorefine.trl_private import pretokenized_dpo_trainer

    params = inspect.signature(DPOTrainer._prepare_dataset).parameters
    assert list(params) == ["self", "dataset", "processing_class", "args", "dataset_name"], (
        "TRL changed DPOTrainer._prepare_dataset (pretokenized_dpo_trainer overrides it)"
    )
    tokenizer = load_tokenizer(SYNTHETIC_DIR / "tokenizer")
    row = {"prompt_ids": [5, 6], "chosen_ids": [7, 8], "rejected_ids": [9, 10],
           "chosen_env_mask": [1, 0], "rejected_env_mask": [1, 1]}  # fmt: skip
    args = DPOConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], remove_unused_columns=False
    )
    trainer = pretokenized_dpo_trainer()(
        model=tiny_qwen2(tokenizer, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1),
        ref_model=tiny_qwen2(tokenizer, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1),
        args=args,
        data_collator=MaskedPreferenceCollator(pad_token_id=tokenizer.pad_token_id),
        train_dataset=Dataset.from_list([row]),
        eval_dataset=Dataset.from_list([row]),
        processing_class=tokenizer,
    )
    # the ids and masks reach the trainer untouched (no prompt extraction, no EOS, no re-tokenization)
    assert trainer.train_dataset[0] == row and trainer.eval_dataset[0] == row
    # and TRL's own preparation is what the override skips: it re-tokenizes text and has no use for ids
    with pytest.raises(KeyError, match="chosen"):  # it looks for text columns to extract a prompt from
        DPOTrainer(
            model=tiny_qwen2(tokenizer, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1),
            args=args,
            train_dataset=Dataset.from_list([row]),
            processing_class=tokenizer,
        )


def test_trainer_loads_weights_from_a_save_model_folder(tmp_path):
    params = inspect.signature(Trainer._load_from_checkpoint).parameters
    assert list(params)[:2] == ["self", "resume_from_checkpoint"], (
        "transformers changed _load_from_checkpoint"
    )
    trainer = tiny_grpo_trainer(tmp_path)
    trainer.save_model(str(tmp_path / "saved"))
    saved = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(1.0)
    load_weights(trainer, tmp_path / "saved")
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, saved[name]), name


def test_grpo_trainer_regenerates_when_its_generation_buffer_is_none(tmp_path):
    trainer = tiny_grpo_trainer(tmp_path)
    assert hasattr(trainer, "_buffered_inputs"), "TRL renamed GRPOTrainer._buffered_inputs"
    assert "self._buffered_inputs is None" in inspect.getsource(GRPOTrainer._prepare_inputs), (
        "TRL no longer regenerates when _buffered_inputs is None (discard_generation_buffer relies on it)"
    )
    trainer._buffered_inputs = [{"stale": True}]
    discard_generation_buffer(trainer)
    assert trainer._buffered_inputs is None


def test_scored_batch_carries_the_masks_and_token_count_the_loss_reads(tmp_path):
    # The shape `after_scoring` hooks (DropFlatGroups) edit: per-row masks and num_items_in_batch.
    def rollout(prompts, trainer):
        n = len(prompts)
        return {"prompt_ids": [[5, 6]] * n, "completion_ids": [[7, 8, 9, 2]] * n, "logprobs": None,
                "env_mask": [[1, 0, 1, 1]] * n}  # fmt: skip

    trainer = tiny_grpo_trainer(tmp_path, rollout_func=rollout)
    seen = []
    after_scoring(trainer, lambda inputs, batch: seen.append((inputs, batch)) or batch)
    trainer.train()
    [(inputs, batch)] = seen
    assert len(inputs) == 2 and batch["completion_mask"].shape == (2, 4)
    assert batch["tool_mask"].tolist() == [[1, 0, 1, 1]] * 2, "TRL changed how env_mask reaches the loss"
    assert int(batch["num_items_in_batch"]) == 6
    assert batch["advantages"].shape == (2,)


def test_the_scored_batch_hook_sees_trls_gathered_rewards_and_flat_share(tmp_path):
    # `gathered_rewards` reads TRL's `_logs["rewards"]`, `latest_metric` its `_metrics`: both as TRL left them
    # for the batch it just scored (the `ScoredBatch` event is built from them).
    rewards = {"a": 1.0, "b": 1.0}

    def rollout(prompts, trainer):
        n = len(prompts)
        return {"prompt_ids": [[5, 6]] * n, "completion_ids": [[7, 8, 9, 2]] * n, "logprobs": None}

    trainer = tiny_grpo_trainer(tmp_path, rollout_func=rollout)
    trainer.reward_funcs = [lambda prompts, **kw: [rewards[p] for p in prompts]]
    seen = []

    def hook(inputs, batch):
        seen.append((gathered_rewards(trainer, trainer.reward_func_names, trainer.reward_weights.tolist()),
                     latest_metric(trainer, "frac_reward_zero_std")))  # fmt: skip
        return batch

    after_scoring(trainer, hook)
    trainer.train()
    [(gathered, flat)] = seen
    assert gathered == [1.0, 1.0] and flat == 1.0  # one group of two equal rewards: flat


def test_colocated_vllm_and_weight_push_reach_trls_generation_helper():
    # TRL keeps its vLLM engine in `vllm_generation` (llm, tp_group, sync_weights); our fakes mirror that.
    from trl.generation.vllm_generation import VLLMGeneration

    assert "sync_weights" in vars(VLLMGeneration), "TRL renamed VLLMGeneration.sync_weights"
    assert "self.llm" in inspect.getsource(VLLMGeneration), "TRL no longer keeps the colocated engine in .llm"
    assert "vllm_generation" in inspect.getsource(GRPOTrainer.__init__), "GRPOTrainer.vllm_generation is gone"

    class Generation:
        llm, tp_group = "LLM", "GROUP"
        synced = 0

        def sync_weights(self):
            self.synced += 1

    class Trainer:
        vllm_generation = Generation()

    assert colocated_vllm(Trainer()) == ("LLM", "GROUP")
    push_weights_to_vllm(Trainer())
    assert Trainer.vllm_generation.synced == 1


def test_preference_collator_is_trls_dpo_collator():
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    assert preference_collator() is DataCollatorForPreference


def test_the_reserved_kv_cache_layer_relies_on_dynamic_layers_contract():
    # `hf_engine._ReservedLayer` subclasses transformers' DynamicLayer (see trl_private's docstring).
    from transformers.cache_utils import DynamicLayer

    from autorefine.rollout.hf_engine import _ReservedLayer

    for name in ("update", "lazy_initialization", "get_seq_length", "batch_select_indices"):
        assert callable(getattr(DynamicLayer, name, None)), f"transformers removed DynamicLayer.{name}"
    layer = _ReservedLayer()
    layer.reserve = 4
    k = torch.randn(1, 2, 3, 8)
    keys, values = layer.update(k, k.clone())
    assert torch.equal(values, k)
    assert keys.shape == (1, 2, 3, 8) and layer.get_seq_length() == 3
    more = torch.randn(1, 2, 1, 8)
    keys, _ = layer.update(more, more.clone())
    assert keys.shape == (1, 2, 4, 8) and torch.equal(keys[..., 3:, :], more)
    layer.batch_select_indices(torch.tensor([0]))
    assert layer.get_seq_length() == 4
