"""`--check` on train-grpo, train-sft and train-ipdpo: the checks a start runs from the configuration alone,
reported at once (exit 0 or 2), without loading a model or contacting a server — as on a login node."""

from __future__ import annotations

import pytest

import autorefine.modeling as modeling
import autorefine.retrieval as retrieval
from autorefine.cli import main
from autorefine.config import GRPORunConfig
from autorefine.settings import load_config
from autorefine.training.arguments import RunError
from autorefine.training.grpo.trainer import build_trainer
from tests.helpers import REPO_ROOT, SYNTHETIC_DIR

PRESETS = {
    "train-grpo": sorted((REPO_ROOT / "configs" / "grpo").glob("*.yaml")),
    "train-sft": sorted((REPO_ROOT / "configs" / "sft").glob("*.yaml")),
    "train-ipdpo": sorted((REPO_ROOT / "configs" / "ipdpo").glob("*.yaml")),
}
CASES = [(command, preset) for command, presets in PRESETS.items() for preset in presets]
TINY_GRPO = REPO_ROOT / "configs" / "grpo" / "tiny-cpu.yaml"
TINY_IPDPO = REPO_ROOT / "configs" / "ipdpo" / "tiny-cpu.yaml"
CLOSED = "retriever.url=http://127.0.0.1:9"  # nothing listens there: a check that contacted it would fail


@pytest.fixture(autouse=True)
def nothing_loads_or_connects(monkeypatch):
    """A check that loaded a model or contacted a retriever fails the test."""

    def forbidden(*args, **kwargs):
        raise AssertionError("--check loaded a model or contacted a server")

    monkeypatch.setattr(modeling, "load_policy", forbidden)
    monkeypatch.setattr(retrieval.RetrieverClient, "wait_until_ready", forbidden)


def check(command: str, preset, *overrides: str, capsys) -> tuple[int, str]:
    code = main([command, "--config", str(preset), "--check", *overrides])
    return code, capsys.readouterr().out


@pytest.mark.parametrize(("command", "preset"), CASES, ids=[f"{c}:{p.stem}" for c, p in CASES])
def test_every_shipped_preset_passes_its_check(command, preset, capsys):
    code, out = check(command, preset, CLOSED, capsys=capsys)
    assert code == 0, out
    assert "the resolved configuration" in out and "# what the launch needs" in out and "# OK" in out
    assert "a retriever answering at http://127.0.0.1:9" in out


def test_a_gpu_preset_checked_on_a_cpu_lists_the_gpu_and_vllm_it_needs(capsys):
    code, out = check("train-grpo", REPO_ROOT / "configs/grpo/autorefine-qwen2.5-3b-base.yaml", capsys=capsys)
    assert code == 0
    assert "CUDA GPUs (trainer.bf16=true, trainer.use_vllm=true)" in out
    assert "vLLM (`pip install 'autorefine[gpu]'`), mode colocate" in out
    assert "data.train_file: data/prepared/train.jsonl (not found here)" in out


def test_a_vllm_server_preset_lists_the_server_and_the_port_it_connects_back_to(capsys):
    preset = REPO_ROOT / "configs/grpo/autorefine-qwen2.5-7b-base.yaml"
    code, out = check("train-grpo", preset, "trainer.vllm_group_port=51300", capsys=capsys)
    assert code == 0, out
    assert "a vLLM server at http://generation-node:8000 serving Qwen/Qwen2.5-7B, whose context window" in out
    assert "port 51300 (trainer.vllm_group_port) of the main training node open to the vLLM server" in out


def test_the_retriever_replicas_are_listed_this_nodes_first(capsys):
    urls = "retriever.url=http://node-a:8001,http://node-b:8001"
    code, out = check(
        "train-ipdpo", TINY_IPDPO, urls, "retriever.local_url=http://node-b:8001", capsys=capsys
    )
    assert code == 0
    assert (
        "a retriever answering at http://node-b:8001, http://node-a:8001 (this node's first: http://node-b"
        in out
    )
    code, out = check("train-grpo", TINY_GRPO, urls, "retriever.prefer_local=true", capsys=capsys)
    assert code == 0 and "http://node-a:8001, http://node-b:8001 (each node's own first)" in out


def test_every_refusal_is_reported_not_only_the_device_one(capsys):
    # On a CPU a real start stops at "needs a CUDA GPU": the importance-sampling refusal behind it was unreachable.
    preset = REPO_ROOT / "configs/grpo/autorefine-qwen2.5-3b-base.yaml"
    code, out = check(
        "train-grpo",
        preset,
        "trainer.top_p=0.95",
        "trainer.vllm_importance_sampling_mode=sequence_mask",
        "guard.heldout_drop.action=rollback",
        "heldout.save_best=false",
        capsys=capsys,
    )
    assert code == 2
    refused = out.split("# refused (2)")[1]
    assert refused.index("top_p=0.95 cannot be combined with use_vllm") < refused.index(
        "needs a best checkpoint"
    )


GRPO_REFUSALS = [
    (["trainer.top_p=0.9", "trainer.use_vllm=true"], "cannot be combined with use_vllm"),
    (
        ["trainer.save_steps=3", "trainer.save_strategy=steps", "trainer.steps_per_generation=2"],
        "must be a multiple",
    ),
    (["trainer.generation_kwargs={foo: 1}"], "generation_kwargs"),
    (
        ["trainer.use_vllm=true", "trainer.vllm_enable_sleep_mode=true"],
        "vllm_enable_sleep_mode is not supported",
    ),
    (
        [
            "guard.entropy_floor.action=stop",
            "trainer.use_vllm=true",
            "guard.entropy_floor.signal=health/entropy/think",
        ],
        "per-kind entropies come from the transformers engine",
    ),
    (["model.dtype=bfloat16"], "model.dtype=bfloat16 with full fine-tuning"),
    (["template=missing-template.txt"], "prompt template file not found"),
    (
        ["trainer.use_vllm=true", "trainer.vllm_max_model_length=64"],
        "do not fit vLLM's context window of 64 tokens",
    ),
    (["trainer.save_on_each_node=true"], "save_on_each_node=true makes the first process of every node"),
]


@pytest.mark.parametrize(("overrides", "message"), GRPO_REFUSALS, ids=[m[:30] for _, m in GRPO_REFUSALS])
def test_each_grpo_refusal_is_reported_and_is_what_a_start_raises(overrides, message, capsys):
    code, out = check("train-grpo", TINY_GRPO, CLOSED, *overrides, capsys=capsys)
    assert code == 2 and message in out.split("# refused")[1], out[-2000:]
    # The same check, at the same place, stops a real start (before any server or model).
    with pytest.raises(Exception, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_trainer(load_config(GRPORunConfig, TINY_GRPO, [CLOSED, *overrides]))


def test_a_malformed_training_file_is_refused(tmp_path, capsys):
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"id": "1", "question": "q"}\n')
    code, out = check("train-grpo", TINY_GRPO, CLOSED, f"data.train_file={bad}", capsys=capsys)
    assert code == 2 and "no gold answers" in out


def test_sft_refusals(capsys):
    preset = REPO_ROOT / "configs/sft/smollm2-hotpotqa.yaml"
    code, out = check("train-sft", preset, "model.dtype=float16", "trainer.bf16=true", "trainer.use_cpu=true",
                      capsys=capsys)  # fmt: skip
    assert code == 2 and "model.dtype=float16 with full fine-tuning" in out
    code, out = check("train-sft", preset, "traces_file=missing.jsonl", capsys=capsys)
    assert code == 0 and "traces_file: missing.jsonl (not found here)" in out
    code, out = check("train-sft", preset, "trainer.save_on_each_node=true", capsys=capsys)
    assert code == 2 and "put trainer.output_dir on a filesystem every node shares" in out


def test_ipdpo_refusals(tmp_path, capsys):
    (tmp_path / "run" / "round-1").mkdir(parents=True)
    run = f"trainer.output_dir={tmp_path / 'run'}"
    cases = [
        (["trainer.sync_ref_model=true"], "sync_ref_model moves the reference"),
        ([f"model.tokenizer={SYNTHETIC_DIR / 'tokenizer'}"], "leave model.tokenizer unset"),
        ([run], "already holds round-1 of a run: add --resume"),
        (["model.dtype=bfloat16"], "model.dtype=bfloat16 with full fine-tuning"),
        (["trainer.save_on_each_node=true"], "save_on_each_node=true makes the first process"),
    ]
    for overrides, message in cases:
        code, out = check("train-ipdpo", TINY_IPDPO, CLOSED, *overrides, capsys=capsys)
        assert code == 2 and message in out, (overrides, out[-1500:])
    bad_pairs = tmp_path / "pairs.jsonl"
    bad_pairs.write_text('{"id": "x"}\n')
    code, out = check("train-ipdpo", TINY_IPDPO, CLOSED, f"pairs.file={bad_pairs}", capsys=capsys)
    assert code == 2 and "missing 'chosen'" in out
    code, out = check("train-ipdpo", TINY_IPDPO, CLOSED, "sampling.engine=vllm", capsys=capsys)
    assert code == 0 and "one process: sampling.engine=vllm" in out


def test_a_start_refuses_before_contacting_anything(capsys):
    # Without --check, the first refusal ends the command with exit 2, as it always did.
    code = main(["train-grpo", "--config", str(TINY_GRPO), CLOSED, "trainer.generation_kwargs={foo: 1}"])
    assert code == 2 and "generation_kwargs" in capsys.readouterr().err


def test_real_start_raises_the_first_refusal_check_lists(capsys):
    overrides = [CLOSED, "trainer.use_vllm=true", "trainer.top_p=0.9", "guard.heldout_drop.action=stop"]
    code, out = check("train-grpo", TINY_GRPO, *overrides, capsys=capsys)
    first = out.split("# refused")[1].splitlines()[1]
    assert code == 2 and "cannot be combined with use_vllm" in first
    with pytest.raises(RunError, match="cannot be combined with use_vllm"):
        build_trainer(load_config(GRPORunConfig, TINY_GRPO, overrides))
