"""Early-stopping self-consistency against plain self-consistency.

    python benchmarks/esc.py [--questions 20000] [--seed 0] [--window 5] [--max-samples 40]

Sections, one function each, called in order from `main`:

- `answer_pool_section`: simulated questions whose answers come from a pool with a controlled distribution
  (the top answer's share swept from 0.5 to 0.95, the rest spread over wrong and invalid answers). Each
  question has one pre-drawn stream of `max_samples` answers; ESC reads a prefix of it and SC reads all of
  it, so "agreement" compares the two methods on the very same samples.

Answers sampled from a real model, with evaluation throughput in questions/second, belong in a second
section function of their own next to `answer_pool_section`, called from `main`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from autorefine.esc import (
    ESCConfig,
    agreement_probability,
    expected_samples,
    expected_samples_from_distribution,
    normalized,
    run_esc,
    run_sc,
    summarize,
)

TOP_SHARES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
# Surface variants of the right answer: they agree only through EM normalization, as real samples do.
TOP_VARIANTS = ("Paris", "paris", "The Paris", "Paris.")
TOP_ANSWER = "paris"
WRONG_ANSWERS = (("Lyon", 0.5), ("Marseille", 0.3), ("Nice", 0.2))  # relative weights within the wrong mass
INVALID_ANSWERS = (None, "", "?")  # no answer tag, an empty one, punctuation only
INVALID_FRACTION = 0.3  # of the mass not taken by the top answer

# Targets of the issue, checked for top shares at or above TARGET_SHARE.
TARGET_SHARE, TARGET_SAVING, TARGET_AGREEMENT = 0.8, 0.60, 0.99


@dataclass(frozen=True, slots=True)
class PoolSample:
    """One simulated trajectory: only its answer."""

    answer: str | None


def answer_pool(top_share: float) -> tuple[list[PoolSample], np.ndarray, list[float]]:
    """Pool entries, their sampling probabilities, and the probability of each distinct valid answer."""
    rest = 1 - top_share
    wrong, invalid = rest * (1 - INVALID_FRACTION), rest * INVALID_FRACTION
    entries = [(v, top_share / len(TOP_VARIANTS)) for v in TOP_VARIANTS]
    entries += [(a, wrong * w) for a, w in WRONG_ANSWERS]
    entries += [(a, invalid / len(INVALID_ANSWERS)) for a in INVALID_ANSWERS]
    probs = np.array([p for _, p in entries])
    valid = [top_share] + [wrong * w for _, w in WRONG_ANSWERS]
    return [PoolSample(a) for a, _ in entries], probs / probs.sum(), valid


class StreamSampler:
    """Serves each question's pre-drawn stream in order, so every method sees the same samples."""

    def __init__(self, streams: Sequence[Sequence[PoolSample]]) -> None:
        self.streams = streams
        self.cursor = [0] * len(streams)

    def __call__(self, questions: list[int]) -> list[PoolSample]:
        out = []
        for q in questions:
            out.append(self.streams[q][self.cursor[q]])
            self.cursor[q] += 1
        return out


def pool_setting(top_share: float, questions: int, config: ESCConfig, seed: int) -> dict[str, float]:
    """ESC and SC on `questions` simulated questions whose answers follow one pool distribution."""
    pool, probs, valid = answer_pool(top_share)
    rng = np.random.default_rng([seed, round(top_share * 1000)])
    draws = rng.choice(len(pool), size=(questions, config.max_samples), p=probs)
    streams = [[pool[i] for i in row] for row in draws]

    esc = run_esc(questions, StreamSampler(streams), config)
    sc = run_sc(questions, StreamSampler(streams), config.max_samples)
    summary = summarize(esc)
    w, budget = config.window, config.max_samples
    estimated = [expected_samples([s.answer for s in r.samples[:w]], w, budget) for r in esc]
    row = {
        "top_share": top_share,
        "q": agreement_probability(valid, w),
        "predicted": expected_samples_from_distribution(valid, w, budget),
        "estimated": float(np.mean(estimated)),
        "used": summary["mean_samples_used"],
        "saving": summary["mean_saving"],
        "early_stop": summary["early_stop_rate"],
        "disagreements": sum(
            normalized(e.answer) != normalized(s.answer) for e, s in zip(esc, sc, strict=True)
        ),
        "esc_accuracy": float(np.mean([normalized(e.answer) == TOP_ANSWER for e in esc])),
        "sc_accuracy": float(np.mean([normalized(s.answer) == TOP_ANSWER for s in sc])),
    }
    row["agreement"] = 1 - row["disagreements"] / questions
    return row


def answer_pool_section(questions: int, config: ESCConfig, seed: int) -> list[str]:
    """Markdown lines: the sweep over top-answer shares, and whether the targets are met."""
    rows = [pool_setting(share, questions, config, seed) for share in TOP_SHARES]
    lines = [
        f"Answer pools: {questions} simulated questions per row, w = {config.window}, "
        f"L = {config.max_samples}, seed {seed}. Non-top mass: {1 - INVALID_FRACTION:.0%} wrong answers "
        f"({', '.join(a for a, _ in WRONG_ANSWERS)}), {INVALID_FRACTION:.0%} invalid (none / empty / punctuation).",
        "",
        "| top share | q = Σp^w | E[samples] exact | E[samples] 1st-window est. (mean) | ESC samples (measured) "
        "| saved vs L | early-stop rate | ESC = SC (# differing) | ESC acc. | SC acc. |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['top_share']:.2f} | {r['q']:.3f} | {r['predicted']:.2f} | {r['estimated']:.2f} "
            f"| {r['used']:.2f} | {r['saving']:.1%} | {r['early_stop']:.1%} "
            f"| {r['agreement']:.2%} ({r['disagreements']:.0f}) | {r['esc_accuracy']:.2%} | {r['sc_accuracy']:.2%} |"
        )
    checked = [r for r in rows if r["top_share"] >= TARGET_SHARE]
    met = all(r["saving"] >= TARGET_SAVING and r["agreement"] >= TARGET_AGREEMENT for r in checked)
    lines += [
        "",
        f"Target (top share ≥ {TARGET_SHARE}: ≥ {TARGET_SAVING:.0%} of samples saved with ≥ "
        f"{TARGET_AGREEMENT:.0%} agreement with SC): {'met' if met else 'NOT met'}; "
        f"lowest saving {min(r['saving'] for r in checked):.1%}, "
        f"lowest agreement {min(r['agreement'] for r in checked):.2%}.",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=20000, help="simulated questions per setting")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window", type=int, default=ESCConfig.window)
    parser.add_argument("--max-samples", type=int, default=ESCConfig.max_samples)
    args = parser.parse_args()
    config = ESCConfig(window=args.window, max_samples=args.max_samples)

    start = time.perf_counter()
    print("\n".join(answer_pool_section(args.questions, config, args.seed)))
    print(f"\n(answer-pool section ran in {time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
