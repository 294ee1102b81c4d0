"""Rewards read what the agent loop accepted, turn by turn: no tag may span an inserted block.

Table-driven over every kind of insertion (documents, corrective message, EOS), on hand-built trajectories
and through the real agent loop with a scripted engine.
"""

from __future__ import annotations

import pytest

from autorefine import protocol
from autorefine.modeling import load_tokenizer
from autorefine.rollout import AgentLoop, FinishReason, RolloutSettings, SamplingParams
from autorefine.rollout.trajectory import Segment, Trajectory
from autorefine.scoring.reward import RewardSettings, score_model_text, trajectory_reward
from tests.helpers import QWEN_TOKENIZER, ScriptedEngine, Turn

DOCS = "\n\n<documents>\nDoc 1(Title: Paris) Paris is the capital of France.\n</documents>\n\n"
INSERTS = {"documents": DOCS, "feedback": protocol.CORRECTION_MESSAGE, "eos": "<|endoftext|>"}


def built(*parts: tuple[str, str]) -> Trajectory:
    """A trajectory from (kind, text) parts, one token per part."""
    t = Trajectory(prompt_ids=[0])
    for i, (kind, text) in enumerate(parts):
        t.segments.append(Segment(kind, text, i, i + 1))
        t.completion_ids.append(i)
        t.env_mask.append(int(kind == "model"))
    t.queries = ["q"] * sum(kind == "documents" for kind, _ in parts)
    return t


# (id, trajectory parts, expected accepted answer, expected refines, expected reward for gold "Paris is big")
CASES = [
    *(
        pytest.param(
            [("model", "<think> t </think><answer> Paris "), (kind, INSERTS[kind]), ("model", "is big </answer>")],
            None, [], 0.0, id=f"answer-spans-{kind}",
        )
        for kind in INSERTS
    ),
    *(
        pytest.param(
            [("model", "<think> t </think><refine> Paris"), (kind, INSERTS[kind]),
             ("model", "is big </refine><answer> Lyon </answer>")],
            "Lyon", [], 0.0, id=f"refine-spans-{kind}",
        )
        for kind in INSERTS
    ),
    pytest.param(
        [("model", "<think> t </think> <documents> fake"), ("feedback", protocol.CORRECTION_MESSAGE),
         ("model", "<answer> Paris is big </answer>")],
        "Paris is big", [], 1.0, id="unclosed-model-documents-keeps-later-answer",
    ),
    pytest.param(
        [("model", "<think> t </think><search> q </search>"), ("documents", DOCS),
         ("model", "<refine> Paris is big </refine><answer> Lyon </answer>")],
        "Lyon", ["Paris is big"], 0.1, id="refine-bonus-within-one-turn",
    ),
    pytest.param(
        [("model", "<think> t </think><search> q </search>"),
         ("documents", "<documents> <answer> Paris is big </answer> <refine> Paris is big </refine> </documents>"),
         ("model", "<answer> Lyon </answer>")],
        "Lyon", [], 0.0, id="tags-inside-documents-count-for-nothing",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("parts", "answer", "refines", "reward"), CASES)
def test_rewards_score_only_blocks_within_one_turn(parts, answer, refines, reward):
    t = built(*parts)
    assert t.answer == answer
    assert t.refine_texts == refines
    assert trajectory_reward(t, ["Paris is big"], RewardSettings()).reward == pytest.approx(reward)


def test_the_concatenated_model_text_would_have_been_fooled():
    # The control: reading the joined model text (today's defect) gives these cases the wrong score.
    spans = built(("model", "<think> t </think><answer> Paris "), ("feedback", protocol.CORRECTION_MESSAGE),
                  ("model", "is big </answer>"))  # fmt: skip
    assert score_model_text(spans.model_text, ["Paris is big"]).reward == 1.0
    erased = built(("model", "<think> t </think> <documents> fake"), ("feedback", protocol.CORRECTION_MESSAGE),
                   ("model", "<answer> Paris is big </answer>"))  # fmt: skip
    assert score_model_text(erased.model_text, ["Paris is big"]).reward == 0.0


def test_format_is_read_turn_by_turn():
    good = built(("model", "<think> t </think><search> q </search>"), ("documents", DOCS),
                 ("model", "<refine> r </refine><answer> a </answer>"))  # fmt: skip
    assert trajectory_reward(good, ["a"]).format == 1.0
    # a think block opened before the documents and closed after them is no block
    split = built(("model", "<think> t <search> q </search>"), ("documents", DOCS),
                  ("model", "</think><refine> r </refine><answer> a </answer>"))  # fmt: skip
    assert trajectory_reward(split, ["a"]).format == 0.0


def test_search_steps_pair_queries_documents_and_the_refines_after_them():
    t = built(("model", "<think> t </think><search> first </search>"), ("documents", DOCS),
              ("model", "<refine> r1 </refine><search> second </search>"), ("documents", "D2"),
              ("model", "no action"), ("feedback", protocol.CORRECTION_MESSAGE),
              ("model", "<refine> r2 </refine><answer> a </answer>"))  # fmt: skip
    t.queries = ["first", "second"]
    steps = t.steps
    assert [(s.query, s.documents, s.refines) for s in steps] == [
        ("first", DOCS, ("r1",)),
        ("second", "D2", ("r2",)),
    ]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(QWEN_TOKENIZER)


class NoSearch:
    def search(self, queries, topk=3):
        raise AssertionError("no search expected")


def test_agent_loop_answer_cut_by_the_token_budget_is_not_completed_by_the_next_turn(tokenizer):
    config = RolloutSettings(max_turns=1, max_new_tokens=6, max_completion_tokens=400)
    loop0 = AgentLoop(ScriptedEngine(tokenizer, {}), NoSearch(), config)
    prompt = loop0.prompt_ids("q")
    # turn 1 runs out of tokens inside the answer; after the corrective message, turn 2 closes the tag
    engine = ScriptedEngine(
        tokenizer, {tuple(prompt): [Turn("<answer> Paris is big and old"), Turn("</answer>")]}
    )
    [t] = AgentLoop(engine, NoSearch(), config).run_prompt_ids([prompt], SamplingParams())
    assert [s.kind for s in t.segments] == ["model", "feedback", "model", "eos"]
    assert t.finish_reason == FinishReason.NO_ACTION
    assert t.answer is None
    assert trajectory_reward(t, ["Paris is"]).reward == 0.0
    assert score_model_text(t.model_text, ["Paris is big and old"]).has_answer == 1.0  # the joined text would
