"""Pins the private TRL / transformers internals `autorefine/training/trl_private.py` relies on.

If an upgrade renames or reshapes one of them, this fails naming it, instead of a training run failing late.
"""

from __future__ import annotations

import inspect
from collections import defaultdict

import pytest
from datasets import Dataset
from transformers import Trainer
from trl import GRPOConfig, GRPOTrainer

from autorefine.modeling import load_tokenizer, tiny_qwen2
from autorefine.training.trl_private import record_metric
from tests.paths import SYNTHETIC_DIR


def test_trainer_save_checkpoint_takes_model_and_trial():
    params = inspect.signature(Trainer._save_checkpoint).parameters
    assert list(params)[:3] == ["self", "model", "trial"], "transformers changed Trainer._save_checkpoint"


def test_grpo_trainer_queues_metrics_in_a_per_mode_dict_of_lists(tmp_path):
    tokenizer = load_tokenizer(SYNTHETIC_DIR / "tokenizer")
    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[],
                      per_device_train_batch_size=2, num_generations=2, max_steps=1)  # fmt: skip
    trainer = GRPOTrainer(
        model=tiny_qwen2(tokenizer, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1),
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=args,
        train_dataset=Dataset.from_list([{"prompt": "a"}, {"prompt": "b"}]),
        processing_class=tokenizer,
    )
    assert isinstance(trainer._metrics, dict) and isinstance(trainer._metrics["train"], defaultdict), (
        "TRL changed GRPOTrainer._metrics (record_metric queues into _metrics['train'][key])"
    )
    record_metric(trainer, "rollout/searches", 2)
    assert trainer._metrics["train"]["rollout/searches"] == [pytest.approx(2.0)]


def test_dpo_trainer_prepares_every_dataset_through_prepare_dataset(tmp_path):
    from trl import DPOConfig, DPOTrainer

    from autorefine.training.dpo_data import MaskedPreferenceCollator
    from autorefine.training.trl_private import pretokenized_dpo_trainer

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
