"""Answer metrics and the AutoRefine reward, table-driven with hand-computed expectations."""

from __future__ import annotations

import pytest

from autorefine.rollout.trajectory import Segment, Trajectory
from autorefine.scoring.answers import cover_exact_match, exact_match, f1_score, normalize_answer, refine_hit
from autorefine.scoring.reward import RewardBreakdown, RewardSettings, follows_format, score_model_text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("The Eiffel Tower!", "eiffel tower", id="article-and-punctuation"),
        pytest.param("Theater", "theater", id="the-inside-word-kept"),
        pytest.param("anthem", "anthem", id="an-inside-word-kept"),
        pytest.param("an apple a day", "apple day", id="a-and-an"),
        pytest.param("THE", "", id="only-article"),
        pytest.param("the-the", "thethe", id="punctuation-removed-before-articles"),
        pytest.param("U.S.A.", "usa", id="dots"),
        pytest.param("rock & roll", "rock roll", id="ampersand"),
        pytest.param("snake_case", "snakecase", id="underscore-is-punctuation"),
        pytest.param("  many   spaces\n\there ", "many spaces here", id="whitespace"),
        pytest.param("Café", "café", id="accent-kept"),
        pytest.param("Ångström's law", "ångströms law", id="unicode-lowercase"),
        pytest.param("“quoted” – dash", "“quoted” – dash", id="non-ascii-punctuation-kept"),
        pytest.param("Plan 9", "plan 9", id="digits-kept"),
        pytest.param("", "", id="empty"),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    ("pred", "golds", "expected"),
    [
        pytest.param("Paris", "paris", 1.0, id="case"),
        pytest.param("The Paris!", ["London", "paris"], 1.0, id="any-gold"),
        pytest.param("Café", "cafe", 0.0, id="accent-differs"),
        pytest.param("café", "CAFÉ", 1.0, id="accent-same"),
        pytest.param("Paris France", "Paris", 0.0, id="superset-is-not-equal"),
        pytest.param(None, "Paris", 0.0, id="no-answer"),
        pytest.param("", "the", 0.0, id="empty-gold-never-matches-empty-pred"),
        pytest.param("The", "a", 0.0, id="article-only-both"),
        pytest.param("Paris", [], 0.0, id="no-golds"),
    ],
)
def test_exact_match(pred: str | None, golds, expected: float) -> None:
    assert exact_match(pred, golds) == expected


@pytest.mark.parametrize(
    ("pred", "golds", "expected"),
    [
        pytest.param("Paris", "Paris", 1.0, id="equal"),
        # "city of paris" vs "paris": overlap 1; P = 1/3, R = 1/1; F1 = 2*(1/3)*1 / (1/3 + 1) = 0.5
        pytest.param("the city of Paris", "Paris", 0.5, id="partial-precision"),
        # "barack obama" vs "barack hussein obama": overlap 2; P = 2/2, R = 2/3; F1 = 2*(2/3) / (5/3) = 0.8
        pytest.param("Barack Obama", "Barack Hussein Obama", 0.8, id="partial-recall"),
        # "st louis" vs "saint louis": overlap 1; P = 1/2, R = 1/2; F1 = 0.5
        pytest.param("St. Louis", "Saint Louis", 0.5, id="half-half"),
        # tokens counted with multiplicity: "new york new york" vs "new york": overlap min(2,1)+min(2,1) = 2;
        # P = 2/4, R = 2/2; F1 = 2*0.5*1 / 1.5 = 2/3
        pytest.param("new york new york", "New York", 2 / 3, id="repeated-tokens"),
        # shared tokens counted with multiplicity: "paris paris" vs "paris paris france": overlap min(2,2) = 2;
        # P = 2/2, R = 2/3; F1 = 2*(2/3) / (5/3) = 0.8 (counting distinct tokens would give 0.4)
        pytest.param("Paris Paris", "Paris Paris France", 0.8, id="overlap-multiplicity"),
        # max over golds: vs "obama": P = 1/2, R = 1 -> 2/3; vs "barack hussein obama": 0.8 -> 0.8
        pytest.param("Barack Obama", ["Obama", "Barack Hussein Obama"], 0.8, id="max-over-golds"),
        pytest.param("Paris, France.", "paris france", 1.0, id="punctuation"),
        pytest.param("Café", "cafe", 0.0, id="accent-differs"),
        pytest.param("yes", "yes sir", 0.0, id="yes-vs-yes-sir"),
        # without the special case this would be P = 1/2, R = 1 -> 2/3
        pytest.param("yes indeed", "yes", 0.0, id="yes-gold-vs-longer"),
        pytest.param("no", "no", 1.0, id="no-vs-no"),
        pytest.param("No.", "NO", 1.0, id="no-normalized"),
        pytest.param("the yes", "yes", 1.0, id="yes-after-article"),
        pytest.param("yes", "no", 0.0, id="yes-vs-no"),
        pytest.param("noanswer", "noanswer", 1.0, id="noanswer"),
        # neither side normalizes exactly to a special answer, so plain F1: overlap 1; P = 1/2, R = 1 -> 2/3
        pytest.param("noanswer please", "please", 2 / 3, id="noanswer-inside-longer-is-plain-f1"),
        pytest.param("please", "noanswer please", 2 / 3, id="noanswer-inside-longer-gold-is-plain-f1"),
        pytest.param("", "Paris", 0.0, id="empty-pred"),
        pytest.param("the", "the", 0.0, id="both-normalize-empty"),
        pytest.param(None, "Paris", 0.0, id="no-answer"),
        pytest.param("Paris", [], 0.0, id="no-golds"),
    ],
)
def test_f1_score(pred: str | None, golds, expected: float) -> None:
    assert f1_score(pred, golds) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("pred", "golds", "expected"),
    [
        pytest.param("It is Paris, France", "paris", 1.0, id="gold-inside"),
        pytest.param("Parisian", "paris", 1.0, id="character-substring"),
        pytest.param("London", ["Paris", "london!"], 1.0, id="any-gold"),
        pytest.param("paris", "Paris France", 0.0, id="pred-inside-gold-is-not-cover"),
        pytest.param("Cafe", "Café", 0.0, id="accent-differs"),
        pytest.param("Paris", "the", 0.0, id="empty-gold-never-covers"),
        pytest.param("the", "a", 0.0, id="both-empty"),
        pytest.param(None, "Paris", 0.0, id="no-answer"),
    ],
)
def test_cover_exact_match(pred: str | None, golds, expected: float) -> None:
    assert cover_exact_match(pred, golds) == expected


@pytest.mark.parametrize(
    ("refines", "golds", "expected"),
    [
        pytest.param(["Paris is the capital of France."], "paris", 1.0, id="hit"),
        pytest.param(["Eiffel", "Tower"], "Eiffel Tower", 1.0, id="across-blocks-joined-by-space"),
        pytest.param(["Par", "is"], "Paris", 0.0, id="blocks-not-glued"),
        pytest.param(["London"], ["Paris", "london"], 1.0, id="any-gold"),
        pytest.param([], "Paris", 0.0, id="no-refine"),
        pytest.param(["the theater"], "the", 0.0, id="empty-gold-never-hits"),
        pytest.param(["Café"], "cafe", 0.0, id="accent-differs"),
        pytest.param(["Lyon"], "Paris", 0.0, id="miss"),
    ],
)
def test_refine_hit(refines: list[str], golds, expected: float) -> None:
    assert refine_hit(refines, golds) == expected


THINK = "<think>reason</think>"
SEARCH = "<search>capital of France</search>"
REFINE = "<refine>Paris is the capital of France.</refine>"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(THINK + "<answer>Paris</answer>", True, id="think-answer"),
        pytest.param(THINK + SEARCH + REFINE + "<answer>Paris</answer>", True, id="one-search"),
        pytest.param(
            THINK + SEARCH + REFINE + SEARCH + REFINE + "<answer>P</answer>", True, id="two-searches"
        ),
        pytest.param(
            THINK + SEARCH + "<documents>Doc 1(Title: P) p</documents>" + REFINE + "<answer>P</answer>",
            True,
            id="documents-between",
        ),
        pytest.param(SEARCH + REFINE + "<answer>Paris</answer>", False, id="missing-think"),
        pytest.param(THINK + SEARCH + "<answer>Paris</answer>", False, id="search-without-refine"),
        pytest.param(THINK + SEARCH + SEARCH + REFINE + "<answer>P</answer>", False, id="search-search"),
        pytest.param(
            THINK + SEARCH + "<documents><refine>r</refine></documents><answer>P</answer>",
            False,
            id="refine-only-in-documents",
        ),
        pytest.param(THINK + "<answer>London</answer><answer>Paris</answer>", False, id="two-answers"),
        pytest.param(THINK + SEARCH + REFINE, False, id="no-answer"),
        pytest.param(
            THINK + "<documents><answer>Paris</answer></documents>", False, id="answer-only-in-documents"
        ),
        pytest.param(THINK + "<answer>Paris</answer>" + THINK, False, id="block-after-answer"),
        pytest.param(THINK + "<answer> </answer>", False, id="empty-answer"),
        pytest.param("", False, id="empty-text"),
    ],
)
def test_follows_format(text: str, expected: bool) -> None:
    assert follows_format(text) is expected


def _bd(reward, outcome, em, f1, cover_em, hit, has_answer, fmt) -> dict[str, float]:
    return {
        "reward": reward,
        "outcome": outcome,
        "em": em,
        "f1": f1,
        "cover_em": cover_em,
        "refine_hit": hit,
        "has_answer": has_answer,
        "format": fmt,
        "process_reward": 0.0,
    }


ZERO = _bd(0, 0, 0, 0, 0, 0, 0, 0)
F1 = RewardSettings()
EM = RewardSettings(outcome_metric="em")
COVER = RewardSettings(outcome_metric="cover_em")
FMT = RewardSettings(format_weight=0.5)
MISS = "<refine>Lyon is a city.</refine>"

# (id, model text, golds, config, expected breakdown)
SCORE_CASES = [
    ("correct", THINK + SEARCH + REFINE + "<answer>Paris</answer>", "Paris", F1, _bd(1, 1, 1, 1, 1, 1, 1, 1)),
    # f1("city of paris", "paris") = 0.5 (P = 1/3, R = 1); cover-EM 1 since "paris" is inside
    ("partial-f1", THINK + "<answer>the city of Paris</answer>", "Paris", F1, _bd(0.5, 0.5, 0, 0.5, 1, 0, 1, 1)),
    # f1 = 0.8 (P = 1, R = 2/3)
    ("f1-0.8", THINK + "<answer>Barack Obama</answer>", ["Barack Hussein Obama"], F1, _bd(0.8, 0.8, 0, 0.8, 0, 0, 1, 1)),
    ("wrong-with-refine-hit", THINK + SEARCH + REFINE + "<answer>London</answer>", "Paris", F1, _bd(0.1, 0, 0, 0, 0, 1, 1, 1)),
    ("wrong-no-hit", THINK + SEARCH + MISS + "<answer>London</answer>", "Paris", F1, _bd(0, 0, 0, 0, 0, 0, 1, 1)),
    ("no-answer-despite-hit", THINK + SEARCH + REFINE, "Paris", F1, _bd(0, 0, 0, 0, 0, 1, 0, 0)),
    ("empty-answer-despite-hit", THINK + SEARCH + REFINE + "<answer></answer>", "Paris", F1, _bd(0, 0, 0, 0, 0, 1, 0, 0)),
    ("whitespace-answer-despite-hit", THINK + REFINE + "<answer> \n </answer>", "Paris", F1, _bd(0, 0, 0, 0, 0, 1, 0, 0)),
    ("unclosed-answer", THINK + REFINE + "<answer>Paris", "Paris", F1, _bd(0, 0, 0, 0, 0, 1, 0, 0)),
    # F1 is the outcome even when a refine hit exists: 0.5, not 0.5 + 0.1
    ("partial-f1-no-bonus-added", THINK + SEARCH + REFINE + "<answer>the city of Paris</answer>", "Paris", F1, _bd(0.5, 0.5, 0, 0.5, 1, 1, 1, 1)),
    ("last-answer-wins-correct", THINK + "<answer>London</answer><answer>Paris</answer>", "Paris", F1, _bd(1, 1, 1, 1, 1, 0, 1, 0)),
    ("last-answer-wins-wrong", THINK + "<answer>Paris</answer><answer>London</answer>", "Paris", F1, _bd(0, 0, 0, 0, 0, 0, 1, 0)),
    ("max-over-golds", THINK + "<answer>Obama</answer>", ["Barack Obama", "Obama"], F1, _bd(1, 1, 1, 1, 1, 0, 1, 1)),
    ("unicode-accent-mismatch", THINK + "<answer>Café</answer>", "cafe", F1, _bd(0, 0, 0, 0, 0, 0, 1, 1)),
    ("unicode-accent-match", THINK + "<answer>CAFÉ!</answer>", "café", F1, _bd(1, 1, 1, 1, 1, 0, 1, 1)),
    ("punctuation-and-article", THINK + "<answer>The U.S.A.</answer>", "USA", F1, _bd(1, 1, 1, 1, 1, 0, 1, 1)),
    ("theater-keeps-the", THINK + "<answer>theater</answer>", "ater", F1, _bd(0, 0, 0, 0, 1, 0, 1, 1)),
    ("yes-vs-yes-sir", THINK + "<answer>yes</answer>", "yes sir", F1, _bd(0, 0, 0, 0, 0, 0, 1, 1)),
    ("no-vs-no", THINK + "<answer>No</answer>", "no", F1, _bd(1, 1, 1, 1, 1, 0, 1, 1)),
    ("upper-case-tags", "<THINK>t</THINK><ANSWER> Paris </ANSWER>", "Paris", F1, _bd(1, 1, 1, 1, 1, 0, 1, 1)),
    ("answer-in-model-written-documents", THINK + "<answer>London</answer><documents><answer>Paris</answer></documents>", "Paris", F1, _bd(0, 0, 0, 0, 0, 0, 1, 1)),
    # gold "the" normalizes to "": never a hit for any metric, not even against an answer "The"
    ("empty-gold", THINK + "<refine>the</refine><answer>The</answer>", "the", F1, _bd(0, 0, 0, 0, 0, 0, 1, 1)),
    ("empty-gold-em", THINK + "<refine>the</refine><answer>The</answer>", ["the", "a"], EM, _bd(0, 0, 0, 0, 0, 0, 1, 1)),
    # outcome metric EM: partial answer scores 0 -> refine bonus applies; F1 still reported
    ("em-partial-gets-bonus", THINK + SEARCH + REFINE + "<answer>the city of Paris</answer>", "Paris", EM, _bd(0.1, 0, 0, 0.5, 1, 1, 1, 1)),
    ("em-correct", THINK + "<answer>paris.</answer>", "Paris", EM, _bd(1, 1, 1, 1, 1, 0, 1, 1)),
    ("cover-em-partial-is-full", THINK + "<answer>the city of Paris</answer>", "Paris", COVER, _bd(1, 1, 0, 0.5, 1, 0, 1, 1)),
    ("cover-em-miss-gets-bonus", THINK + SEARCH + REFINE + "<answer>Lyon</answer>", "Paris", COVER, _bd(0.1, 0, 0, 0, 0, 1, 1, 1)),
    ("custom-bonus", THINK + SEARCH + REFINE + "<answer>London</answer>", "Paris", RewardSettings(refine_bonus=0.25), _bd(0.25, 0, 0, 0, 0, 1, 1, 1)),
    ("zero-bonus", THINK + SEARCH + REFINE + "<answer>London</answer>", "Paris", RewardSettings(refine_bonus=0.0), _bd(0, 0, 0, 0, 0, 1, 1, 1)),
    # format reward: reward + 0.5 * format
    ("format-on-correct", THINK + SEARCH + REFINE + "<answer>Paris</answer>", "Paris", FMT, _bd(1.5, 1, 1, 1, 1, 1, 1, 1)),
    ("format-on-partial", THINK + "<answer>Barack Obama</answer>", "Barack Hussein Obama", FMT, _bd(1.3, 0.8, 0, 0.8, 0, 0, 1, 1)),
    ("format-on-wrong", THINK + "<answer>London</answer>", "Paris", FMT, _bd(0.5, 0, 0, 0, 0, 0, 1, 1)),
    ("format-on-bad-format", SEARCH + REFINE + "<answer>Paris</answer>", "Paris", FMT, _bd(1, 1, 1, 1, 1, 1, 1, 0)),
    ("format-on-no-answer", THINK + SEARCH + REFINE, "Paris", FMT, _bd(0, 0, 0, 0, 0, 1, 0, 0)),
    ("format-off-search-without-refine", THINK + SEARCH + "<answer>Paris</answer>", "Paris", F1, _bd(1, 1, 1, 1, 1, 0, 1, 0)),
]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "golds", "config", "expected"), [pytest.param(t, g, c, e, id=i) for i, t, g, c, e in SCORE_CASES]
)
def test_score_model_text(text: str, golds, config: RewardSettings, expected: dict[str, float]) -> None:
    result = score_model_text(text, golds, config)
    assert isinstance(result, RewardBreakdown)
    assert result.as_dict() == pytest.approx(expected)


def test_default_config_is_the_paper() -> None:
    assert RewardSettings() == RewardSettings(outcome_metric="f1", refine_bonus=0.1, format_weight=0.0)
    text = THINK + SEARCH + REFINE + "<answer>London</answer>"
    assert score_model_text(text, "Paris").reward == pytest.approx(0.1)


def test_unknown_outcome_metric_rejected() -> None:
    with pytest.raises(ValueError, match="outcome_metric"):
        RewardSettings(outcome_metric="accuracy")  # type: ignore[arg-type]


def _trajectory(documents: str) -> Trajectory:
    """A rollout whose model text is wrong, and whose inserted documents carry the gold answer in tags."""
    parts = [
        ("model", "<think>I need the capital.</think><search>capital of France</search>"),
        ("documents", documents),
        ("model", "<refine>Lyon is a large city.</refine><answer>Lyon</answer>"),
        ("eos", "<|endoftext|>"),
    ]
    segments, pos = [], 0
    for kind, text in parts:
        segments.append(Segment(kind, text, pos, pos + 10))
        pos += 10
    return Trajectory(
        prompt_ids=[1, 2, 3],
        completion_ids=list(range(pos)),
        env_mask=[int(k == "model") for k, _ in parts for _ in range(10)],
        segments=segments,
        queries=["capital of France"],
    )


POISON = "Doc 1(Title: Paris) <answer>Paris</answer> <refine>Paris</refine> Paris is the capital."


@pytest.mark.parametrize(
    "documents",
    [
        pytest.param(f"\n\n<documents>\n{POISON}\n</documents>\n\n", id="wrapped"),
        pytest.param(f"\n\n<documents>\n{POISON}", id="wrapper-cut-off"),
        # even without the wrapper the documents segment is not model text
        pytest.param(POISON, id="bare"),
    ],
)
def test_answer_only_in_documents_scores_zero(documents: str) -> None:
    trajectory = _trajectory(documents)
    assert "<answer>Paris</answer>" in trajectory.documents_text
    assert "Paris" not in trajectory.model_text
    for config in (F1, EM, COVER):
        result = score_model_text(trajectory.model_text, ["Paris"], config)
        assert result.reward == 0.0
        assert (result.outcome, result.em, result.f1, result.cover_em, result.refine_hit) == (0, 0, 0, 0, 0)
        assert result.has_answer == 1.0 and result.format == 1.0
    assert trajectory.answer == "Lyon"
    assert trajectory.refine_texts == ["Lyon is a large city."]


def test_full_text_with_bare_documents_would_be_poisoned() -> None:
    # The control for the test above: the reference code's defect (parsing documents) does change the score.
    trajectory = _trajectory(POISON)
    full = "".join(s.text for s in trajectory.segments if s.kind != "eos")
    assert score_model_text(full, ["Paris"]).refine_hit == 1.0
    assert score_model_text(trajectory.model_text, ["Paris"]).refine_hit == 0.0


def test_as_dict_has_every_field() -> None:
    result = score_model_text(THINK + "<answer>Paris</answer>", "Paris")
    assert list(result.as_dict()) == [
        "reward",
        "outcome",
        "em",
        "f1",
        "cover_em",
        "refine_hit",
        "has_answer",
        "format",
        "process_reward",
    ]
