"""What IP-DPO's pairs prefer before and after the refine-credit fix: refine words of chosen vs rejected.

    python benchmarks/refine_credit.py [--questions 128] [--samples 8] [--seed 0] [--out runs/bench/refine_credit]

Samples one IP-DPO round's worth of trajectories from the multi-hop warm start (configs/ipdpo/tiny-cpu-multihop.yaml:
its rollout limits, template and sampling temperature) over a real BM25 retriever, scores every trajectory twice
and builds pairs with the preset's pair settings each time:

- before: a refine credited by the recall of the whole evidence item's words (the rule until 2026-12-07,
  under which pasting the passage earned full credit);
- after: a refine credited by its best sentence match, times min(1, sentence words / refine words).

Prints pair counts and, for chosen vs rejected sides, the mean refine words, process score, searches and model
tokens; writes the numbers as JSON. The samples are kept, so a rerun only rescores.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # testbed/ (the bench) is not installed

from autorefine.config import IPDPORunConfig  # noqa: E402
from autorefine.data import Evidence, read_questions  # noqa: E402
from autorefine.files import write_jsonl  # noqa: E402
from autorefine.modeling import load_policy, load_tokenizer  # noqa: E402
from autorefine.protocol import PromptTemplate  # noqa: E402
from autorefine.retrieval import RetrieverClient  # noqa: E402
from autorefine.rollout import AgentLoop  # noqa: E402
from autorefine.rollout.hf_engine import TransformersEngine  # noqa: E402
from autorefine.scoring.process import LexicalMatcher, SimilarityBlock  # noqa: E402
from autorefine.settings import load_config  # noqa: E402
from autorefine.training.ipdpo.pairs import build_pairs  # noqa: E402
from autorefine.training.ipdpo.sampling import (  # noqa: E402
    read_sample_rows,
    rescore_rows,
    sample_questions,
)
from benchmarks.synthetic_setup import load_average  # noqa: E402
from testbed.retriever import ensure_bm25_index, running_retriever  # noqa: E402

PRESET = REPO / "configs" / "ipdpo" / "tiny-cpu-multihop.yaml"
TASK = REPO / "data" / "synthetic_multihop"


class RecallRefineMatcher(LexicalMatcher):
    """The refine channel as it was: the share of the whole item's words a refine holds (no precision term)."""

    name = "lexical-recall-refine"

    def refine_similarity_blocks(self, blocks: Sequence[SimilarityBlock]) -> list[list[list[float]]]:
        """Recall of each item's content words in each refine, like a passage."""
        return self.similarity_blocks(blocks)


def sample(config: IPDPORunConfig, questions: int, samples: int, seed: int, out: Path) -> Path:
    """One round's samples (scored with today's rule) in `out`, unless already there."""
    if out.is_file():
        return out
    pool = read_questions(REPO / config.data.train_file)
    chosen = random.Random(seed).sample(pool, questions)
    index = ensure_bm25_index(TASK / "corpus.jsonl", REPO / "runs" / "bench" / "multihop-bm25")
    policy = REPO / config.model.name_or_path
    engine = TransformersEngine(load_policy(policy, dtype="float32").eval(), load_tokenizer(policy))
    settings = config.sampling.__class__(**{**asdict(config.sampling), "samples_per_question": samples})
    with running_retriever(index) as url, RetrieverClient(url) as client:
        loop = AgentLoop(engine, client, config.rollout, PromptTemplate.load(REPO / config.template))
        partial = out.with_name(out.name + ".sampling")
        partial.unlink(missing_ok=True)
        sample_questions(
            loop, chosen, settings, LexicalMatcher(), config.reward, partial, round_index=1, seed=seed
        )
    partial.rename(out)
    return out


def side_means(pairs: list[dict], side: str) -> dict[str, float]:
    """Mean refine words, process, searches and model tokens of one side of every pair."""
    keys = ("refine_words", "process", "steps", "model_tokens", "format", "outcome")
    return {k: sum(p[side]["scores"][k] for p in pairs) / len(pairs) for k in keys} if pairs else {}


def evidence_words(questions: dict[str, list[Evidence]]) -> float:
    """Mean words of an evidence item's text (what a pasted item would cost)."""
    items = [len(e.text.split()) for ev in questions.values() for e in ev]
    return sum(items) / len(items)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=128)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "refine_credit")
    args = parser.parse_args(argv)
    config = load_config(IPDPORunConfig, PRESET)
    args.out.mkdir(parents=True, exist_ok=True)
    samples = sample(config, args.questions, args.samples, args.seed, args.out / "samples.jsonl")
    by_id = {q.id: q for q in read_questions(REPO / config.data.train_file)}
    results = {}
    for name, matcher in (
        ("before (recall refine)", RecallRefineMatcher()),
        ("after (sentence, length)", LexicalMatcher()),
    ):
        rows = list(rescore_rows(read_sample_rows(samples), by_id, matcher, config.reward))
        write_jsonl(args.out / f"samples-{matcher.name}.jsonl", rows)
        pairs, stats = build_pairs(rows, config.pairs)
        refined = [r for r in rows if r["scores"]["refine_words"] > 0]
        results[name] = {
            "samples": len(rows),
            "pairs": stats.pairs,
            "by_type": dict(stats.by_type),
            "skipped": dict(stats.skipped),
            "chosen": side_means(pairs, "chosen"),
            "rejected": side_means(pairs, "rejected"),
            "weaker_rejected": side_means([p for p in pairs if p["type"] == "weaker"], "rejected"),
            "samples_refine_words": sum(r["scores"]["refine_words"] for r in refined) / max(1, len(refined)),
        }
    report = {
        "questions": args.questions,
        "samples_per_question": args.samples,
        "seed": args.seed,
        "evidence_item_words": evidence_words(
            {q.id: [Evidence(**e) for e in q.metadata.get("evidence", [])] for q in by_id.values()}
        ),
        "load": load_average(),
        "results": results,
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"{args.questions} questions × {args.samples} samples (seed {args.seed}); load {report['load']}")
    print(
        "| scoring | pairs | weaker / wrong / malformed | refine words chosen → rejected | process chosen → rejected | searches chosen → rejected | model tokens chosen → rejected |"
    )
    print("|---|---:|---|---|---|---|---|")
    for name, r in results.items():
        c, j = r["chosen"], r["rejected"]
        kinds = " / ".join(str(r["by_type"].get(t, 0)) for t in ("weaker", "wrong", "malformed"))
        print(
            f"| {name} | {r['pairs']} | {kinds} | {c['refine_words']:.1f} → {j['refine_words']:.1f} | "
            f"{c['process']:.2f} → {j['process']:.2f} | {c['steps']:.2f} → {j['steps']:.2f} | "
            f"{c['model_tokens']:.1f} → {j['model_tokens']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
