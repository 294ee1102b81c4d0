"""Early-stopping self-consistency against plain self-consistency.

    python benchmarks/esc.py [--questions 20000] [--seed 0] [--window 5] [--max-samples 40]
                             [--model-questions 50] [--voted-questions 50] [--skip-model]

Sections, one function each, called in order from `main`:

- `answer_pool_section`: simulated questions whose answers come from a pool with a controlled distribution
  (the top answer's share swept from 0.5 to 0.95, the rest spread over wrong and invalid answers). Each
  question has one pre-drawn stream of `max_samples` answers; ESC reads a prefix of it and SC reads all of
  it, so "agreement" compares the two methods on the very same samples.

- `model_pool_section`: the same comparison on answers sampled from a real policy (the synthetic-task warm
  start, `data/synthetic/warmstart`, with a real BM25 retriever over `data/synthetic/corpus.jsonl`): for
  each held-out question `max_samples` whole trajectories are drawn per temperature, then ESC and SC read
  that one stream. Also reported by the stream's own top-answer share, against the issue's target.
- `throughput_section`: `evaluate_benchmarks` end to end (greedy, ESC, SC) with the same policy and
  retriever, in questions per second.

`--skip-model` runs only the first section; the model sections build their BM25 index once under
`--work-dir` and start `retriever-server serve` on a free port.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from autorefine.evaluation.esc import (
    ESCSettings,
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

REPO = Path(__file__).resolve().parent.parent
SYNTHETIC = REPO / "data" / "synthetic"
TEMPERATURES = (0.1, 0.3, 0.7, 1.0)
SHARE_BUCKETS = ((0.0, 0.5), (0.5, 0.8), (0.8, 1.01))  # empirical top-answer share of a question's stream


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


def pool_setting(top_share: float, questions: int, config: ESCSettings, seed: int) -> dict[str, float]:
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


def answer_pool_section(questions: int, config: ESCSettings, seed: int) -> list[str]:
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


def synthetic_loop(url: str, *, max_batch_size: int | None = None) -> Any:
    """The warm-start policy in an agent loop with the limits and template it was trained with."""
    from autorefine.modeling import load_policy, load_tokenizer
    from autorefine.protocol import PromptTemplate
    from autorefine.retrieval import RetrieverClient
    from autorefine.rollout import AgentLoop, RolloutSettings
    from autorefine.rollout.hf_engine import TransformersEngine

    model = load_policy(SYNTHETIC / "warmstart", dtype="float32").eval()
    engine = TransformersEngine(model, load_tokenizer(SYNTHETIC / "warmstart"), max_batch_size=max_batch_size)
    rollout = RolloutSettings(
        max_turns=2, max_new_tokens=48, max_obs_tokens=160, max_completion_tokens=320, topk=3
    )
    template = PromptTemplate.load(SYNTHETIC / "template.txt")
    return AgentLoop(engine, RetrieverClient(url), rollout, template)


@contextlib.contextmanager
def synthetic_retriever(work_dir: Path) -> Iterator[str]:
    """URL of a BM25 server over the synthetic corpus (index built once under `work_dir`)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # testbed/ is not installed
    from testbed.retriever import ensure_bm25_index, running_retriever

    index = ensure_bm25_index(SYNTHETIC / "corpus.jsonl", work_dir / "synthetic-bm25")
    with running_retriever(index) as url:
        yield url


@dataclass(frozen=True, slots=True)
class ModelSample:
    """One sampled trajectory, reduced to what the comparison reads."""

    answer: str | None
    searches: int


def draw_streams(
    loop: Any, questions: Sequence[Any], temperature: float, length: int, seed: int
) -> list[list[ModelSample]]:
    """`length` whole trajectories per question at `temperature`, a few questions per batched call."""
    import torch

    from autorefine.rollout import SamplingParams

    torch.manual_seed(seed)
    params = SamplingParams(temperature=temperature)
    streams: list[list[ModelSample]] = []
    per_call = max(1, 400 // length)  # ~400 trajectories per AgentLoop.run
    for start in range(0, len(questions), per_call):
        chunk = questions[start : start + per_call]
        trajectories = loop.run([q.question for q in chunk for _ in range(length)], params)
        for i in range(len(chunk)):
            streams.append(
                [ModelSample(t.answer, t.num_searches) for t in trajectories[i * length : (i + 1) * length]]
            )
    return streams


def top_share(stream: Sequence[ModelSample]) -> float:
    """Share of the stream held by its most frequent valid answer (invalid answers count in the total)."""
    answers = [a for a in (normalized(s.answer) for s in stream) if a is not None]
    return max((answers.count(a) for a in set(answers)), default=0) / len(stream)


def compare_streams(
    streams: Sequence[Sequence[ModelSample]], golds: Sequence[Sequence[str]], config: ESCSettings
) -> list[dict[str, float]]:
    """Per question: ESC and SC on the same stream, their accuracy, samples and searches."""
    from autorefine.scoring.answers import exact_match

    esc = run_esc(len(streams), StreamSampler(streams), config)
    sc = run_sc(len(streams), StreamSampler(streams), config.max_samples)
    return [
        {
            "share": top_share(stream),
            "used": e.samples_used,
            "stopped": float(e.stopped_early),
            "searches_used": sum(x.searches for x in stream[: e.samples_used]),
            "searches_all": sum(x.searches for x in stream),
            "agree": float(normalized(e.answer) == normalized(s.answer)),
            "esc_em": exact_match(e.answer, gold),
            "sc_em": exact_match(s.answer, gold),
            "one_em": exact_match(stream[0].answer, gold),
        }
        for stream, e, s, gold in zip(streams, esc, sc, golds, strict=True)
    ]


def _mean(rows: Sequence[dict[str, float]], key: str) -> float:
    return float(np.mean([r[key] for r in rows])) if rows else float("nan")


def model_pool_section(url: str, questions: int, config: ESCSettings, seed: int) -> list[str]:
    """Markdown lines: ESC against SC on trajectories sampled from the warm-start policy."""
    from autorefine.data import read_questions
    from autorefine.evaluation.runner import GREEDY
    from autorefine.scoring.answers import exact_match

    loop = synthetic_loop(url)
    qs = read_questions(SYNTHETIC / "heldout.jsonl", limit=questions)
    golds = [q.golden_answers for q in qs]
    greedy = loop.run([q.question for q in qs], GREEDY)
    greedy_em = float(np.mean([exact_match(t.answer, g) for t, g in zip(greedy, golds, strict=True)]))
    lines = [
        f"Answers sampled from a model: warm-start synthetic policy, {len(qs)} held-out questions, "
        f"{config.max_samples} trajectories per question and temperature (seed {seed}), w = {config.window}; "
        f"greedy EM on these questions {greedy_em:.1%}.",
        "",
        "| temperature | mean top share | saved vs L | searches saved | early-stop rate | ESC = SC (# differing) "
        "| 1-sample EM | ESC EM | SC EM |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    everything: list[dict[str, float]] = []
    for temperature in TEMPERATURES:
        streams = draw_streams(loop, qs, temperature, config.max_samples, seed)
        rows = compare_streams(streams, golds, config)
        everything += rows
        searches_saved = 1 - sum(r["searches_used"] for r in rows) / max(
            1, sum(r["searches_all"] for r in rows)
        )
        lines.append(
            f"| {temperature} | {_mean(rows, 'share'):.2f} | {1 - _mean(rows, 'used') / config.max_samples:.1%} "
            f"| {searches_saved:.1%} | {_mean(rows, 'stopped'):.1%} "
            f"| {_mean(rows, 'agree'):.1%} ({sum(1 - r['agree'] for r in rows):.0f}) "
            f"| {_mean(rows, 'one_em'):.1%} | {_mean(rows, 'esc_em'):.1%} | {_mean(rows, 'sc_em'):.1%} |"
        )
    lines += [
        "",
        "By the question's own top-answer share (all temperatures pooled):",
        "",
        "| top share | questions | ESC samples | saved vs L | ESC = SC (# differing) | ESC EM | SC EM |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for low, high in SHARE_BUCKETS:
        rows = [r for r in everything if low <= r["share"] < high]
        label = f"[{low:.1f}, {min(high, 1.0):.1f}{']' if high > 1 else ')'}"
        if not rows:
            lines.append(f"| {label} | 0 | – | – | – | – | – |")
            continue
        lines.append(
            f"| {label} | {len(rows)} | {_mean(rows, 'used'):.2f} | {1 - _mean(rows, 'used') / config.max_samples:.1%} "
            f"| {_mean(rows, 'agree'):.2%} ({sum(1 - r['agree'] for r in rows):.0f}) "
            f"| {_mean(rows, 'esc_em'):.1%} | {_mean(rows, 'sc_em'):.1%} |"
        )
    checked = [r for r in everything if r["share"] >= TARGET_SHARE]
    if checked:
        saving = 1 - _mean(checked, "used") / config.max_samples
        agreement = _mean(checked, "agree")
        met = saving >= TARGET_SAVING and agreement >= TARGET_AGREEMENT
        lines += [
            "",
            f"Target on model samples (top share ≥ {TARGET_SHARE}, {len(checked)} question-temperature pairs): "
            f"{'met' if met else 'NOT met'}; saving {saving:.1%}, agreement {agreement:.2%}.",
        ]
    return lines


class CountingEngine:
    """Passes generation through, counting calls and decode steps (the longest continuation of each call)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.eos_ids = engine.eos_ids
        self.calls = 0
        self.steps = 0

    def generate(self, prompts: Any, max_new_tokens: Any, params: Any, stop: Any) -> Any:
        """The wrapped engine's generations."""
        out = self.engine.generate(prompts, max_new_tokens, params, stop)
        self.calls += 1
        self.steps += max((len(g.token_ids) for g in out), default=0)
        return out


def throughput_section(
    url: str, questions: int, voted_questions: int, config: ESCSettings, seed: int
) -> list[str]:
    """Markdown lines: `evaluate_benchmarks` wall time per decoding, in questions per second."""
    from autorefine.evaluation.benchmark import evaluate_benchmarks
    from autorefine.evaluation.runner import Decoding

    loop = synthetic_loop(url)
    engine = loop.engine = CountingEngine(loop.engine)
    # T = 0.1 besides the default 0.7: the warm start's answers are nearly flat at 0.7 (see the section above),
    # so only a peaked temperature shows what early stopping does to wall time.
    peaked = dataclasses.replace(config, temperature=0.1)
    runs = [
        ("greedy", questions, 64, Decoding()),
        (f"esc T={config.temperature}", voted_questions, 16, Decoding("esc", config, seed=seed)),
        (f"sc T={config.temperature}", voted_questions, 16, Decoding("sc", config, seed=seed)),
        ("esc T=0.1", voted_questions, 16, Decoding("esc", peaked, seed=seed)),
        ("sc T=0.1", voted_questions, 16, Decoding("sc", peaked, seed=seed)),
    ]
    lines = [
        f"Evaluation throughput: `evaluate_benchmarks` on the synthetic held-out questions (warm-start policy, "
        f"BM25 retriever, transformers engine on CPU), w = {config.window}, L = {config.max_samples}; "
        f"wall time includes writing predictions and metrics; CPU s is this process's CPU time (the retriever "
        f"runs in its own process); decode steps sum, over `generate` calls, the longest continuation of each.",
        "",
        "| decoding | questions | batch (questions) | wall s | CPU s | questions/s (wall) | trajectories/s (wall) "
        "| samples/q | generate calls | decode steps | EM | F1 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, n, batch, decoding in runs:
        engine.calls = engine.steps = 0
        with tempfile.TemporaryDirectory(prefix="esc-bench-") as tmp:
            started, cpu = time.perf_counter(), time.process_time()
            metrics = evaluate_benchmarks(
                loop, {"synthetic": SYNTHETIC / "heldout.jsonl"}, Path(tmp), decoding,
                limit=n, batch_size=batch, progress=False,
            )  # fmt: skip
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        m = metrics["datasets"]["synthetic"]
        lines.append(
            f"| {name} | {m['count']:.0f} | {batch} | {seconds:.1f} | {cpu:.1f} | {m['count'] / seconds:.2f} "
            f"| {m['count'] * m['samples'] / seconds:.1f} | {m['samples']:.2f} | {engine.calls} | {engine.steps} "
            f"| {m['em']:.1%} | {m['f1']:.1%} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=20000, help="simulated questions per setting")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window", type=int, default=ESCSettings.window)
    parser.add_argument("--max-samples", type=int, default=ESCSettings.max_samples)
    parser.add_argument(
        "--model-questions", type=int, default=50, help="held-out questions sampled from the model"
    )
    parser.add_argument("--throughput-questions", type=int, default=300, help="greedy evaluation questions")
    parser.add_argument("--voted-questions", type=int, default=50, help="ESC / SC evaluation questions")
    parser.add_argument("--skip-model", action="store_true", help="only the simulated answer pools")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads for the model sections (1)"
    )
    parser.add_argument(
        "--work-dir", type=Path, default=REPO / "runs" / "bench", help="where the BM25 index is kept"
    )
    args = parser.parse_args()
    config = ESCSettings(window=args.window, max_samples=args.max_samples)

    start = time.perf_counter()
    print("\n".join(answer_pool_section(args.questions, config, args.seed)))
    print(f"\n(answer-pool section ran in {time.perf_counter() - start:.1f} s)", flush=True)
    if args.skip_model:
        return
    import torch

    # One thread: on a shared 2-core machine two threads spend much of each step waiting for the one that
    # was descheduled (measured: a greedy pass over 300 questions took 2 s quiet and 68 s under load).
    torch.set_num_threads(args.threads)
    with synthetic_retriever(args.work_dir) as url:
        for title, section in (
            ("model-sample", lambda: model_pool_section(url, args.model_questions, config, args.seed)),
            (
                "throughput",
                lambda: throughput_section(
                    url, args.throughput_questions, args.voted_questions, config, args.seed
                ),
            ),
        ):
            # Timings on a shared machine mean little without the load they were taken under.
            before, start = os.getloadavg()[0], time.perf_counter()
            lines = section()
            print("\n" + "\n".join(lines))
            print(
                f"\n({title} section ran in {time.perf_counter() - start:.1f} s; "
                f"1-min load average {before:.1f} before, {os.getloadavg()[0]:.1f} after)",
                flush=True,
            )


if __name__ == "__main__":
    main()
