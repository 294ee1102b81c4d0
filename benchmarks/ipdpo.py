"""IP-DPO on the multi-hop synthetic task: does it raise held-out EM while cutting searches and tokens?

    nice -n 10 python benchmarks/ipdpo.py [--seeds 0 1] [--out runs/bench/ipdpo]
    python benchmarks/ipdpo.py --parallel 6 --gpu          # every run at once, each on the GPU

For each seed, from the shipped SFT warm start (data/synthetic_multihop/warmstart):
- IP-DPO: `autorefine train-ipdpo --config configs/ipdpo/tiny-cpu-multihop.yaml` (3 rounds, format + outcome +
  process ranking);
- the ablation: the same run with `pairs.ranking=[outcome]` (outcome-only DPO, no process score);
- GRPO from the same warm start (configs/grpo/tiny-cpu.yaml pointed at the multi-hop task, same rollout
  limits) for the wall clock of that seed's IP-DPO run (stopped when it is done, or after as long as it took),
  then `autorefine evaluate` of its last checkpoint on the same held-out questions.
Every policy is evaluated greedily on the held-out questions (people and companies never seen in training).
Reports EM, F1, searches per question (one-hop and two-hop questions apart), model tokens per question and
wall time, per seed; writes a PNG and the numbers as JSON. Runs are resumed when their folder exists.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.synthetic_setup import hops_of_heldout, load_average, read_jsonl, run  # noqa: E402
from testbed.retriever import ensure_bm25_index, running_retriever  # noqa: E402

TASK = REPO / "data" / "synthetic_multihop"
IPDPO_PRESET = REPO / "configs" / "ipdpo" / "tiny-cpu-multihop.yaml"
GRPO_PRESET = REPO / "configs" / "grpo" / "tiny-cpu.yaml"
CLI = [sys.executable, "-m", "autorefine.cli"]
IPDPO_OVERRIDES: list[str] = []  # --set: applied to every IP-DPO run (e.g. a smaller smoke run)
DEVICE_OVERRIDES: list[str] = []  # --gpu: every run trains and samples on the GPU (float32, as on the CPU)


def summarize(predictions: list[dict], hops: dict[str, int]) -> dict[str, float]:
    """EM, F1, searches and model tokens per question, overall and per hop count."""

    def mean(rows: list[dict], value) -> float:
        return sum(value(r) for r in rows) / len(rows) if rows else float("nan")

    out = {
        "questions": len(predictions),
        "em": mean(predictions, lambda r: r["scores"]["em"]),
        "f1": mean(predictions, lambda r: r["scores"]["f1"]),
        "searches": mean(predictions, lambda r: r["searches"]),
        "model_tokens": mean(predictions, lambda r: r["scores"]["model_tokens"]),
    }
    for n in (1, 2):
        rows = [r for r in predictions if hops.get(r["id"]) == n]
        out[f"em_{n}hop"] = mean(rows, lambda r: r["scores"]["em"])
        out[f"searches_{n}hop"] = mean(rows, lambda r: r["searches"])
    return out


def train_ipdpo(seed: int, url: str, out: Path, name: str, extra: list[str]) -> None:
    """One IP-DPO run (resumed if its folder exists); its wall time is kept next to it."""
    folder = out / f"seed{seed}" / name
    command = [*CLI, "train-ipdpo", "--config", str(IPDPO_PRESET), f"retriever.url={url}",
               f"trainer.output_dir={folder}", f"trainer.seed={seed}", *IPDPO_OVERRIDES, *extra, *DEVICE_OVERRIDES]  # fmt: skip
    if (folder / "round-0").exists():
        command.append("--resume")
    seconds = run(command, folder.parent / f"{name}.log")
    timing = folder / "benchmark_seconds.json"
    if not timing.exists():  # the first (uninterrupted) run's wall time is the one reported
        timing.write_text(json.dumps({"seconds": seconds}))


def ipdpo_results(seed: int, out: Path, name: str) -> dict:
    """Per-round held-out summaries of one IP-DPO run, and its wall time."""
    folder = out / f"seed{seed}" / name
    timing = folder / "benchmark_seconds.json"
    hops = hops_of_heldout()
    rounds = []
    for summary in read_jsonl(folder / "rounds.jsonl"):
        predictions = read_jsonl(folder / f"round-{summary['round']}" / "heldout_predictions.jsonl")
        rounds.append(
            {"round": summary["round"], **summarize(predictions, hops), "pairs": summary.get("pairs")}
        )
    return {"seconds": json.loads(timing.read_text())["seconds"], "rounds": rounds}


def train_grpo(seed: int, url: str, out: Path, budget: Callable[[float], bool]) -> None:
    """GRPO from the same warm start until `budget(elapsed seconds)` says stop; its last checkpoint held out.

    A checkpoint every 5th step; the run stops when the same seed's IP-DPO run is done (or after its wall
    time), so both get a similar wall clock.
    """
    folder = out / f"seed{seed}" / "grpo"
    timing = folder / "benchmark_seconds.json"
    if timing.exists():
        return
    command = [
        *CLI, "train-grpo", "--config", str(GRPO_PRESET),
        f"retriever.url={url}",
        f"model.name_or_path={TASK / 'warmstart'}",
        f"template={TASK / 'template.txt'}",
        f"data.train_file={TASK / 'train.jsonl'}",
        "heldout.file=null",
        *multihop_rollout(),
        f"trainer.output_dir={folder}",
        f"trainer.seed={seed}",
        "trainer.max_steps=100000",
        "trainer.save_strategy=steps",
        "trainer.save_steps=5",
        "trainer.save_total_limit=2",
        "trainer.report_to=[]",
        *DEVICE_OVERRIDES,
    ]  # fmt: skip
    log = folder.parent / "grpo.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log.open("a", encoding="utf-8") as sink:
        process = subprocess.Popen(command, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT)
        while process.poll() is None and not budget(time.perf_counter() - started):
            time.sleep(2)
        process.terminate()
        process.wait()
    train = time.perf_counter() - started
    complete = [c for c in folder.glob("checkpoint-*") if (c / "trainer_state.json").is_file()]
    if not complete:
        raise RuntimeError(f"GRPO saved no checkpoint within its budget: see {log}")
    last = max(complete, key=lambda c: int(c.name.split("-")[1]))
    evaluation = run(
        [*CLI, "evaluate", "--model", str(last), "--datasets", f"multihop={TASK / 'heldout.jsonl'}",
         "--retriever-url", url, "--out", str(folder / "eval"), "--batch-size", "86", "--no-progress",
         *(["--device", "cuda"] if DEVICE_OVERRIDES else [])],
        log,
    )  # fmt: skip
    steps = int(last.name.split("-")[1])
    timing.write_text(json.dumps({"seconds": train + evaluation, "train_seconds": train, "steps": steps}))


def grpo_results(seed: int, out: Path) -> dict:
    """Held-out summary of one GRPO run, its steps and wall time."""
    folder = out / f"seed{seed}" / "grpo"
    predictions = read_jsonl(folder / "eval" / "predictions.jsonl")
    timing = json.loads((folder / "benchmark_seconds.json").read_text())
    return {**timing, **summarize(predictions, hops_of_heldout())}


def multihop_rollout() -> list[str]:
    """The IP-DPO preset's rollout limits, so GRPO trains and is evaluated with the same ones."""
    from autorefine.config import IPDPORunConfig
    from autorefine.settings import load_config

    rollout = load_config(IPDPORunConfig, IPDPO_PRESET).rollout
    keys = ("max_turns", "max_new_tokens", "max_obs_tokens", "max_completion_tokens", "topk")
    return [f"rollout.{k}={getattr(rollout, k)}" for k in keys]


def plot(results: list[dict], path: Path) -> None:
    """Held-out EM, searches and model tokens per question against the round, per seed and method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("em", "held-out EM (%)", 100), ("searches", "searches per question", 1),
              ("model_tokens", "model tokens per question", 1))  # fmt: skip
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, label, scale) in zip(axes, panels, strict=True):
        for i, r in enumerate(results):
            color = f"C{i}"
            for name, style in (("ipdpo", "-"), ("outcome_only", "--")):
                rounds = r[name]["rounds"]
                ax.plot([x["round"] for x in rounds], [scale * x[key] for x in rounds], style, marker="o",
                        color=color, label=f"seed {r['seed']} {name.replace('_', '-')}")  # fmt: skip
            ax.plot([len(r["ipdpo"]["rounds"]) - 1], [scale * r["grpo"][key]], "*", markersize=12, color=color,
                    label=f"seed {r['seed']} GRPO ({r['grpo']['steps']} steps)")  # fmt: skip
        ax.set_xlabel("round (0 = SFT warm start)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Multi-hop synthetic task: IP-DPO vs outcome-only DPO vs GRPO at a similar wall clock")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(results: list[dict]) -> str:
    """One row per seed and policy."""
    lines = [
        "| seed | policy | EM | F1 | searches (1-hop / 2-hop) | model tokens | EM 1-hop / 2-hop | wall min |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]

    def row(seed: int, name: str, m: dict, minutes: float | None) -> str:
        wall = f"{minutes:.1f}" if minutes is not None else ""
        return (
            f"| {seed} | {name} | {100 * m['em']:.1f} | {100 * m['f1']:.1f} | {m['searches']:.2f} "
            f"({m['searches_1hop']:.2f} / {m['searches_2hop']:.2f}) | {m['model_tokens']:.1f} | "
            f"{100 * m['em_1hop']:.1f} / {100 * m['em_2hop']:.1f} | {wall} |"
        )

    for r in results:
        start, *rounds = r["ipdpo"]["rounds"]
        lines.append(row(r["seed"], "SFT warm start", start, None))
        for x in rounds:
            last = x is rounds[-1]
            lines.append(
                row(r["seed"], f"IP-DPO round {x['round']}", x, r["ipdpo"]["seconds"] / 60 if last else None)
            )
        last = r["outcome_only"]["rounds"][-1]
        lines.append(
            row(r["seed"], f"outcome-only DPO round {last['round']}", last, r["outcome_only"]["seconds"] / 60)
        )
        lines.append(row(r["seed"], f"GRPO {r['grpo']['steps']} steps", r["grpo"], r["grpo"]["seconds"] / 60))
    return "\n".join(lines)


def verdict(results: list[dict]) -> list[str]:
    """Whether each target holds on every seed."""
    checks = []
    for name, key, better in (("held-out EM up", "em", 1), ("searches down", "searches", -1),
                              ("model tokens down", "model_tokens", -1)):  # fmt: skip
        ok = [better * (r["ipdpo"]["rounds"][-1][key] - r["ipdpo"]["rounds"][0][key]) > 0 for r in results]
        checks.append(f"{name} after the last round on every seed: {'yes' if all(ok) else 'NO'} {ok}")
    return checks


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "ipdpo")
    parser.add_argument("--parallel", type=int, default=1, help="runs at once (default 1: one after another)")
    parser.add_argument("--gpu", action="store_true", help="train, sample and evaluate on the GPU")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="IP-DPO override")
    parser.add_argument(
        "--report-only", action="store_true", help="table and plot of the runs already in --out"
    )
    args = parser.parse_args()
    IPDPO_OVERRIDES.extend(args.set)
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    load = load_average()

    if args.gpu:
        DEVICE_OVERRIDES.extend(["trainer.use_cpu=false", "trainer.bf16=false"])
    index = None if args.report_only else ensure_bm25_index(TASK / "corpus.jsonl", args.out / "multihop-bm25")
    finished = {seed: threading.Event() for seed in args.seeds}
    fresh: dict[int, bool] = {}

    def ipdpo_seconds(seed: int) -> float:
        return json.loads((args.out / f"seed{seed}" / "ipdpo" / "benchmark_seconds.json").read_text())[
            "seconds"
        ]

    def full(seed: int, url: str) -> None:
        fresh[seed] = not (args.out / f"seed{seed}" / "ipdpo" / "benchmark_seconds.json").exists()
        try:
            train_ipdpo(seed, url, args.out, "ipdpo", [])
        finally:
            finished[seed].set()

    def outcome_only(seed: int, url: str) -> None:
        train_ipdpo(seed, url, args.out, "outcome-only", ["pairs.ranking=[outcome]"])

    def grpo(seed: int, url: str) -> None:
        # Alongside a fresh IP-DPO run (--parallel): stop when it is done. Otherwise: as long as it took.
        def budget(elapsed: float) -> bool:
            if not finished[seed].is_set():
                return False
            return (args.parallel > 1 and fresh[seed]) or elapsed >= ipdpo_seconds(seed)

        train_grpo(seed, url, args.out, budget)

    if not args.report_only:
        with running_retriever(index) as url, ThreadPoolExecutor(max_workers=args.parallel) as pool:
            futures = [
                pool.submit(job, seed, url) for seed in args.seeds for job in (full, outcome_only, grpo)
            ]
            for future in futures:
                future.result()
    results = [
        {
            "seed": seed,
            "ipdpo": ipdpo_results(seed, args.out, "ipdpo"),
            "outcome_only": ipdpo_results(seed, args.out, "outcome-only"),
            "grpo": grpo_results(seed, args.out),
        }
        for seed in args.seeds
    ]

    print(table(results))
    print("\n".join(verdict(results)))
    print(f"load average at start: {load}; at end: {load_average()}")
    plot(results, args.out / "ipdpo.png")
    (args.out / "ipdpo.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"plot: {args.out / 'ipdpo.png'}; numbers: {args.out / 'ipdpo.json'}")


if __name__ == "__main__":
    main()
