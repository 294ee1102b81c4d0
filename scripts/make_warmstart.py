"""Build a synthetic task's warm-start policy with `autorefine train-sft`.

    python scripts/make_warmstart.py [--seed 0] [--out data/synthetic/warmstart]
    python scripts/make_warmstart.py --task multihop [--seed 0] [--out data/synthetic_multihop/warmstart]
    python scripts/make_warmstart.py --task multihop-oversearch [--out data/synthetic_multihop/warmstart-oversearch]

Builds a BM25 index over the task's corpus, serves it on a free loopback port, runs the task's SFT preset
(`configs/sft/synthetic-warmstart.yaml`: from scratch until held-out EM reaches its target;
`configs/sft/multihop-warmstart.yaml`: 700 steps from the one-hop policy), and copies the final policy and
tokenizer (no optimizer state, a few MB) to `--out`. CI tests and the learning benchmarks start from these
policies.

For `multihop`, the traces are written first (`traces.jsonl` in the work folder) from imperfect plans
(`autorefine.synthetic_multihop.warmstart_plans`): some repeat their last search, some two-hop questions are
answered after the first hop. The held-out report of the final policy (per hop count, greedy and sampled)
goes to `<out>/heldout_report.json`.

`multihop-oversearch` (`configs/sft/multihop-oversearch.yaml`: 400 steps from the multi-hop warm start) writes
traces that search more than they need (`oversearch_plans`: a repeated query, a paraphrase, an entity the
question does not need, each after the answer is already in a refine), for the IP-DPO efficiency benchmark.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # testbed/ (the bench) is not installed

from testbed.retriever import ensure_bm25_index, running_retriever

REPO = Path(__file__).resolve().parents[1]
KEEP = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)
TASKS = {
    "onehop": (REPO / "data/synthetic", REPO / "configs/sft/synthetic-warmstart.yaml"),
    "multihop": (REPO / "data/synthetic_multihop", REPO / "configs/sft/multihop-warmstart.yaml"),
    "multihop-oversearch": (REPO / "data/synthetic_multihop", REPO / "configs/sft/multihop-oversearch.yaml"),
}
OUT = {"multihop-oversearch": "warmstart-oversearch"}
# The multi-hop warm start's imperfections (see warmstart_plans): clear majorities, so that greedy decoding is
# stable (it re-checks city questions, answers the rest in the fewest searches) and sampling shows the rest.
EARLY_FRACTION = 0.3
REPEAT_FRACTION = {"employer": 0.15, "city": 0.7, "two_hop": 0.15}
# The over-searching warm start (see oversearch_plans): weights of 0, 1 extra searches per hop count, and of
# each redundant habit. Clear majorities over-search, so that greedy decoding does too. At most one extra: with
# two (the first build) the policy learnt "one more after an extra" and ran into the 3-search limit unanswered.
EXTRA_SEARCHES = {1: (0.1, 0.9), 2: (0.15, 0.85)}
HABIT_WEIGHTS = {"repeat": 0.4, "paraphrase": 0.35, "unneeded": 0.25}


def write_multihop_traces(
    url: str, preset: Path, task_dir: Path, out: Path, seed: int, oversearch: bool = False
) -> dict[str, int]:
    """Imperfect traces of every training question, played through the real agent loop; counts per plan."""
    from autorefine.config import SFTRunConfig
    from autorefine.data import read_questions
    from autorefine.modeling import load_tokenizer
    from autorefine.protocol import PromptTemplate
    from autorefine.retrieval import RetrieverClient
    from autorefine.settings import load_config
    from autorefine.training.sft.traces import (
        TracePlan,
        build_gold_traces,
        planned_turns,
        retrieved_evidence,
        save_trajectories,
    )
    from testbed.synthetic_multihop import load_world, oversearch_plans, warmstart_plans

    config = load_config(SFTRunConfig, preset, [f"retriever.url={url}"])
    questions = read_questions(REPO / config.data.train_file)
    world = load_world(task_dir)
    if oversearch:
        habits = oversearch_plans(
            questions, world, extra_searches=EXTRA_SEARCHES, habits=HABIT_WEIGHTS, seed=seed
        )
        plans = {qid: plan for qid, (plan, _) in habits.items()}
    else:
        plans = warmstart_plans(
            questions, world, early_fraction=EARLY_FRACTION, repeat_fraction=REPEAT_FRACTION, seed=seed
        )

    def kind(question) -> str:
        plan, gold = plans.get(question.id), TracePlan.gold(question)
        if plan is None:
            return "gold"
        if oversearch:
            return "+".join(habits[question.id][1])
        return "repeat" if len(plan.searches) > len(gold.searches) else "early"

    with RetrieverClient(url) as client:
        traces = build_gold_traces(
            questions,
            client,
            load_tokenizer(REPO / config.model.tokenizer),
            config.rollout,
            PromptTemplate.load(REPO / config.template),
            require_evidence=False,  # an early answer never retrieves its second item: checked below instead
            writer=planned_turns(plans),
        )
    kept = [(q, t) for q, t in traces if kind(q) == "early" or retrieved_evidence(t, q)]
    save_trajectories(out, ((q.id, t, {"plan": kind(q), "hops": q.metadata["hops"]}) for q, t in kept))
    return dict(Counter(f"{kind(q)}_{q.metadata['hops']}hop" for q, _ in kept))


def heldout_report(url: str, model_dir: Path, preset: Path, seed: int) -> dict:
    """EM, searches, model tokens and process score of the policy on the held-out questions, per hop count."""
    from autorefine.config import SFTRunConfig
    from autorefine.data import read_questions
    from autorefine.modeling import load_policy, load_tokenizer
    from autorefine.protocol import PromptTemplate
    from autorefine.retrieval import RetrieverClient
    from autorefine.rollout import AgentLoop
    from autorefine.rollout.engine import SamplingParams
    from autorefine.rollout.hf_engine import TransformersEngine
    from autorefine.scoring.process import LexicalMatcher
    from autorefine.scoring.trajectory import score_trajectories
    from autorefine.settings import load_config
    from testbed.synthetic_multihop import hop_report

    config = load_config(SFTRunConfig, preset, [f"retriever.url={url}"])
    questions = read_questions(REPO / config.heldout.file)
    engine = TransformersEngine(load_policy(model_dir, dtype="float32").eval(), load_tokenizer(model_dir))
    report = {}
    with RetrieverClient(url) as client:
        loop = AgentLoop(engine, client, config.rollout, PromptTemplate.load(REPO / config.template))
        for name, params in [("greedy", SamplingParams(temperature=0.0)), ("t1", SamplingParams(seed=seed))]:
            trajectories = loop.run([q.question for q in questions], params)
            scores = score_trajectories(trajectories, questions, LexicalMatcher())
            report[name] = {
                "hops": hop_report(questions, scores),
                "kind": hop_report(questions, scores, "kind"),
            }
    return report


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", choices=sorted(TASKS), default="onehop")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="default: <task folder>/warmstart")
    parser.add_argument("--work-dir", type=Path, default=None, help="default: runs/warmstart[-multihop]")
    parser.add_argument("overrides", nargs="*", help="extra train-sft overrides (section.key=value)")
    args = parser.parse_args()
    task_dir, preset = TASKS[args.task]
    out = args.out or task_dir / OUT.get(args.task, "warmstart")
    work_dir = args.work_dir or REPO / "runs" / (
        "warmstart" if args.task == "onehop" else f"warmstart-{args.task}"
    )

    index = ensure_bm25_index(task_dir / "corpus.jsonl", work_dir / f"{task_dir.name}-bm25")
    sft_dir = work_dir / "sft"
    with running_retriever(index) as url:
        extra = []
        if args.task.startswith("multihop"):
            traces = work_dir / "traces.jsonl"
            oversearch = args.task == "multihop-oversearch"
            counts = write_multihop_traces(url, preset, task_dir, traces, args.seed, oversearch)
            print(f"traces: {json.dumps(counts)}")
            extra = [f"traces_file={traces}"]
        subprocess.run(
            [
                sys.executable,
                "-m",
                "autorefine.cli",
                "train-sft",
                "--config",
                str(preset),
                f"retriever.url={url}",
                f"trainer.output_dir={sft_dir}",
                f"trainer.seed={args.seed}",
                *extra,
                *args.overrides,
            ],
            check=True,
            cwd=REPO,
        )
        out.mkdir(parents=True, exist_ok=True)
        for name in KEEP:
            shutil.copyfile(sft_dir / "final" / name, out / name)
        shutil.copyfile(sft_dir / "heldout.jsonl", out / "heldout_history.jsonl")
        if args.task.startswith("multihop"):
            report = {"traces": counts, **heldout_report(url, out, preset, args.seed)}
            (out / "heldout_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
            print(json.dumps(report, indent=2))
    print(f"warm-start policy written to {out}")


if __name__ == "__main__":
    main()
