"""Rollout throughput of GRPO groups on SmolLM2: one shared prompt prefill per group against G prefills.

    python benchmarks/shared_prefix.py [--groups 4 8] [--questions 4] [--rounds 3] [--threads 2]
                                       [--adapter data/adapters/smollm2-sft-lora]

The real agent loop (`AgentLoop.run`, the GRPO preset's laptop budgets: one search, top-2 documents cut to 256
tokens, 64 new tokens per turn) samples `--questions` demo HotpotQA training questions × G at temperature 1.0
with the MiniLM retriever over the demo corpus, alternating in each round between

  (old)  `TransformersEngine(share_prefixes=False)`: every row of a group prefills the whole prompt;
  (new)  `TransformersEngine()`: each distinct prompt is prefilled once and its KV cache expanded to G rows.

Both start from the same seed: the trajectories should be the same (reported as the share of identical
completions; a rare float-rounding difference can flip one sampled token). Prints per-round lines, then per
G the median wall time, model tokens/s and the speed-up. Timings are only comparable on an otherwise idle
machine: run it alone. Needs `runs/models/smollm2` (`autorefine fetch-model smollm2-135m-instruct --out
runs/models/smollm2`) and builds the MiniLM index into `runs/index/demo-minilm` if missing (~2 min).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.synthetic_setup import load_average, median, settings  # noqa: E402

# The rollout section of configs/grpo/smollm2-hotpotqa-lora.yaml.
LIMITS = {
    "max_turns": 1,
    "max_new_tokens": 64,
    "max_obs_tokens": 256,
    "max_completion_tokens": 512,
    "topk": 2,
}
TRAIN = REPO / "data" / "demo" / "hotpotqa_train.jsonl"


def one_round(loop, questions: list[str], group: int, seed: int) -> dict:
    """One batch of `questions` × `group` trajectories (a group's rows adjacent, as GRPO lays them out)."""
    import torch

    from autorefine.rollout import SamplingParams

    prompts = [q for q in questions for _ in range(group)]
    torch.manual_seed(seed)
    started = time.perf_counter()
    trajectories = loop.run(prompts, SamplingParams(temperature=1.0))
    seconds = time.perf_counter() - started
    tokens = sum(t.num_model_tokens for t in trajectories)
    return {
        "seconds": seconds,
        "generation_s": loop.last_timings.generation_s,
        "tokens": tokens,
        "tps": tokens / seconds,
        "trajectories_per_s": len(trajectories) / seconds,
        "completions": [t.completion_ids for t in trajectories],
        "prompt_tokens": len(trajectories[0].prompt_ids),
    }


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=REPO / "runs" / "models" / "smollm2")
    parser.add_argument(
        "--adapter",
        type=Path,
        default=REPO / "data" / "adapters" / "smollm2-sft-lora",
        help="LoRA adapter merged over --model (the SFT warm start searches; 'none': the base model)",
    )
    parser.add_argument("--index", type=Path, default=REPO / "runs" / "index" / "demo-minilm")
    parser.add_argument("--groups", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "shared-prefix.json")
    args = parser.parse_args()

    import torch

    from autorefine.data import read_questions
    from autorefine.modeling import apply_adapter, load_policy, load_tokenizer
    from autorefine.retrieval import RetrieverClient
    from autorefine.rollout import AgentLoop, RolloutSettings
    from autorefine.rollout.hf_engine import TransformersEngine
    from testbed.retriever import running_retriever

    torch.set_num_threads(args.threads)
    if not (args.index / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "retriever_server.cli", "build", "--corpus",
                        "data/demo/corpus.jsonl", "--out", str(args.index)], check=True, cwd=REPO)  # fmt: skip
    tokenizer = load_tokenizer(args.model)
    model = load_policy(args.model, dtype="float32")
    if str(args.adapter) != "none":
        model = apply_adapter(model, args.adapter)
    model.eval()
    questions = [q.question for q in read_questions(TRAIN)[: args.questions]]
    print(f"load {load_average()} · {settings()} · OMP_NUM_THREADS {os.environ.get('OMP_NUM_THREADS')}")
    results: dict[str, list[dict]] = {}
    with running_retriever(args.index) as url, RetrieverClient(url) as client:
        engines = {
            "old": TransformersEngine(model, tokenizer, share_prefixes=False),
            "new": TransformersEngine(model, tokenizer),
        }
        loops = {name: AgentLoop(e, client, RolloutSettings(**LIMITS)) for name, e in engines.items()}
        one_round(loops["new"], questions[:1], 2, seed=0)  # warm-up: first-call allocations, retriever
        for group in args.groups:
            for r in range(args.rounds):
                order = ("old", "new") if r % 2 == 0 else ("new", "old")  # drift in load hits both alike
                got = {name: one_round(loops[name], questions, group, seed=r) for name in order}
                same = sum(
                    a == b for a, b in zip(got["old"]["completions"], got["new"]["completions"], strict=True)
                ) / len(got["old"]["completions"])
                for name in order:
                    row = {k: v for k, v in got[name].items() if k != "completions"}
                    results.setdefault(f"G{group}-{name}", []).append({**row, "same_as_old": same})
                print(
                    f"G={group} round {r}: old {got['old']['seconds']:.1f} s, new {got['new']['seconds']:.1f} s, "
                    f"{got['new']['tokens']} model tokens, prompt {got['new']['prompt_tokens']} tokens, "
                    f"identical completions {100 * same:.0f}% (load {load_average()})",
                    flush=True,
                )
    print("\n| G | trajectories | old s | new s | old tok/s | new tok/s | speed-up | identical |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for group in args.groups:
        old, new = results[f"G{group}-old"], results[f"G{group}-new"]
        old_s, new_s = median([x["seconds"] for x in old]), median([x["seconds"] for x in new])
        print(
            f"| {group} | {len(questions) * group} | {old_s:.1f} | {new_s:.1f} | "
            f"{median([x['tps'] for x in old]):.1f} | {median([x['tps'] for x in new]):.1f} | "
            f"{old_s / new_s:.2f}× | {100 * median([x['same_as_old'] for x in new]):.0f}% |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"load_end": load_average(), "rounds": results}, indent=2) + "\n")
    print(f"\nall rounds in {args.out} (load at the end {load_average()})")


if __name__ == "__main__":
    main()
