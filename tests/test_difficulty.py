"""Difficulty filtering (`data.difficulty_filter`): GRPO trains on questions its starting policy solves sometimes."""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerCallback

from autorefine.config import GRPORunConfig, SFTRunConfig
from autorefine.data import DifficultyFilterSettings, Question, read_questions
from autorefine.rollout.engine import SamplingParams
from autorefine.scoring.reward import RewardSettings
from autorefine.settings import ConfigError, load_config
from autorefine.training.arguments import RunError
from autorefine.training.grpo.difficulty import (
    REFILTER_FILE,
    REWARDS_FILE,
    SUMMARY_FILE,
    KeptQuestions,
    Refilter,
    filter_questions,
    histogram,
    policy_on_accelerator,
    read_cached,
    shard_batches,
    success_rate,
)
from autorefine.training.grpo.trainer import build_trainer
from tests.helpers import REPO_ROOT, SYNTHETIC_DIR, launch_grpo_2proc, tiny_grpo_config

QUESTIONS = 12
# What `filter_questions` needs of a single process's accelerate state.
ONE_PROCESS = SimpleNamespace(num_processes=1, process_index=0, is_main_process=True)


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
    refilter = Refilter(dataset, settings, tmp_path, ONE_PROCESS)
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
    Refilter(resumed, settings, tmp_path, ONE_PROCESS).on_train_begin(
        args, SimpleNamespace(global_step=2), None
    )
    assert resumed.active_ids() == ["b", "c"]  # resumed from step 2: step 4's drop is not yet made


class MovesRecorded(torch.nn.Linear):
    """A policy whose `.to` records the device instead of moving (no accelerator here)."""

    def __init__(self) -> None:
        super().__init__(2, 2)
        self.moves: list[str] = []

    def to(self, device):
        self.moves.append(str(device))
        return self


@pytest.mark.parametrize(
    ("accelerator", "engine_mode", "moves"),
    [
        ("cuda:0", "transformers", ["cuda:0", "cpu"]),  # ZeRO-1/2, FSDP: the Trainer has not placed it yet
        ("cuda:0", "colocate", []),  # vLLM samples with its own copy
        ("cpu", "transformers", []),
    ],
)
def test_the_filter_samples_with_the_policy_on_the_accelerator(accelerator, engine_mode, moves):
    model = MovesRecorded()
    trainer = SimpleNamespace(model=model, accelerator=SimpleNamespace(device=torch.device(accelerator)))
    with policy_on_accelerator(trainer, engine_mode):
        assert model.moves == moves[:1]
    assert model.moves == moves


def test_batches_are_dealt_out_in_turn_and_padded_to_the_same_count():
    todo = [Question(str(i), f"q{i}", []) for i in range(7)]

    def ids(rank: int, world_size: int) -> list[list[str]]:
        return [[q.id for q in batch] for batch in shard_batches(todo, 3, rank, world_size)]

    assert ids(0, 1) == [["0", "1", "2"], ["3", "4", "5"], ["6"]]
    assert ids(0, 2) == [["0", "1", "2"], ["6"]]
    assert ids(1, 2) == [["3", "4", "5"], []]  # an empty batch: it still takes its turns with rank 0's
    assert [ids(rank, 5) for rank in range(5)] == [[["0", "1", "2"]], [["3", "4", "5"]], [["6"]], [[]], [[]]]
    assert shard_batches([], 3, 1, 2) == []  # nothing left: no process samples (nor waits)


def test_refilter_sees_groups_split_across_processes_and_every_rank_drops_the_same(tmp_path, monkeypatch):
    from autorefine.training.rewards import ScoredBatch

    settings = DifficultyFilterSettings(enabled=True, samples=4, success_reward=0.5, refilter_every=1)
    rows = [{"id": qid} for qid in "abc"]
    ranks = [
        Refilter(
            KeptQuestions(rows),
            settings,
            tmp_path / f"rank-{rank}",
            SimpleNamespace(num_processes=2, process_index=rank, is_main_process=rank == 0),
        )
        for rank in (0, 1)
    ]
    # Two generation batches of one group of 4 each, every group split over the 2 processes (2 rows each):
    # a is solved by rank 0's half only (rate 0.5: kept), b by all 4 (dropped).
    for group, rewards in (("a", [1.0, 1.0, 0.0, 0.0]), ("b", [1.0, 1.0, 1.0, 1.0])):
        everyone = [group] * 4
        monkeypatch.setattr("accelerate.utils.gather_object", lambda items, everyone=everyone: list(everyone))
        for rank, refilter in enumerate(ranks):
            mine = slice(2 * rank, 2 * rank + 2)
            batch = ScoredBatch(
                1, True, everyone[mine], [""] * 2, [[]] * 2, [], [], rewards[mine], rewards, 4, {}
            )
            refilter.observe(batch)
    for rank, refilter in enumerate(ranks):
        refilter.on_step_end(SimpleNamespace(process_index=rank), SimpleNamespace(global_step=1), None)
    assert [r.latest for r in ranks] == [{"a": [1.0, 1.0, 0.0, 0.0], "b": [1.0] * 4}] * 2
    assert [r.dataset.active_ids() for r in ranks] == [["a", "c"], ["a", "c"]]


ODD_QUESTIONS = 7


@pytest.mark.slow
def test_two_processes_share_the_filter_keep_the_same_questions_and_reuse_its_cache(
    synthetic_bm25_server, tmp_path, free_port, caplog
):
    train = tmp_path / "train.jsonl"
    lines = (SYNTHETIC_DIR / "train.jsonl").read_text(encoding="utf-8").splitlines()[:ODD_QUESTIONS]
    train.write_text("\n".join(lines) + "\n", encoding="utf-8")
    questions = read_questions(train)
    ids = [q.id for q in questions]
    settings = DifficultyFilterSettings(enabled=True, samples=4, success_reward=0.3, batch_questions=3)
    overrides = (
        f"retriever.url={synthetic_bm25_server}",
        f"data.train_file={train}",
        "data.difficulty_filter.enabled=true",
        f"data.difficulty_filter.samples={settings.samples}",
        f"data.difficulty_filter.success_reward={settings.success_reward}",
        # 7 questions in batches of 3, (3, 3, 1): rank 0 samples the 1st and 3rd, rank 1 the 2nd, then an empty one
        f"data.difficulty_filter.batch_questions={settings.batch_questions}",
        "trainer.per_device_train_batch_size=2",  # one group of 4 per step, split over the 2 processes
        "heldout.every=0",
    )

    # Sample, filter, then train 2 steps, re-filtering after each.
    fresh = tmp_path / "fresh"
    status, reports, stderr = launch_grpo_2proc(
        fresh, free_port(), *overrides, "trainer.max_steps=2", "data.difficulty_filter.refilter_every=1"
    )
    assert status == 0, stderr[-4000:]
    assert [r["rank"] for r in reports] == [0, 1]
    assert [r["filter_batches"] for r in reports] == [[ids[0:3], ids[6:7]], [ids[3:6], []]]
    first = reports[0]["difficulty"]
    assert reports[1]["difficulty"] == first and first["sampled"] == ODD_QUESTIONS
    assert first["kept"] and set(first["rates"]) == set(ids)
    folder = filter_folder(fresh / "run")
    rewards_file = folder / REWARDS_FILE
    rows = [json.loads(line) for line in rewards_file.read_text().splitlines()]
    assert [row["ids"] for row in rows] == [ids[0:3], ids[3:6], ids[6:7]]  # each question exactly once
    assert Counter(qid for row in rows for qid in row["ids"]) == Counter(ids)
    assert json.loads((folder / SUMMARY_FILE).read_text())["kept_ids"] == first["kept"]
    # Re-filtering saw whole groups, the same on both ranks, and left both training on the same questions.
    assert reports[0]["refilter_latest"] == reports[1]["refilter_latest"]
    assert reports[0]["refilter_latest"] and all(len(g) == 4 for g in reports[0]["refilter_latest"].values())
    assert reports[0]["train_ids"] == reports[1]["train_ids"]
    assert set(reports[0]["train_ids"]) <= set(first["kept"])

    # One process over the same cached rewards (sampling nothing) keeps the same questions, at the same rates.
    def no_sampling():
        raise AssertionError("a complete cache was sampled again")

    alone = filter_questions(
        questions, no_sampling, SamplingParams(), settings, RewardSettings(), folder, state=ONE_PROCESS
    )
    assert [q.id for q in alone.kept] == first["kept"] and alone.rates == first["rates"]
    # ... and so does a one-process run of the same settings: its cache key does not count the processes.
    with caplog.at_level(logging.INFO, logger="autorefine.training.grpo.difficulty"):
        trainer, _ = build_trainer(
            filtered_config(
                synthetic_bm25_server, fresh / "run", train, "trainer.per_device_train_batch_size=4",
                f"data.difficulty_filter.batch_questions={settings.batch_questions}",
                f"data.difficulty_filter.success_reward={settings.success_reward}",
            )
        )  # fmt: skip
    assert "all from the cache" in caplog.text
    assert trainer.train_dataset.active_ids() == first["kept"]

    # Interrupted while its second round was written: the first batch is kept, the rest sampled again, alike.
    resumed = tmp_path / "resumed"
    cache = resumed / "run" / "difficulty" / folder.name / REWARDS_FILE
    cache.parent.mkdir(parents=True)
    whole = rewards_file.read_text().splitlines(keepends=True)
    cache.write_text(whole[0] + whole[1][: len(whole[1]) // 2])
    status, reports, stderr = launch_grpo_2proc(resumed, free_port(), *overrides, flags=("--build-only",))
    assert status == 0, stderr[-4000:]
    # what is left, (3, 1): rank 0 samples 3 questions, rank 1 one
    assert [r["filter_batches"] for r in reports] == [[ids[3:6]], [ids[6:7]]]
    assert [r["difficulty"]["sampled"] for r in reports] == [4, 4]
    assert reports[0]["difficulty"] == reports[1]["difficulty"]
    assert cache.read_text() == rewards_file.read_text()  # the same samples, in the same lines

    # A rerun samples nothing, on either process, and changes nothing.
    shutil.rmtree(resumed / "report")
    status, reports, stderr = launch_grpo_2proc(resumed, free_port(), *overrides, flags=("--build-only",))
    assert status == 0, stderr[-4000:]
    assert [r["filter_batches"] for r in reports] == [[], []]
    assert [r["difficulty"] for r in reports] == [{**first, "sampled": 0}] * 2
    assert cache.read_text() == rewards_file.read_text()
