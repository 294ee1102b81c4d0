"""The worked examples of docs/extending.md run: a new metric logged by GRPO and shown by `evaluate`, a
searcher of one's own, and a small training method (rejection-sampling fine-tuning) from the shared pieces."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from autorefine.config import SFTRunConfig
from autorefine.data import read_questions
from autorefine.evaluation.benchmark import evaluate_benchmarks
from autorefine.modeling import load_policy, load_tokenizer
from autorefine.protocol import PromptTemplate
from autorefine.retrieval import RetrieverClient
from autorefine.rollout import AgentLoop, RolloutSettings, SamplingParams
from autorefine.rollout.hf_engine import TransformersEngine
from autorefine.scoring.trajectory import score_trajectories
from autorefine.settings import load_config
from autorefine.training.grpo.trainer import build_trainer
from autorefine.training.sft.trainer import train_sft
from tests.helpers import REPO_ROOT, SYNTHETIC_DIR, tiny_grpo_config

EXAMPLES = REPO_ROOT / "docs" / "examples"
WARMSTART = SYNTHETIC_DIR / "warmstart"
TEMPLATE = PromptTemplate.load(SYNTHETIC_DIR / "template.txt")
ROLLOUT = RolloutSettings(max_turns=2, max_new_tokens=48, max_obs_tokens=160, max_completion_tokens=320)


def example(name: str):
    """A module of docs/examples, imported from its file."""
    spec = importlib.util.spec_from_file_location(f"docs_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def answer_words():
    module = example("answer_words_metric")
    module.register()
    yield module
    module.unregister()


def test_a_new_metric_is_logged_by_grpo_and_shown_by_evaluate(answer_words, synthetic_bm25_server, tmp_path):
    trainer, _ = build_trainer(
        tiny_grpo_config(synthetic_bm25_server, tmp_path / "grpo", "trainer.max_steps=1")
    )
    trainer.train()
    [step] = [h for h in trainer.state.log_history if "loss" in h]
    assert (
        "rewards/answer_words/mean" in step and step["rewards/answer_words/mean"] >= 1
    )  # the answers are words
    assert trainer.reward_weights.tolist()[trainer.reward_func_names.index("answer_words")] == 0

    engine = TransformersEngine(load_policy(WARMSTART, dtype="float32").eval(), load_tokenizer(WARMSTART))
    with RetrieverClient(synthetic_bm25_server) as client:
        metrics = evaluate_benchmarks(
            AgentLoop(engine, client, ROLLOUT, TEMPLATE),
            {"synthetic": SYNTHETIC_DIR / "heldout.jsonl"},
            tmp_path / "eval",
            limit=4,
            batch_size=4,
            progress=False,
        )
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    expected = sum(len((r["prediction"] or "").split()) for r in rows) / len(rows)
    assert metrics["datasets"]["synthetic"]["answer_words"] == pytest.approx(expected)
    header = (tmp_path / "eval" / "results.md").read_text().splitlines()[0]
    assert "| answer words |" in header


def test_a_searcher_of_ones_own_drives_the_agent_loop():
    module = example("memory_searcher")
    passages = {
        str(i): json.loads(line)["contents"]
        for i, line in enumerate((SYNTHETIC_DIR / "corpus.jsonl").read_text().splitlines())
    }
    searcher = module.MemorySearcher(passages)
    [hits] = searcher.search(["home city of Bigu Bolvou"], topk=2)
    assert len(hits) == 2 and "Bigu Bolvou" in hits[0].contents
    questions = read_questions(SYNTHETIC_DIR / "heldout.jsonl", limit=4)
    engine = TransformersEngine(load_policy(WARMSTART, dtype="float32").eval(), load_tokenizer(WARMSTART))
    trajectories = AgentLoop(engine, searcher, ROLLOUT, TEMPLATE).run(
        [q.question for q in questions], SamplingParams(temperature=0.0)
    )
    scores = score_trajectories(trajectories, questions)
    assert all(t.num_searches >= 1 for t in trajectories)
    assert sum(s["retrieval_success"] for s in scores) >= 3  # the searcher finds each person's passage


def test_rejection_sampling_fine_tuning_from_the_shared_pieces(synthetic_bm25_server, tmp_path):
    module = example("rejection_sampling")
    questions = read_questions(SYNTHETIC_DIR / "train.jsonl", limit=6)
    traces = tmp_path / "traces.jsonl"
    with RetrieverClient(synthetic_bm25_server) as client:
        kept = module.sample_best_traces(
            str(WARMSTART), questions, client, traces, samples=4, rollout=ROLLOUT, template=TEMPLATE
        )
    assert 1 <= kept <= len(questions)
    rows = [json.loads(line) for line in traces.read_text().splitlines()]
    assert all(r["f1"] == 1.0 and len(r["completion_ids"]) == len(r["env_mask"]) for r in rows)
    config = load_config(
        SFTRunConfig,
        REPO_ROOT / "configs" / "sft" / "synthetic-warmstart.yaml",
        [
            f"model.name_or_path={WARMSTART}",
            "model.tokenizer=",  # the warm start's own tokenizer
            "tiny_model=",  # fine-tune the warm start instead of a fresh policy
            f"traces_file={traces}",
            f"trainer.output_dir={tmp_path / 'rft'}",
            "trainer.max_steps=2",
            "trainer.report_to=[]",
            "trainer.save_strategy=no",
            "heldout.every=0",
        ],
    )
    final = train_sft(config)
    assert (Path(final) / "model.safetensors").is_file()
