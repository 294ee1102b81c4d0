"""Difficulty filtering (`data.difficulty_filter`): GRPO trains on questions its starting policy solves sometimes."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers import TrainerCallback

from autorefine.config import GRPORunConfig, SFTRunConfig
from autorefine.data import DifficultyFilterSettings, read_questions
from autorefine.settings import ConfigError, load_config
from autorefine.training.arguments import RunError
from autorefine.training.grpo.difficulty import (
    REFILTER_FILE,
    REWARDS_FILE,
    SUMMARY_FILE,
    KeptQuestions,
    Refilter,
    histogram,
    read_cached,
    success_rate,
)
from autorefine.training.grpo.trainer import build_trainer
from tests.helpers import REPO_ROOT, SYNTHETIC_DIR, tiny_grpo_config

QUESTIONS = 12


@pytest.fixture
def train_file(tmp_path) -> Path:
    """The first synthetic training questions."""
    path = tmp_path / "train.jsonl"
    lines = (SYNTHETIC_DIR / "train.jsonl").read_text(encoding="utf-8").splitlines()[:QUESTIONS]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def filtered_config(url: str, out: Path, train_file: Path, *overrides: str) -> GRPORunConfig:
    """2 questions × 4 samples per step, K = 4 filter samples in batches of 5 questions."""
    return tiny_grpo_config(
        url,
        out,
        f"data.train_file={train_file}",
        "data.difficulty_filter.enabled=true",
        "data.difficulty_filter.samples=4",
        "data.difficulty_filter.batch_questions=5",
        "trainer.num_generations=4",
        "trainer.per_device_train_batch_size=8",
        "trainer.max_steps=2",
        *overrides,
    )


def filter_folder(out: Path) -> Path:
    (folder,) = [p for p in (out / "difficulty").iterdir() if p.is_dir()]
    return folder


def test_rates_band_and_histogram():
    settings = DifficultyFilterSettings(enabled=True, samples=4, success_reward=0.5)
    assert success_rate([0.0, 0.5, 1.0, 0.4], settings) == 0.5
    assert [settings.keeps(r) for r in (0.0, 0.25, 1.0)] == [False, True, False]
    assert histogram([0.0, 0.05, 0.5, 1.0, 0.99]) == [2, 0, 0, 0, 0, 1, 0, 0, 0, 2]
    with pytest.raises(ValueError, match="0 <= low < high <= 1"):
        DifficultyFilterSettings(low=0.5, high=0.5)
    with pytest.raises(ValueError, match="samples must be >= 1"):
        DifficultyFilterSettings(samples=0)


def test_the_filter_is_refused_outside_grpo():
    with pytest.raises(ConfigError, match="train-grpo option"):
        load_config(
            SFTRunConfig,
            REPO_ROOT / "configs" / "sft" / "synthetic-warmstart.yaml",
            ["data.difficulty_filter.enabled=true"],
        )


def test_kept_questions_drop_and_wrap():
    dataset = KeptQuestions([{"id": str(i)} for i in range(4)])
    dataset.drop({"1", "2"})
    assert len(dataset) == 4 and [dataset[i]["id"] for i in range(4)] == ["0", "3", "0", "3"]
    dataset.drop({"0", "3"})
    assert dataset.active_ids() == ["0"]  # never empty


def test_grpo_trains_only_on_kept_questions_and_reuses_the_cache(
    synthetic_bm25_server, tmp_path, train_file, caplog
):
    out = tmp_path / "run"
    # success = reward >= 0.3: the warm start solves some of these questions always, some sometimes
    config = filtered_config(
        synthetic_bm25_server, out, train_file, "data.difficulty_filter.success_reward=0.3"
    )
    trainer, rollout = build_trainer(config)
    folder = filter_folder(out)
    cached = read_cached(folder / REWARDS_FILE)
    assert len(cached) == QUESTIONS and all(len(r) == 4 for r in cached.values())
    settings = config.data.difficulty_filter
    expected = [
        q.id for q in read_questions(train_file) if settings.keeps(success_rate(cached[q.id], settings))
    ]
    summary = json.loads((folder / SUMMARY_FILE).read_text())
    assert summary["kept_ids"] == expected and 2 <= len(expected) < QUESTIONS
    assert summary["kept_share"] == pytest.approx(len(expected) / QUESTIONS)
    assert sum(summary["rate_histogram"]["counts"]) == QUESTIONS
    assert [trainer.train_dataset[i]["id"] for i in range(len(trainer.train_dataset))] == expected

    seen: list[str] = []

    class Prompts(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.extend(prompt for prompt, _ in rollout.latest)

    trainer.add_callback(Prompts())
    trainer.train()
    kept_questions = {q.question for q in read_questions(train_file) if q.id in expected}
    assert seen and set(seen) <= kept_questions

    # The same policy, questions and sampling: nothing is sampled again (a resumed run rebuilds its trainer so).
    before = (folder / REWARDS_FILE).read_text()
    with caplog.at_level(logging.INFO, logger="autorefine.training.grpo.difficulty"):
        again, _ = build_trainer(config)
    assert "all from the cache" in caplog.text
    assert (folder / REWARDS_FILE).read_text() == before
    assert [again.train_dataset[i]["id"] for i in range(len(again.train_dataset))] == expected

    # A band that keeps too few questions for one step is refused, naming the histogram.
    narrow = filtered_config(
        synthetic_bm25_server, out, train_file, "data.difficulty_filter.success_reward=0.3",
        "data.difficulty_filter.low=0.99",
    )  # fmt: skip
    with pytest.raises(RunError, match="rate histogram"):
        build_trainer(narrow)


def test_an_interrupted_filter_resumes_with_the_same_samples(synthetic_bm25_server, tmp_path, train_file):
    whole = tmp_path / "whole"
    build_trainer(filtered_config(synthetic_bm25_server, whole, train_file))
    reference = filter_folder(whole) / REWARDS_FILE
    lines = reference.read_text().splitlines(keepends=True)
    assert len(lines) == 3  # 12 questions in batches of 5
    part = tmp_path / "part"
    folder = part / "difficulty" / filter_folder(whole).name
    folder.mkdir(parents=True)
    # Killed while writing its second batch: the first survives, the torn line is cut and sampled again.
    (folder / REWARDS_FILE).write_text(lines[0] + lines[1][: len(lines[1]) // 2])
    build_trainer(filtered_config(synthetic_bm25_server, part, train_file))
    assert read_cached(folder / REWARDS_FILE) == read_cached(reference)
    assert (folder / REWARDS_FILE).read_text() == reference.read_text()


def test_refilter_drops_questions_whose_latest_group_left_the_band_and_a_resume_drops_them_again(tmp_path):
    from autorefine.training.rewards import ScoredBatch

    settings = DifficultyFilterSettings(enabled=True, samples=2, success_reward=0.5, refilter_every=2)
    rows = [{"id": qid} for qid in "abc"]
    dataset = KeptQuestions(rows)
    refilter = Refilter(dataset, settings, tmp_path)
    args = SimpleNamespace(process_index=0)

    def scored(ids, rewards, training=True):
        n = len(rewards)
        return ScoredBatch(1, training, ids, [""] * n, [[]] * n, [], [], rewards, rewards, 2, {})

    refilter.observe(scored(["a", "a", "b", "b"], [1.0, 1.0, 0.0, 1.0]))  # a: always solved now
    refilter.observe(scored(["b", "b"], [0.0, 0.0], training=False))  # held-out rollouts do not count
    refilter.on_step_end(args, SimpleNamespace(global_step=1), None)
    assert dataset.active_ids() == ["a", "b", "c"]  # not a re-filter step
    refilter.on_step_end(args, SimpleNamespace(global_step=2), None)
    assert dataset.active_ids() == ["b", "c"]  # c never sampled since: kept
    refilter.observe(scored(["c", "c"], [0.0, 0.0]))
    refilter.on_step_end(args, SimpleNamespace(global_step=4), None)
    assert dataset.active_ids() == ["b"]
    history = json.loads((tmp_path / "difficulty" / REFILTER_FILE).read_text())["history"]
    assert [(e["step"], e["dropped"]) for e in history] == [(2, ["a"]), (4, ["c"])]

    resumed = KeptQuestions(rows)
    Refilter(resumed, settings, tmp_path).on_train_begin(args, SimpleNamespace(global_step=2), None)
    assert resumed.active_ids() == ["b", "c"]  # resumed from step 2: step 4's drop is not yet made
