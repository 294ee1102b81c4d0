"""IP-DPO pair building: typed negatives on scripted trajectories (real agent loop, BM25, scores), ties,
thresholds, the outcome-only ablation, pair files made anywhere, and `autorefine build-pairs`."""

from __future__ import annotations

import json

import pytest

from autorefine.cli import main
from autorefine.data import Question
from autorefine.modeling import load_tokenizer
from autorefine.protocol import PromptTemplate
from autorefine.retrieval import RetrieverClient
from autorefine.rollout import AgentLoop, RolloutSettings, SamplingParams
from autorefine.scoring.process import LexicalMatcher
from autorefine.scoring.trajectory import score_trajectories
from autorefine.training.ipdpo.pairs import (
    ALL_TIED,
    NO_NEGATIVE,
    NO_SAMPLE_CLEARS,
    PairError,
    PairSettings,
    build_pairs,
    read_pairs,
    select_pairs,
    too_few_pairs_message,
)
from autorefine.training.ipdpo.sampling import sample_row, trajectory_from_row
from tests.helpers import SYNTHETIC_DIR, ScriptedEngine, Turn

QUESTION = Question("synthetic-1", "What is the home city of Bigu Boslar?", ["Tewick"])
SEARCH = "<think> I will search for the missing facts. </think>\n<search> What is the home city of Bigu Boslar? </search>"
ANSWER = "<refine> The home city of Bigu Boslar is Tewick. </refine>\n<answer> Tewick </answer>"
SCRIPTS = {
    "best": [Turn(SEARCH), Turn(ANSWER)],
    "same_as_best": [Turn(SEARCH), Turn(ANSWER)],
    "two_searches": [
        Turn(SEARCH),
        Turn("<refine> Bigu Boslar is a person. </refine>\n<search> Bigu Boslar home city </search>"),
        Turn(ANSWER),
    ],
    "wrong": [Turn(SEARCH), Turn("<refine> The home city is Pemere. </refine>\n<answer> Pemere </answer>")],
    "malformed": [Turn("<answer> Tewick </answer>")],  # right answer, but no think, no search
}


def play(url: str, script: list[Turn]):
    """One trajectory of a scripted policy through the real agent loop and retriever."""
    tokenizer = load_tokenizer(SYNTHETIC_DIR / "tokenizer")
    template = PromptTemplate.load(SYNTHETIC_DIR / "template.txt")
    config = RolloutSettings(max_turns=2, max_new_tokens=48, max_obs_tokens=160, max_completion_tokens=320)
    with RetrieverClient(url) as client:
        probe = AgentLoop(ScriptedEngine(tokenizer, {}), client, config, template)
        prompt = tuple(probe.prompt_ids(QUESTION.question))
        loop = AgentLoop(ScriptedEngine(tokenizer, {prompt: script}), client, config, template)
        [trajectory] = loop.run([QUESTION.question], SamplingParams(temperature=0))
    return trajectory


@pytest.fixture(scope="module")
def scripted_rows(synthetic_bm25_server):
    """Sample rows of five scripted trajectories of one question, scored by the process score."""
    names = list(SCRIPTS)
    trajectories = [play(synthetic_bm25_server, SCRIPTS[n]) for n in names]
    scores = score_trajectories(trajectories, [QUESTION] * len(names), LexicalMatcher())
    return {
        name: sample_row(QUESTION, i, t, s.as_dict(), round_index=1)
        for i, (name, t, s) in enumerate(zip(names, trajectories, scores, strict=True))
    }


def test_scripted_samples_give_every_negative_type(scripted_rows):
    rows = scripted_rows
    assert (
        rows["best"]["scores"]["process"] > rows["two_searches"]["scores"]["process"]
    )  # repeat search costs
    assert rows["malformed"]["scores"]["format"] == 0 and rows["malformed"]["scores"]["outcome"] == 1
    settings = PairSettings(max_pairs_per_question=3)
    pairs, stats = build_pairs(list(rows.values()), settings)

    assert stats.questions == 1 and stats.samples == 5 and stats.pairs == 3
    assert [p["type"] for p in pairs] == ["weaker", "wrong", "malformed"]
    expected = {"weaker": "two_searches", "wrong": "wrong", "malformed": "malformed"}
    for pair in pairs:
        assert pair["chosen"]["sample"] == rows["best"]["sample"], "the first of the tied best samples"
        rejected = rows[expected[pair["type"]]]
        # exact sampled ids and masks, never re-tokenized text
        for key in ("prompt_ids", "completion_ids", "env_mask"):
            assert pair["rejected"][key] == rejected[key]
            assert pair["chosen"][key] == rows["best"][key]
    assert stats.chosen["steps"] == 1 and stats.rejected["steps"] == 1  # 2, 1 and 0 searches
    assert dict(stats.by_type) == {"weaker": 1, "wrong": 1, "malformed": 1}


def test_a_sample_row_rebuilds_its_trajectory(scripted_rows):
    row = scripted_rows["two_searches"]
    trajectory = trajectory_from_row(json.loads(json.dumps(row)))
    assert trajectory.num_searches == 2 and trajectory.answer == "Tewick"
    assert [s.query for s in trajectory.steps] == row["queries"]
    [again] = score_trajectories([trajectory], [QUESTION], LexicalMatcher())
    assert again.as_dict() == row["scores"]


def test_one_pair_per_question_takes_the_first_negative_type(scripted_rows):
    rows = list(scripted_rows.values())
    [pair], _ = build_pairs(rows, PairSettings(max_pairs_per_question=1))
    assert pair["type"] == "weaker"
    [pair], _ = build_pairs(
        rows, PairSettings(max_pairs_per_question=1, negative_types=["malformed", "wrong"])
    )
    assert pair["type"] == "malformed"


def test_outcome_only_ranking_never_pairs_two_correct_samples(scripted_rows):
    """The ablation without the process score: a correct sample with more searches ties with the best."""
    settings = PairSettings(ranking=["format", "outcome"], max_pairs_per_question=3)
    pairs, _ = build_pairs(list(scripted_rows.values()), settings)
    assert sorted(p["type"] for p in pairs) == ["malformed", "wrong"]


def scores(format=1.0, outcome=1.0, process=1.0, tokens=40, **extra):
    return {"format": format, "outcome": outcome, "process": process, "model_tokens": tokens, **extra}


@pytest.mark.parametrize(
    ("samples", "settings", "chosen", "rejected", "skipped"),
    [
        pytest.param(
            [scores(outcome=0.4), scores(outcome=0.0), scores(format=0.0)],
            PairSettings(),
            None, [], NO_SAMPLE_CLEARS, id="nothing-clears-min-outcome",
        ),
        pytest.param(
            [scores(outcome=1.0, process=0.3), scores(outcome=0.6, process=0.9), scores(outcome=0.0)],
            PairSettings(min_process=0.5),
            1, [(2, "wrong")], None, id="best-outcome-under-min-process-is-not-chosen",
        ),
        pytest.param(
            [scores(), scores(), scores()],
            PairSettings(),
            0, [], ALL_TIED, id="all-tied",
        ),
        pytest.param(
            [scores(process=1.0), scores(process=0.95), scores(process=0.95, tokens=90)],
            PairSettings(min_process_gap=0.1),
            0, [], NO_NEGATIVE, id="correct-negatives-within-the-process-gap",
        ),
        pytest.param(
            [scores(tokens=60), scores(tokens=30), scores(outcome=0.0, tokens=10)],
            PairSettings(),
            1, [(2, "wrong")], None, id="fewer-tokens-break-ties-but-are-no-negative-alone",
        ),
        pytest.param(
            [scores(outcome=0.0), scores(format=0.0, outcome=0.0), scores(outcome=0.0, process=0.0), scores()],
            PairSettings(max_pairs_per_question=2),
            3, [(2, "wrong"), (1, "malformed")], None, id="round-robin-worst-first",
        ),
        pytest.param(
            [scores(outcome=0.5), scores(outcome=0.0)],
            PairSettings(min_outcome=0.5),
            0, [(1, "wrong")], None, id="threshold-is-inclusive",
        ),
    ],
)  # fmt: skip
def test_selection_on_hand_scores(samples, settings, chosen, rejected, skipped):
    selection = select_pairs(samples, settings)
    assert (selection.chosen, selection.rejected, selection.skipped) == (chosen, rejected, skipped)


def test_identical_samples_count_once():
    samples = [scores(), scores(outcome=0.0), scores(outcome=0.0), scores()]
    completions = [[1, 2], [3], [3], [1, 2]]
    selection = select_pairs(samples, PairSettings(max_pairs_per_question=3), completions)
    assert selection.rejected == [(1, "wrong")]
    # a lower-ranked sample identical to the chosen one is a tie, not a negative
    selection = select_pairs([scores(), scores(tokens=99)], PairSettings(), [[1, 2], [1, 2]])
    assert selection.skipped == ALL_TIED


def test_too_few_pairs_message_says_why():
    rows = []
    for q in range(3):
        for s in range(4):
            rows.append({"id": f"q{q}", "scores": scores(outcome=0.0), "completion_ids": [q, s]})
    _, stats = build_pairs(rows, PairSettings())
    message = too_few_pairs_message(stats, PairSettings(min_pairs=5), "round 2")
    assert "round 2: 0 pairs from 3 questions" in message
    assert "3 questions had no sample clearing the thresholds (format ≥ 1, outcome ≥ 0.5" in message
    assert "too weak" in message


# --- pair files made anywhere ------------------------------------------------------------------------------


def good_pair(**changes):
    side = {"prompt_ids": [5, 6, 7], "completion_ids": [8, 9, 10, 11], "env_mask": [1, 0, 0, 1]}
    pair = {
        "id": "q1",
        "type": "wrong",
        "chosen": dict(side),
        "rejected": {**side, "completion_ids": [8, 9, 10, 12]},
    }
    for path, value in changes.items():
        side_name, _, key = path.partition(".")
        if key:
            pair[side_name][key] = value
        elif value is None:
            pair.pop(side_name)
        else:
            pair[side_name] = value
    return json.dumps(pair)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("", "holds no pairs", id="empty"),
        pytest.param("\n\n", "holds no pairs", id="blank-lines"),
        pytest.param(good_pair() + "\n{not json", ":2: not valid JSON", id="corrupt-line"),
        pytest.param("[1, 2]", ":1: expected a JSON object", id="not-an-object"),
        pytest.param(good_pair(rejected=None), "(id q1): missing 'rejected'", id="missing-side"),
        pytest.param(
            good_pair(**{"rejected.prompt_ids": [5, 6, 99]}),
            "(id q1): chosen and rejected start from different prompts (first difference at prompt token 2)",
            id="prompt-differs",
        ),
        pytest.param(
            good_pair(**{"chosen.env_mask": [1, 0, 1]}),
            "'chosen.env_mask' has 3 entries for 4 completion ids",
            id="mask-length",
        ),
        pytest.param(
            good_pair(**{"rejected.env_mask": [0, 0, 0, 0]}),
            "'rejected.env_mask' marks no model token",
            id="no-model-token",
        ),
        pytest.param(
            good_pair(**{"chosen.env_mask": [1, 2, 0, 1]}),
            "may hold only 0 (environment) and 1 (model)",
            id="mask-values",
        ),
        pytest.param(
            good_pair(**{"chosen.completion_ids": [8, "9", 10, 11]}),
            "'chosen.completion_ids' must be a list of integers",
            id="ids-not-integers",
        ),
        pytest.param(
            good_pair(**{"rejected.completion_ids": [8, 9, 10, 11]}),
            "chosen and rejected are the same trajectory",
            id="identical",
        ),
    ],
)
def test_bad_pair_files_name_the_file_line_and_id(tmp_path, text, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text(text)
    with pytest.raises(PairError) as err:
        list(read_pairs(path))
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_a_good_pair_file_reads(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(good_pair() + "\n" + good_pair(**{"rejected.env_mask": [1, 1, 1, 1]}) + "\n")
    assert len(list(read_pairs(path))) == 2


# --- `autorefine build-pairs` ----------------------------------------------------------------------------


def test_build_pairs_rebuilds_from_a_samples_file(scripted_rows, tmp_path, capsys):
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(r) + "\n" for r in scripted_rows.values()))
    questions = tmp_path / "questions.jsonl"
    questions.write_text(json.dumps(QUESTION.to_row()) + "\n")
    out = tmp_path / "strict.jsonl"
    code = main(
        ["build-pairs", "--samples", str(samples), "--out", str(out), "pairs.max_pairs_per_question=3"]
    )
    assert code == 0
    assert [json.loads(line)["type"] for line in out.read_text().splitlines()] == [
        "weaker",
        "wrong",
        "malformed",
    ]
    assert "3 pairs from 1 questions (5 samples)" in capsys.readouterr().out
    stats = json.loads((tmp_path / "strict.stats.json").read_text())
    assert stats["settings"]["max_pairs_per_question"] == 3 and stats["stats"]["pairs"] == 3

    # other thresholds: nothing is good enough, so no pair (and the reason is counted)
    out = tmp_path / "none.jsonl"
    assert main(["build-pairs", "--samples", str(samples), "--out", str(out), "pairs.min_outcome=1.5"]) == 0
    assert out.read_text() == ""
    stats = json.loads((tmp_path / "none.stats.json").read_text())["stats"]
    assert stats["skipped"][NO_SAMPLE_CLEARS] == 1

    # re-scored from the trajectories themselves: the same scores, hence the same pairs
    out = tmp_path / "rescored.jsonl"
    args = ["--rescore", "--questions", str(questions), "pairs.max_pairs_per_question=3"]
    assert main(["build-pairs", "--samples", str(samples), "--out", str(out), *args]) == 0
    assert out.read_text() == (tmp_path / "strict.jsonl").read_text()


def test_build_pairs_refuses_a_broken_samples_file(tmp_path, capsys):
    samples = tmp_path / "samples.jsonl"
    samples.write_text('{"id": "q1", "completion_ids": [1]}\n')
    assert main(["build-pairs", "--samples", str(samples), "--out", str(tmp_path / "p.jsonl")]) == 2
    assert f"{samples}:1: not a sample row" in capsys.readouterr().err
    assert (
        main(["build-pairs", "--samples", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x")]) == 2
    )
    assert "samples file not found" in capsys.readouterr().err
