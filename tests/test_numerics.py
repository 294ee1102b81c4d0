"""Numerics of what a real run trains on: fp32 master weights under bf16 compute, LoRA merged in fp32."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from autorefine.config import GRPORunConfig, IPDPORunConfig
from autorefine.modeling import LoraSettings, ModelSettings, load_tokenizer, tiny_qwen2, trained_weights_dtype
from autorefine.settings import ConfigError, load_config
from tests.helpers import REPO_ROOT, SYNTHETIC_DIR

FULL_PRESETS = [
    (GRPORunConfig, "configs/grpo/autorefine-qwen2.5-3b-base.yaml"),
    (GRPORunConfig, "configs/grpo/autorefine-qwen2.5-3b-instruct.yaml"),
    (IPDPORunConfig, "configs/ipdpo/qwen2.5-3b-base.yaml"),
    (IPDPORunConfig, "configs/ipdpo/qwen2.5-3b-instruct.yaml"),
]
LORA_PRESETS = [
    (GRPORunConfig, "configs/grpo/autorefine-qwen2.5-3b-base-lora.yaml"),
    (IPDPORunConfig, "configs/ipdpo/qwen2.5-3b-base-lora.yaml"),
]
TINY_SHAPE = {
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "max_position_embeddings": 512,
}


@pytest.mark.parametrize(("cls", "preset"), FULL_PRESETS, ids=[p for _, p in FULL_PRESETS])
def test_full_fine_tuning_presets_train_fp32_weights_under_bf16_compute(cls, preset):
    config = load_config(cls, REPO_ROOT / preset)
    assert trained_weights_dtype(config.model, config.lora) == "float32"
    assert config.trainer["bf16"] is True  # compute in bf16 (autocast)


@pytest.mark.parametrize(("cls", "preset"), LORA_PRESETS, ids=[p for _, p in LORA_PRESETS])
def test_lora_presets_may_keep_a_bf16_frozen_base(cls, preset):
    config = load_config(cls, REPO_ROOT / preset)
    assert trained_weights_dtype(config.model, config.lora) == "bfloat16"


def test_half_precision_weights_for_full_fine_tuning_are_refused():
    with pytest.raises(ConfigError, match=r"model.dtype=bfloat16 with full fine-tuning .* round away"):
        trained_weights_dtype(ModelSettings(dtype="bfloat16"), LoraSettings())
    assert trained_weights_dtype(ModelSettings(dtype="float32"), LoraSettings()) == "float32"
    assert trained_weights_dtype(ModelSettings(dtype="bfloat16"), LoraSettings(enabled=True)) == "bfloat16"


def test_bf16_weights_lose_small_updates_that_fp32_weights_keep():
    # The arithmetic behind the rule: an lr-1e-6 AdamW step (~1e-6 per weight) applied to weights of std 0.02.
    torch.manual_seed(0)
    weights = torch.randn(10_000) * 0.02
    step = torch.full_like(weights, 1e-6)
    assert ((weights + step) != weights).float().mean() == 1.0
    bf16 = weights.to(torch.bfloat16)
    assert ((bf16 + step.to(torch.bfloat16)) != bf16).float().mean() < 0.05


def write_traces(path: Path, rows: int = 16) -> Path:
    """Gold-like synthetic trajectories (prompt, model turn, documents, model turn) as SFT traces."""
    tokenizer = load_tokenizer(SYNTHETIC_DIR / "tokenizer")
    questions = [json.loads(line) for line in (SYNTHETIC_DIR / "train.jsonl").read_text().splitlines()[:rows]]
    out = []
    for q in questions:
        name, city = (
            q["question"].removeprefix("What is the home city of ").rstrip("?"),
            q["golden_answers"][0],
        )
        parts = [
            (1, f"<think> search </think>\n<search> {name} </search>"),
            (
                0,
                f"\n\n<documents>\nDoc 1(Title: {name}) The home city of {name} is {city}.\n</documents>\n\n",
            ),
            (1, f"<refine> The home city of {name} is {city}. </refine>\n<answer> {city} </answer>"),
        ]
        ids = [(keep, tokenizer.encode(text, add_special_tokens=False)) for keep, text in parts]
        prompt = tokenizer.encode(
            f"Search, then answer.\nQuestion: {q['question']}\n", add_special_tokens=False
        )
        out.append({"id": q["id"], "prompt_ids": prompt, "completion_ids": [t for _, p in ids for t in p],
                    "env_mask": [keep for keep, p in ids for _ in p]})  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["configs/grpo/autorefine-qwen2.5-3b-base.yaml"])
def test_the_presets_dtype_settings_move_every_trained_weight_over_two_ddp_processes(
    preset, tmp_path, free_port
):
    """A few AdamW steps at lr 1e-6 with the preset's model.dtype and trainer.bf16, on 2 gloo DDP processes."""
    config = load_config(GRPORunConfig, REPO_ROOT / preset)
    traces = write_traces(tmp_path / "traces.jsonl")
    tokenizer = load_tokenizer(SYNTHETIC_DIR / "tokenizer")
    start = tiny_qwen2(tokenizer, **TINY_SHAPE)  # saved in float32; loading applies the preset's dtype
    start.save_pretrained(tmp_path / "start")
    tokenizer.save_pretrained(tmp_path / "start")
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO_ROOT / "configs/accelerate/cpu_2proc.yaml"),
        "--main_process_port", str(free_port()),
        "-m", "autorefine.cli", "train-sft",
        "--config", str(REPO_ROOT / "configs/sft/synthetic-warmstart.yaml"),
        f"traces_file={traces}",
        f"model.name_or_path={tmp_path / 'start'}",
        "model.tokenizer=",
        "tiny_model=",
        f"model.dtype={config.model.dtype}",
        f"trainer.bf16={str(config.trainer['bf16']).lower()}",
        f"trainer.output_dir={tmp_path / 'run'}",
        "trainer.learning_rate=1e-6",
        "trainer.lr_scheduler_type=constant",
        "trainer.warmup_steps=0",
        "trainer.max_steps=3",
        "trainer.per_device_train_batch_size=4",
        "trainer.logging_steps=1",
        "heldout.every=0",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    trained = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    changed = total = 0
    for name, before in start.state_dict().items():
        if "embed_tokens" in name or name not in trained:
            continue  # rows of tokens never seen get no gradient; the tied head is the same tensor
        after = trained[name]
        assert after.dtype == torch.float32, f"{name} stored as {after.dtype}"
        changed += int((after != before).sum())
        total += before.numel()
    assert changed / total >= 0.99, f"only {changed / total:.1%} of the trained weights moved"


def test_lora_merges_into_a_bf16_base_in_fp32(tmp_path):
    """Merged weights equal base + scale·B·A to fp32 precision, though the base was saved in bf16."""
    from peft import LoraConfig, get_peft_model

    from autorefine.modeling import load_policy
    from autorefine.training.checkpoints import merge_adapter, merged_in_fp32

    tokenizer = load_tokenizer(SYNTHETIC_DIR / "tokenizer")
    tiny_qwen2(tokenizer, **TINY_SHAPE).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    peft = get_peft_model(load_policy(tmp_path / "base", dtype="bfloat16"), config)
    torch.manual_seed(1)
    for module in peft.modules():
        if hasattr(module, "lora_B") and "default" in module.lora_B:
            torch.nn.init.normal_(
                module.lora_B["default"].weight, std=1e-4
            )  # deltas of ~1e-5: a few steps' worth
    peft.save_pretrained(tmp_path / "adapter")
    scale = config.lora_alpha / config.r
    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    expected = {}
    for name, module in peft.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            key = name.removeprefix("base_model.model.") + ".weight"
            a, b = module.lora_A["default"].weight.double(), module.lora_B["default"].weight.double()
            expected[key] = base[key].double() + scale * (b @ a)

    merge_adapter(str(tmp_path / "base"), tmp_path / "adapter", tmp_path / "merged")
    for merged in (
        load_file(str(tmp_path / "merged" / "model.safetensors")),
        merged_in_fp32(peft).state_dict(),
    ):
        for key, want in expected.items():
            got = merged[key]
            assert got.dtype == torch.float32, key
            torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-7)
            assert (got != base[key].float()).float().mean() > 0.99  # the small deltas survived
