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
