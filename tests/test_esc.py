"""Early-stopping self-consistency: stop rule, voting, batching, budget edge cases and the E[samples] model."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from autorefine.evaluation.esc import (
    ESCSettings,
    agreement_probability,
    expected_samples,
    expected_samples_from_distribution,
    run_esc,
    run_sc,
    summarize,
)


@dataclass(frozen=True)
class Trajectory:
    """A richer sample than ESC needs: it must come back untouched in the result."""

    answer: str | None
    question: int
    index: int


class ScriptedSampler:
    """Serves each question's answers in a fixed order and records every call."""

    def __init__(self, scripts: dict[int, Sequence[str | None]]) -> None:
        self.scripts = scripts
        self.served = dict.fromkeys(scripts, 0)
        self.calls: list[list[int]] = []

    def __call__(self, questions: list[int]) -> list[Trajectory]:
        self.calls.append(list(questions))
        out = []
        for q in questions:
            i = self.served[q]
            self.served[q] += 1
            out.append(Trajectory(self.scripts[q][i], q, i))
        return out


def esc(scripts: dict[int, Sequence[str | None]], window: int, max_samples: int):
    sampler = ScriptedSampler(scripts)
    results = run_esc(len(scripts), sampler, ESCSettings(window=window, max_samples=max_samples))
    return results, sampler


def test_agreement_in_first_window_stops_with_one_window() -> None:
    [r], sampler = esc({0: ["Paris"] * 5 + ["Lyon"] * 35}, window=5, max_samples=40)
    assert r.answer == "Paris"
    assert (r.samples_used, r.windows, r.stopped_early) == (5, 1, True)
    assert r.votes == {"paris": 5}
    assert sampler.calls == [[0] * 5]


def test_agreement_only_in_a_later_window() -> None:
    script = ["k", "k", "b", "k", "k", "b", "b", "k", "b", "b", "c", "c", "c", "c", "c"]
    [r], _ = esc({0: script + ["x"] * 25}, window=5, max_samples=40)
    assert r.answer == "c"
    assert (r.samples_used, r.windows, r.stopped_early) == (15, 3, True)
    assert r.votes == {"k": 5, "b": 5, "c": 5}


def test_samples_come_back_in_drawing_order() -> None:
    [r], _ = esc({0: ["x", "y", "x", "y", "z", "q", "q", "q"]}, window=2, max_samples=8)
    assert [s.index for s in r.samples] == list(range(r.samples_used))
    assert all(isinstance(s, Trajectory) and s.question == 0 for s in r.samples)
    assert r.samples_used == 8 and r.answer == "q"


def test_normalization_makes_surface_variants_agree_and_returns_original_text() -> None:
    [r], _ = esc({0: ["The Paris", "paris", "Paris.", "PARIS", "the  paris!"]}, window=5, max_samples=5)
    assert r.stopped_early
    assert r.answer == "The Paris"
    assert r.votes == {"paris": 5}


@pytest.mark.parametrize("invalid", [None, "", "?!.", "  ", "the"])
def test_an_invalid_answer_never_agrees(invalid: str | None) -> None:
    # Four valid answers agree; the fifth is invalid, so the window must not stop.
    script = ["x", "x", "x", "x", invalid, "y", "y", "y", "y", "y"]
    [r], _ = esc({0: script}, window=5, max_samples=10)
    assert r.answer == "y"
    assert (r.samples_used, r.windows, r.stopped_early) == (10, 2, True)
    assert r.votes == {"x": 4, "y": 5}


def test_invalid_answers_never_vote() -> None:
    # Invalid answers outnumber everything else, but only "z" votes.
    script = [None, "", "...", "z", None, "", None, "!!", "z", "the"]
    [r], _ = esc({0: script}, window=5, max_samples=10)
    assert r.answer == "z"
    assert r.votes == {"z": 2}
    assert not r.stopped_early


def test_a_window_of_identical_invalid_answers_does_not_stop() -> None:
    [r], _ = esc({0: [None] * 5 + ["?"] * 5}, window=5, max_samples=10)
    assert (r.samples_used, r.stopped_early) == (10, False)


def test_all_invalid_returns_none() -> None:
    # "a" and "the an" are articles only, so they normalize to the empty string like "." does.
    [r], _ = esc({0: [None, "", ".", "a", "the an"] * 4}, window=5, max_samples=20)
    assert r.answer is None
    assert r.votes == {}
    assert (r.samples_used, r.windows, r.stopped_early) == (20, 4, False)


def test_budget_exhausted_returns_majority() -> None:
    script = ["k", "b", "k", "c", "b", "k", "d", "k", "b", "c"]
    [r], _ = esc({0: script}, window=5, max_samples=10)
    assert r.answer == "k"
    assert (r.samples_used, r.windows, r.stopped_early) == (10, 2, False)
    assert r.votes == {"k": 4, "b": 3, "c": 2, "d": 1}


def test_tie_goes_to_the_answer_that_reached_the_top_count_first() -> None:
    # "k" appears first, but "b" reaches two votes first (index 2 vs index 3).
    [r], _ = esc({0: ["k", "b", "b", "k", "c", None]}, window=2, max_samples=6)
    assert r.votes == {"k": 2, "b": 2, "c": 1}
    assert r.answer == "b"
    assert not r.stopped_early


def test_tie_returns_original_text_of_first_sample_of_the_winner() -> None:
    [r], _ = esc({0: ["Rome", "The Oslo", "oslo", "rome."]}, window=2, max_samples=4)
    assert r.answer == "The Oslo"


def test_an_agreeing_last_full_window_wins_over_the_majority() -> None:
    # Majority over all samples would be "k" (tie broken by who reached 2 first); the window rule says "c".
    [r], _ = esc({0: ["k", None, "k", "b", "c", "c"]}, window=2, max_samples=6)
    assert r.answer == "c"
    assert (r.samples_used, r.stopped_early) == (6, True)


def test_budget_not_a_multiple_of_window_draws_a_partial_last_window() -> None:
    [r], sampler = esc({0: ["k", "b", "k", "k", "c", "k", "c"]}, window=3, max_samples=7)
    assert (r.samples_used, r.windows) == (7, 3)
    assert sampler.calls == [[0, 0, 0], [0, 0, 0], [0]]
    # The one-sample last window is trivially unanimous but must not stop or outvote the majority.
    assert not r.stopped_early
    assert r.answer == "k"


def test_partial_last_window_for_many_questions() -> None:
    scripts = {0: ["k"] * 4, 1: ["k", "b", "c", "d"], 2: ["k", "b", "c", "c"]}
    results, sampler = esc(scripts, window=3, max_samples=4)
    assert sampler.calls == [[0, 0, 0, 1, 1, 1, 2, 2, 2], [1, 2]]
    assert [r.samples_used for r in results] == [3, 4, 4]
    assert [r.answer for r in results] == ["k", "k", "c"]


def test_windows_of_active_questions_are_batched_and_finished_ones_never_resampled() -> None:
    w = 2
    scripts = {
        0: ["k", "k"],  # stops after window 1
        1: ["k", "b", "c", "c"],  # stops after window 2
        2: ["k", "b", "c", "d", "e", "e"],  # stops after window 3
        3: ["k", "b", "c", "d", "e", "f", "g", "h"],  # runs out the budget
    }
    results, sampler = esc(scripts, window=w, max_samples=8)
    assert sampler.calls == [
        [0, 0, 1, 1, 2, 2, 3, 3],
        [1, 1, 2, 2, 3, 3],
        [2, 2, 3, 3],
        [3, 3],
    ]
    assert [r.samples_used for r in results] == [2, 4, 6, 8]
    assert [r.windows for r in results] == [1, 2, 3, 4]
    assert [r.stopped_early for r in results] == [True, True, True, False]
    assert [r.answer for r in results] == ["k", "c", "e", "k"]
    # Each result holds exactly its own question's samples.
    for q, r in enumerate(results):
        assert [s.question for s in r.samples] == [q] * r.samples_used


def test_zero_questions_never_calls_the_sampler() -> None:
    results, sampler = esc({}, window=5, max_samples=40)
    assert results == [] and sampler.calls == []
    assert run_sc(0, sampler, 40) == [] and sampler.calls == []


def test_sampler_returning_the_wrong_number_of_samples_is_an_error() -> None:
    def short(questions: list[int]) -> list[Trajectory]:
        return [Trajectory("k", q, 0) for q in questions[:-1]]

    with pytest.raises(ValueError, match="returned 9 samples for 10 requested"):
        run_esc(2, short, ESCSettings(window=5, max_samples=10))


def test_run_sc_draws_the_full_budget_in_one_call_and_never_stops_early() -> None:
    scripts = {
        0: ["x"] * 5 + ["y"] * 6,
        1: ["The Nile", "nile", None, "Amazon", "nile", "", "x", "y", "z", "w", "v"],
    }
    sampler = ScriptedSampler(scripts)
    results = run_sc(2, sampler, max_samples=11)
    assert sampler.calls == [[0] * 11 + [1] * 11]
    assert [r.answer for r in results] == ["y", "The Nile"]
    assert all(r.samples_used == 11 and not r.stopped_early and r.windows == 1 for r in results)
    assert results[1].votes == {"nile": 3, "amazon": 1, "x": 1, "y": 1, "z": 1, "w": 1, "v": 1}


def test_esc_samples_are_a_prefix_of_sc_samples_on_the_same_stream() -> None:
    scripts = {0: ["k"] * 5 + ["b"] * 35, 1: ["k", "b"] * 20}
    [e0, e1] = run_esc(2, ScriptedSampler(scripts), ESCSettings())
    [s0, s1] = run_sc(2, ScriptedSampler(scripts), 40)
    assert s0.samples[: e0.samples_used] == e0.samples
    assert s1.samples == e1.samples
    assert e0.answer == "k" and s0.answer == "b"  # SC outvotes the early stop: ESC trades this risk for cost


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"window": 0}, "window"),
        ({"window": -3}, "window"),
        ({"window": 5, "max_samples": 4}, "max_samples"),
        ({"temperature": -0.1}, "temperature"),
    ],
)
def test_config_validation_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ESCSettings(**kwargs)


def test_config_defaults_follow_the_paper() -> None:
    assert ESCSettings() == ESCSettings(window=5, max_samples=40, temperature=0.7)
    ESCSettings(window=1, max_samples=1)  # smallest valid budget


def test_run_sc_and_expected_samples_validate_the_budget() -> None:
    with pytest.raises(ValueError, match="max_samples"):
        run_sc(1, ScriptedSampler({0: []}), 0)
    with pytest.raises(ValueError, match="max_samples"):
        expected_samples_from_distribution([1.0], window=5, max_samples=4)
    with pytest.raises(ValueError, match="window"):
        expected_samples_from_distribution([1.0], window=0, max_samples=4)
    with pytest.raises(ValueError, match="sum to at most 1"):
        expected_samples_from_distribution([0.7, 0.7], window=5, max_samples=40)
    with pytest.raises(ValueError, match="empty"):
        expected_samples([], window=5, max_samples=40)


def test_summarize() -> None:
    results, _ = esc({0: ["k"] * 5, 1: ["k", "b"] * 10}, window=5, max_samples=20)
    summary = summarize(results)
    assert summary["questions"] == 2
    assert summary["mean_samples_used"] == pytest.approx(12.5)
    assert summary["mean_saving"] == pytest.approx((0.75 + 0.0) / 2)
    assert summary["early_stop_rate"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        summarize([])


# --- the expected-samples model ---------------------------------------------------------------------


def test_expected_samples_when_every_window_agrees_is_one_window() -> None:
    assert expected_samples_from_distribution([1.0], window=5, max_samples=40) == pytest.approx(5)
    assert expected_samples(["Paris", "paris", "The Paris", "paris.", "PARIS"], 5, 40) == pytest.approx(5)


def test_expected_samples_when_no_window_can_agree_is_the_whole_budget() -> None:
    # q = 0: K = 8 windows of 5; with a budget of 43 the partial window of 3 is drawn too.
    assert expected_samples_from_distribution([], window=5, max_samples=40) == pytest.approx(40)
    assert expected_samples_from_distribution([], window=5, max_samples=43) == pytest.approx(43)
    assert expected_samples([None, "", "?", None, "the"], 5, 40) == pytest.approx(40)
    # Distinct answers in the first window estimate q from p = 1/5 each, which is small but not zero.
    assert expected_samples(["v", "w", "x", "y", "z"], 5, 40) < 40


def test_expected_samples_matches_the_reference_formula_and_its_tail_sum() -> None:
    w, budget = 5, 40
    k = budget // w
    for p in ([0.6, 0.2], [0.5, 0.3, 0.2], [0.9], [0.3, 0.3, 0.1]):
        q = sum(x**w for x in p)
        reference = w * (sum((i + 1) * q * (1 - q) ** i for i in range(k - 1)) + k * (1 - q) ** (k - 1))
        # E[min(geometric, K)] = Σ_{j<K} P(window j+1 is drawn) = (1 - (1-q)^K) / q
        tail_sum = w * (1 - (1 - q) ** k) / q
        got = expected_samples_from_distribution(p, w, budget)
        assert got == pytest.approx(reference) and got == pytest.approx(tail_sum)
        assert agreement_probability(p, w) == pytest.approx(q)


def test_expected_samples_estimates_p_from_the_first_window() -> None:
    first = ["Rome", "rome", "Oslo", None, "the Rome"]  # p = {rome: 3/5, oslo: 1/5}, 1/5 invalid
    assert expected_samples(first, 5, 40) == pytest.approx(
        expected_samples_from_distribution([0.6, 0.2], 5, 40)
    )


class RandomSampler:
    """Independent draws from a fixed answer distribution; `None` stands for the invalid mass."""

    def __init__(self, answers: list[str | None], weights: list[float], seed: int) -> None:
        self.answers, self.weights = answers, weights
        self.rng = random.Random(seed)
        self.count = 0

    def __call__(self, questions: list[int]) -> list[Trajectory]:
        picks = self.rng.choices(self.answers, self.weights, k=len(questions))
        self.count += len(questions)
        return [Trajectory(a, q, 0) for a, q in zip(picks, questions, strict=True)]


@pytest.mark.parametrize(
    ("weights", "window", "budget"),
    [
        ([0.6, 0.25, 0.15], 5, 40),  # the paper's defaults, some invalid answers
        ([0.8, 0.1, 0.1], 5, 23),  # partial last window of 3
        ([0.5, 0.5, 0.0], 3, 12),
    ],
)
def test_expected_samples_matches_monte_carlo_simulation_of_run_esc(
    weights: list[float], window: int, budget: int
) -> None:
    trials = 4000
    sampler = RandomSampler(["Paris", "Lyon", None], weights, seed=1234)
    results = run_esc(trials, sampler, ESCSettings(window=window, max_samples=budget))
    used = [r.samples_used for r in results]
    assert sampler.count == sum(used)
    mean = sum(used) / trials
    std = math.sqrt(sum((u - mean) ** 2 for u in used) / (trials - 1))
    predicted = expected_samples_from_distribution(weights[:2], window, budget)
    # Four standard errors of the mean: a correct model fails this about once in 16,000 seeds.
    assert abs(mean - predicted) < 4 * std / math.sqrt(trials) + 1e-9
    # And the measured early-stop rate matches 1 - P(no full window agrees).
    q = agreement_probability(weights[:2], window)
    stop_rate = sum(r.stopped_early for r in results) / trials
    assert abs(stop_rate - (1 - (1 - q) ** (budget // window))) < 4 * 0.5 / math.sqrt(trials)
