"""vLLM importance sampling vs nucleus sampling, measured on the warm-start policy; refused where it would bias.

TRL starts vLLM with `logprobs_mode="processed_logprobs"`: the log-prob of a token sampled under top_p < 1 is
taken from the renormalized nucleus, while the trainer recomputes it from the full softmax (temperature
only). Per token, exp(trainer - rollout) is then the nucleus mass, below 1; TRL's default sequence-level
correction multiplies those over a trajectory's model tokens.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from autorefine.config import GRPORunConfig
from autorefine.data import read_questions
from autorefine.modeling import load_policy, load_tokenizer
from autorefine.protocol import PromptTemplate
from autorefine.retrieval import RetrieverClient
from autorefine.rollout import AgentLoop, RolloutSettings, SamplingParams
from autorefine.rollout.vllm_engine import VLLMEngine
from autorefine.settings import load_config
from autorefine.training.arguments import RunError
from autorefine.training.grpo.trainer import make_grpo_args
from tests import fake_vllm
from tests.helpers import REPO_ROOT, SYNTHETIC_DIR

WARM = SYNTHETIC_DIR / "warmstart"
ROLLOUT = RolloutSettings(max_turns=2, max_new_tokens=48, max_obs_tokens=160, max_completion_tokens=320)


def log_ratios(url: str, top_p: float) -> list[torch.Tensor]:
    """Per trajectory, trainer − rollout log-prob of every model token (temperature 1, TRL's recomputation)."""
    tokenizer = load_tokenizer(WARM)
    engine = VLLMEngine(tokenizer, llm=fake_vllm.LLM(model=str(WARM), seed=0))
    questions = [q.question for q in read_questions(SYNTHETIC_DIR / "train.jsonl", limit=8)] * 2
    with RetrieverClient(url) as client:
        loop = AgentLoop(engine, client, ROLLOUT, PromptTemplate.load(SYNTHETIC_DIR / "template.txt"))
        trajectories = loop.run(questions, SamplingParams(temperature=1.0, top_p=top_p))
    model = load_policy(WARM, dtype="float32").eval()
    out = []
    for t in trajectories:
        ids = torch.tensor([t.prompt_ids + t.completion_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, len(t.prompt_ids) - 1 : -1].float()
        trainer = torch.log_softmax(logits, -1).gather(1, torch.tensor(t.completion_ids)[:, None]).squeeze(1)
        model_tokens = torch.tensor(t.env_mask, dtype=torch.bool)
        out.append((trainer - torch.tensor(t.logprobs))[model_tokens])
    return out


@pytest.mark.slow
def test_nucleus_sampling_shrinks_the_sequence_level_correction(synthetic_bm25_server, monkeypatch):
    fake_vllm.install(monkeypatch)
    nucleus = log_ratios(synthetic_bm25_server, top_p=0.95)
    token_ratios = torch.cat(nucleus).exp()
    sequence_ratios = torch.stack([r.sum() for r in nucleus]).exp()
    lengths = [len(r) for r in nucleus]
    print(
        f"\ntop_p=0.95 on the warm start: {statistics.mean(lengths):.0f} model tokens per trajectory; "
        f"token ratio mean {token_ratios.mean():.3f} (min {token_ratios.min():.3f}); "
        f"sequence ratio mean {sequence_ratios.mean():.3f} (min {sequence_ratios.min():.3f})"
    )
    assert token_ratios.max() <= 1 + 1e-4  # a kept mass, never above 1
    assert token_ratios.mean() > 0.95  # per token, a mild correction...
    assert sequence_ratios.mean() < 0.9  # ...that TRL's sequence-level modes multiply into a large one
    # every model token multiplies the weight by its kept mass: a 300-token trajectory would keep this much
    at_300 = math.exp(300 * torch.cat(nucleus).mean().item())
    print(f"extrapolated to 300 model tokens: {at_300:.3f}")
    assert at_300 < 0.5

    full = log_ratios(synthetic_bm25_server, top_p=1.0)
    assert torch.cat(full).abs().max() < 1e-3  # top_p=1: rollout and trainer log-probs agree
    assert torch.stack([r.sum() for r in full]).exp().sub(1).abs().max() < 1e-2


def tiny_cpu(*overrides: str):
    return load_config(
        GRPORunConfig, REPO_ROOT / "configs/grpo/tiny-cpu.yaml", ["trainer.report_to=[]", *overrides]
    )


@pytest.mark.parametrize("setting", ["top_p=0.95", "top_k=50", "min_p=0.05", "repetition_penalty=1.1"])
def test_sampling_filters_with_sequence_level_correction_are_refused(setting):
    with pytest.raises(RunError, match="processed_logprobs") as err:
        make_grpo_args(tiny_cpu("trainer.use_vllm=true", f"trainer.{setting}"))
    assert "token_truncate" in str(err.value) and "top_p: 1.0" in str(err.value)


@pytest.mark.parametrize(
    "overrides",
    [
        (
            "trainer.use_vllm=true",
            "trainer.top_p=0.95",
            "trainer.vllm_importance_sampling_mode=token_truncate",
        ),
        ("trainer.use_vllm=true", "trainer.top_p=0.95", "trainer.vllm_importance_sampling_correction=false"),
        ("trainer.top_p=0.95",),  # the transformers engine: no vLLM log-probs involved
        ("trainer.use_vllm=true",),
    ],
)
def test_corrections_that_stay_unbiased_are_accepted(overrides):
    assert make_grpo_args(tiny_cpu(*overrides)).top_p in (0.95, 1.0)


@pytest.mark.parametrize("preset", sorted((REPO_ROOT / "configs/grpo").glob("autorefine-*.yaml")), ids=str)
def test_gpu_presets_sample_training_rollouts_without_filters(preset):
    # the presets' own trainer section, made CPU-loadable: it must pass the check that vLLM runs get
    config = load_config(
        GRPORunConfig, preset, ["trainer.bf16=false", "trainer.use_cpu=true", "trainer.report_to=[]"]
    )
    args = make_grpo_args(config)
    assert args.use_vllm and args.vllm_importance_sampling_mode == "sequence_mask"
    assert (args.top_p, args.top_k or 0, args.min_p or 0.0, args.repetition_penalty) == (1.0, 0, 0.0, 1.0)
