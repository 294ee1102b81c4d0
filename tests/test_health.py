"""Health signals: each one on hand-built trajectories with hand-computed values, then on the real TRL trainer."""

from __future__ import annotations

import json
import math

import pytest

from autorefine import protocol
from autorefine.modeling import load_tokenizer
from autorefine.rollout.trajectory import FinishReason, Segment, Trajectory
from autorefine.training.health import (
    TokenKinds,
    flat_groups,
    means,
    merge_tallies,
    question_source,
    rollout_means,
    trajectory_tally,
)
from tests.helpers import QWEN_TOKENIZER

DOCS = "\n\n<documents>\nDoc 1(Title: Bigu) The home city of Bigu is Pemere.\n</documents>\n\n"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(QWEN_TOKENIZER)


@pytest.fixture(scope="module")
def kinds(tokenizer):
    return TokenKinds(tokenizer)


class Built:
    """A trajectory assembled piece by piece with real token ids, as the agent loop lays one out."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.t = Trajectory(prompt_ids=[0])
        self.counts: list[tuple[float, int]] = []  # (entropy, tokens) of every model piece

    def _segment(self, kind: str, ids: list[int], entropies: list[float]) -> None:
        t = self.t
        start = len(t.completion_ids)
        t.completion_ids += ids
        t.env_mask += [int(kind == "model")] * len(ids)
        t.entropies += entropies
        t.logprobs += [0.0] * len(ids)
        text = self.tokenizer.decode(ids, skip_special_tokens=kind == "model")
        t.segments.append(Segment(kind, text, start, start + len(ids)))

    def model(self, *pieces: tuple[str, float]) -> Built:
        """One model turn from (text, entropy of each of its tokens) pieces, each tokenized on its own."""
        ids, entropies = [], []
        for text, entropy in pieces:
            piece = self.tokenizer.encode(text, add_special_tokens=False)
            ids += piece
            entropies += [entropy] * len(piece)
            self.counts.append((entropy, len(piece)))
        self._segment("model", ids, entropies)
        self.t.num_turns += 1
        return self

    def insert(self, kind: str, text: str, query: str | None = None) -> Built:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        self._segment(kind, ids, [math.nan] * len(ids))
        if query is not None:
            self.t.queries.append(query)
        return self

    def end(self, reason: FinishReason) -> Trajectory:
        self._segment("eos", [self.tokenizer.eos_token_id], [math.nan])
        self.t.finish_reason = reason
        return self.t


def search_and_answer(tokenizer) -> Built:
    return (
        Built(tokenizer)
        .model(
            ("<think> I should look it up </think>", 1.0),
            ("\n", 3.0),
            ("<search> home city of Bigu </search>", 2.0),
        )
        .insert("documents", DOCS, query="home city of Bigu")
        .model(
            ("<refine> Bigu lives in Pemere </refine>", 0.5), ("\n", 3.0), ("<answer> Pemere </answer>", 0.25)
        )
    )


def signals(trajectories, ids, kinds):
    """Every health signal of one batch: the tallied ones and the per-trajectory means."""
    return {**means(trajectory_tally(trajectories, ids, kinds)), **rollout_means(trajectories)}


def test_entropy_per_block_kind(tokenizer, kinds):
    built = search_and_answer(tokenizer)
    t = built.end(FinishReason.ANSWER)
    values = signals([t], ["nq-1"], kinds)
    assert values["health/entropy/think"] == pytest.approx(1.0)
    assert values["health/entropy/search"] == pytest.approx(2.0)
    assert values["health/entropy/refine"] == pytest.approx(0.5)
    assert values["health/entropy/answer"] == pytest.approx(0.25)
    assert values["health/entropy/other"] == pytest.approx(3.0)  # the newlines between blocks
    tokens = sum(n for _, n in built.counts)
    assert values["health/entropy/model"] == pytest.approx(sum(e * n for e, n in built.counts) / tokens)
    # documents and the closing EOS (environment tokens) count for nothing
    assert tokens == t.num_model_tokens


def test_token_kinds_label_every_model_token_and_no_environment_token(tokenizer, kinds):
    t = search_and_answer(tokenizer).end(FinishReason.ANSWER)
    labels = kinds.of(t)
    assert [label is None for label in labels] == [keep == 0 for keep in t.env_mask]
    first = t.segments[0]
    think = tokenizer.encode("<think> I should look it up </think>", add_special_tokens=False)
    assert labels[first.start : first.start + len(think)] == ["think"] * len(think)


def test_text_outside_complete_blocks_is_other(tokenizer, kinds):
    # A think block cut by the length cap never closes: its tokens are no think block.
    t = Built(tokenizer).model(("<think> and so on and so on", 0.7)).end(FinishReason.LENGTH)
    values = signals([t], ["x"], kinds)
    assert values["health/entropy/other"] == pytest.approx(0.7)
    assert "health/entropy/think" not in values


def test_tags_inside_model_written_documents_are_no_blocks(tokenizer, kinds):
    t = (
        Built(tokenizer)
        .model(("<documents> <answer> x </answer> </documents>", 0.4))
        .end(FinishReason.NO_ACTION)
    )
    values = signals([t], ["x"], kinds)
    assert "health/entropy/answer" not in values and values["health/entropy/other"] == pytest.approx(0.4)


def test_engine_without_entropies_logs_no_entropy(tokenizer, kinds):
    # vLLM gives no whole-distribution entropy: every entropy is NaN and no entropy signal appears.
    t = search_and_answer(tokenizer).end(FinishReason.ANSWER)
    t.entropies = [math.nan] * len(t.completion_ids)
    values = signals([t], ["x"], kinds)
    assert not [k for k in values if k.startswith("health/entropy/")]
    assert values["rollout/searches"] == 1


def test_rollout_signals_over_a_batch(tokenizer, kinds):
    answered = search_and_answer(tokenizer).end(FinishReason.ANSWER)  # 2 turns, 1 search
    corrected = (
        Built(tokenizer)
        .model(("<search>   </search>", 1.0))
        .insert("feedback", protocol.CORRECTION_MESSAGE)
        .model(("<search> Bigu </search>", 1.0))
        .insert("documents", DOCS, query="Bigu")
        .model(("<search>  bigu </search>", 1.0))
        .insert("documents", DOCS, query="bigu")
        .model(("<answer> Pemere or Tewick </answer>", 1.0))
        .end(FinishReason.ANSWER)
    )  # 4 turns, 1 corrective message, 2 searches of which the second repeats the first
    capped = Built(tokenizer).model(("<think> and on", 1.0)).end(FinishReason.LENGTH)  # 1 turn, no answer
    values = signals([answered, corrected, capped], ["nq-7", "hotpotqa-3", "nq-9"], kinds)
    assert values["health/corrective_rate"] == pytest.approx(1 / 7)  # corrective messages / model turns
    assert values["health/repeated_queries"] == pytest.approx(1 / 3)
    assert values["health/searches/nq"] == pytest.approx((1 + 0) / 2)
    assert values["health/searches/hotpotqa"] == pytest.approx(2.0)
    assert values["rollout/searches"] == pytest.approx(3 / 3)
    assert values["rollout/turns"] == pytest.approx((2 + 4 + 1) / 3)
    assert values["health/answer_words"] == pytest.approx((1 + 3) / 2)  # only trajectories with an answer
    assert values["rollout/finish_answer"] == pytest.approx(2 / 3)
    assert values["rollout/finish_length"] == pytest.approx(1 / 3)
    assert values["rollout/finish_no_action"] == 0 and values["rollout/finish_max_turns"] == 0


def test_tallies_of_processes_add_up_to_the_whole_batch(tokenizer, kinds):
    a = search_and_answer(tokenizer).end(FinishReason.ANSWER)
    b = Built(tokenizer).model(("<answer> Tewick </answer>", 0.9)).end(FinishReason.ANSWER)
    c = Built(tokenizer).model(("<think> hm </think>", 0.1)).end(FinishReason.NO_ACTION)
    whole = trajectory_tally([a, b, c], ["nq-1", "nq-2", "tq-3"], kinds)
    parts = merge_tallies(
        [trajectory_tally([a], ["nq-1"], kinds), trajectory_tally([b, c], ["nq-2", "tq-3"], kinds)]
    )
    assert means(parts) == pytest.approx(means(whole))


def test_question_source_is_the_id_prefix():
    assert question_source("nq-123") == "nq"
    assert question_source("hotpotqa-5a8b-x") == "hotpotqa"
    assert question_source("123") == "unprefixed"
    assert question_source("-3") == "unprefixed"


def test_flat_groups_are_those_with_all_equal_rewards():
    rewards = [1.0, 0.0, 1.0, 1.0, 0.1, 0.1, 0.1, 0.1, 0.0, 0.0, 0.0, 0.0]
    assert flat_groups(rewards, 4) == [False, True, True]
    with pytest.raises(ValueError, match="do not split into groups of 5"):
        flat_groups(rewards, 5)


# --- on the real TRL trainer ----------------------------------------------------------------------------


def test_health_signals_are_logged_every_step(synthetic_bm25_server, tmp_path):
    from autorefine.training.grpo.trainer import build_trainer
    from tests.helpers import tiny_grpo_config as tiny_config

    config = tiny_config(
        synthetic_bm25_server,
        tmp_path,
        "trainer.max_steps=2",
        "trainer.beta=0.01",  # TRL logs kl only with a KL term
        "heldout.every=1",
        "heldout.limit=16",
        "heldout.save_best=false",
        "trainer.seed=2",
    )
    trainer, _ = build_trainer(config)
    trainer.train()
    steps = [h for h in trainer.state.log_history if "loss" in h]
    heldout = {r["step"]: r for r in map(json.loads, (tmp_path / "heldout.jsonl").read_text().splitlines())}
    assert len(steps) == 2
    for h in steps:
        for key in (
            "health/entropy/model", "health/entropy/think", "health/entropy/search", "health/entropy/answer",
            "health/corrective_rate", "health/repeated_queries", "health/searches/synthetic",
            "health/flat_groups", "health/answer_words", "health/reward_gap",
            "rollout/finish_length", "rollout/finish_no_action", "rollout/finish_max_turns",
            "kl", "clip_ratio/region_mean", "entropy",
        ):  # fmt: skip
            assert key in h, f"{key} missing at step {h['step']}"
        # the engine's sampling-time entropy is the one TRL's training forward computes (same policy)
        assert h["health/entropy/model"] == pytest.approx(h["entropy"], abs=2e-3)
        assert h["health/flat_groups"] == pytest.approx(h["frac_reward_zero_std"])
        assert h["health/reward_gap"] == pytest.approx(h["reward"] - heldout[h["step"]]["em"], abs=1e-6)
