"""IP-DPO where it applies: does an over-searching agent learn to search less at equal accuracy?

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/ipdpo_efficiency.py [--seeds 0 1 2] [--out runs/bench/ipdpo-eff]
    python benchmarks/ipdpo_efficiency.py --report-only --seeds 0 1 2        # table, pairs and PNG of what ran

For each seed, from the over-searching warm start (data/synthetic_multihop/warmstart-oversearch), four
policies, each trained on the same number of sampled trajectories (the presets' budget: 3 rounds × 64
questions × 8 samples for IP-DPO = 12 GRPO steps × 16 questions × 8; `--questions` scales both):

- `ipdpo`: `autorefine train-ipdpo --config configs/ipdpo/tiny-cpu-oversearch.yaml` (format → outcome →
  process → tokens ranking, 3 rounds);
- `outcome_only`: the same with `pairs.ranking=[outcome]` (outcome-only DPO);
- `grpo`: `autorefine train-grpo --config configs/grpo/tiny-cpu-oversearch.yaml` (outcome reward: F1 + 0.1
  refine bonus);
- `grpo_process`: the same with `reward.process_weight=0.5` (process-aware GRPO).

Every policy is evaluated greedily on the 172 held-out questions (IP-DPO: its last round's held-out
evaluation; GRPO: `autorefine evaluate` of its final policy, same rollout limits). Reported: EM, F1, searches
per question (one-hop / two-hop), model tokens and refine words per question, wall time per stage, and
paired-bootstrap 95% intervals (`autorefine.evaluation.compare`, per hop count and overall) of IP-DPO against
each other policy. Each stage is skipped when finished (IP-DPO runs resume inside a round); run one seed at a
time on a quiet machine when the wall times matter.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.synthetic_setup import hops_of_heldout, load_average, read_jsonl, run  # noqa: E402
from testbed.retriever import ensure_bm25_index, running_retriever  # noqa: E402

TASK = REPO / "data" / "synthetic_multihop"
WARMSTART = TASK / "warmstart-oversearch"
IPDPO_PRESET = REPO / "configs" / "ipdpo" / "tiny-cpu-oversearch.yaml"
GRPO_PRESET = REPO / "configs" / "grpo" / "tiny-cpu-oversearch.yaml"
CLI = [sys.executable, "-m", "autorefine.cli"]
POLICIES = {  # name: (label, command kind, extra overrides)
    "ipdpo": ("IP-DPO", "ipdpo", []),
    "outcome_only": ("outcome-only DPO", "ipdpo", ["pairs.ranking=[outcome]"]),
    "grpo": ("GRPO (outcome)", "grpo", []),
    "grpo_process": ("GRPO + process 0.5", "grpo", ["reward.process_weight=0.5"]),
}
SAMPLES, GROUP_QUESTIONS = 8, 16  # IP-DPO samples per question; GRPO questions per step
ROUNDS = [3]  # --rounds (a smoke run takes 1)
MODEL: list[
    str
] = []  # --model: another starting policy than the presets' (a smoke run before the warm start)
SHOWN = ("em", "f1", "searches", "model_tokens", "refine_words")


def write_eval(rows: list[dict], folder: Path) -> None:
    """Predictions as `autorefine compare` reads them, one "dataset" per hop count (paired CIs per hop)."""
    hops = hops_of_heldout()
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "predictions.jsonl").open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({**row, "dataset": f"{hops[str(row['id'])]}-hop"}) + "\n")


def train(seed: int, name: str, url: str, out: Path, questions: int) -> None:
    """One policy of one seed, skipped when its evaluation exists; wall times kept in `seconds.json`."""
    folder = out / f"seed{seed}" / name
    if (folder / "eval" / "predictions.jsonl").is_file():
        return
    _, kind, extra = POLICIES[name]
    log = out / f"seed{seed}" / f"{name}.log"
    timing = folder / "seconds.json"  # kept per stage: a run stopped between stages keeps its training time
    seconds: dict[str, float] = json.loads(timing.read_text()) if timing.is_file() else {}
    if kind == "ipdpo":
        command = [*CLI, "train-ipdpo", "--config", str(IPDPO_PRESET), f"retriever.url={url}",
                   f"trainer.output_dir={folder}", f"trainer.seed={seed}", f"rounds={ROUNDS[0]}", *MODEL,
                   f"sampling.questions_per_round={questions}", f"sampling.samples_per_question={SAMPLES}",
                   # outcome-only ranking cannot tell two right answers apart and finds 14-19 pairs per round
                   # here: both arms train on what they find rather than stop at the preset's 16
                   "pairs.min_pairs=1", *extra]  # fmt: skip
        if (folder / "round-0").exists():
            command.append("--resume")
        seconds["train"] = run(command, log)
        write_eval(read_jsonl(folder / f"round-{ROUNDS[0]}" / "heldout_predictions.jsonl"), folder / "eval")
    else:
        steps = ROUNDS[0] * questions * SAMPLES // (GROUP_QUESTIONS * SAMPLES)
        if not (folder / "final" / "config.json").is_file():
            command = [*CLI, "train-grpo", "--config", str(GRPO_PRESET), f"retriever.url={url}",
                       f"trainer.output_dir={folder}", f"trainer.seed={seed}", f"trainer.max_steps={steps}", *MODEL,
                       *extra]  # fmt: skip
            seconds["train"] = run(command, log)
            folder.mkdir(parents=True, exist_ok=True)
            timing.write_text(json.dumps(seconds), encoding="utf-8")
        raw = folder / "raw-eval"
        seconds["evaluate"] = run(
            [*CLI, "evaluate", "--model", str(folder / "final"), "--datasets", f"multihop={TASK / 'heldout.jsonl'}",
             "--retriever-url", url, "--out", str(raw), "--batch-size", "86", "--no-progress"],
            log,
        )  # fmt: skip
        write_eval(read_jsonl(raw / "predictions.jsonl"), folder / "eval")
    timing.write_text(json.dumps(seconds), encoding="utf-8")


def warm_start_eval(seed: int, out: Path) -> Path:
    """The warm start's held-out predictions (IP-DPO's round 0 of this seed) in `compare`'s layout."""
    folder = out / f"seed{seed}" / "warmstart" / "eval"
    if not (folder / "predictions.jsonl").is_file():
        write_eval(
            read_jsonl(out / f"seed{seed}" / "ipdpo" / "round-0" / "heldout_predictions.jsonl"), folder
        )
    return folder.parent


def summary(folder: Path) -> dict[str, float]:
    """Means of the shown metrics, overall and per hop count, from a policy's `eval/predictions.jsonl`."""
    rows = read_jsonl(folder / "eval" / "predictions.jsonl")

    def value(row: dict, key: str) -> float:
        return float(row["searches"]) if key == "searches" else float(row["scores"][key])

    out: dict[str, float] = {}
    for group, members in (
        ("", rows),
        *((f"_{h}", [r for r in rows if r["dataset"] == f"{h}-hop"]) for h in (1, 2)),
    ):
        for key in SHOWN:
            out[key + group] = sum(value(r, key) for r in members) / len(members)
    timing = folder / "seconds.json"
    out["minutes"] = sum(json.loads(timing.read_text()).values()) / 60 if timing.is_file() else float("nan")
    return out


def pair_stats(folder: Path) -> list[dict]:
    """Per round: pairs, and the mean searches and model tokens of chosen vs rejected trajectories."""
    out = []
    for k in range(1, ROUNDS[0] + 1):
        path = folder / f"round-{k}" / "pair_stats.json"
        if path.is_file():
            out.append({"round": k, **json.loads(path.read_text())})
    return out


def pair_table(stats: dict[int, dict[str, list]]) -> str:
    """Per seed, DPO variant and round: pairs by type, searches and model tokens of chosen vs rejected."""
    lines = [
        "| seed | policy | round | pairs (weaker / wrong / malformed) | searches chosen / rejected "
        "| model tokens chosen / rejected |",
        "|---:|---|---:|---|---|---|",
    ]
    for seed, variants in stats.items():
        for name, rounds in variants.items():
            for r in rounds:
                s, t = r["stats"], r["stats"]["by_type"]
                c, j = s["chosen"], s["rejected"]
                lines.append(
                    f"| {seed} | {POLICIES[name][0]} | {r['round']} | {s['pairs']} ({t.get('weaker', 0)} / "
                    f"{t.get('wrong', 0)} / {t.get('malformed', 0)}) | {c['steps']:.2f} / {j['steps']:.2f} | "
                    f"{c['model_tokens']:.1f} / {j['model_tokens']:.1f} |"
                )
    return "\n".join(lines)


def compare(a: Path, b: Path) -> dict:
    """`autorefine compare`'s paired differences B − A (per hop count and overall), as JSON."""
    from autorefine.evaluation.compare import compare_runs, to_json

    return to_json(compare_runs(a / "eval", b / "eval"), a, b, samples=2000, seed=0)


def table(results: dict[int, dict[str, dict]]) -> str:
    """One row per seed and policy."""
    lines = [
        "| seed | policy | EM | F1 | searches (1-hop / 2-hop) | model tokens | refine words | wall min |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for seed, policies in results.items():
        for name, m in policies.items():
            label = "SFT warm start" if name == "warmstart" else POLICIES[name][0]
            wall = "" if m["minutes"] != m["minutes"] else f"{m['minutes']:.1f}"
            lines.append(
                f"| {seed} | {label} | {100 * m['em']:.1f} | {100 * m['f1']:.1f} | {m['searches']:.2f} "
                f"({m['searches_1']:.2f} / {m['searches_2']:.2f}) | {m['model_tokens']:.1f} | "
                f"{m['refine_words']:.1f} | {wall} |"
            )
    return "\n".join(lines)


def differences(comparisons: dict[int, dict[str, dict]]) -> str:
    """IP-DPO − each other policy per seed, overall: EM (points), searches and model tokens with 95% CIs."""
    lines = [
        "| seed | IP-DPO − | EM (points) [95% CI] | searches [95% CI] | model tokens [95% CI] |",
        "|---:|---|---|---|---|",
    ]
    for seed, versus in comparisons.items():
        for name, result in versus.items():
            overall = {d["metric"]: d for d in result["groups"]["all questions"]}
            cells = []
            for metric, scale in (("EM", 100), ("searches/q", 1), ("model tokens", 1)):
                d = overall[metric]
                mark = " *" if d["significant"] else ""
                cells.append(
                    f"{scale * d['difference']:+.2f}{mark} [{scale * d['low']:+.2f}, {scale * d['high']:+.2f}]"
                )
            label = "SFT warm start" if name == "warmstart" else POLICIES[name][0]
            lines.append(f"| {seed} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goals(results: dict[int, dict[str, dict]]) -> list[str]:
    """The issue's goals, met or missed on every seed, with the numbers."""
    out = []
    for seed, p in results.items():
        if not {"ipdpo", "outcome_only", "grpo", "grpo_process"} <= set(p):
            continue
        ip, gr, oo, gp = p["ipdpo"], p["grpo"], p["outcome_only"], p["grpo_process"]
        fewer_searches = 1 - ip["searches"] / gr["searches"]
        fewer_tokens = 1 - ip["model_tokens"] / gr["model_tokens"]
        em_gap = 100 * (ip["em"] - gr["em"])
        out.append(
            f"seed {seed}: vs GRPO searches -{100 * fewer_searches:.0f}% (goal ≥ 40%: "
            f"{'met' if fewer_searches >= 0.4 else 'missed'}), model tokens -{100 * fewer_tokens:.0f}% (goal ≥ 30%: "
            f"{'met' if fewer_tokens >= 0.3 else 'missed'}), EM {em_gap:+.1f} points (goal ≥ -1: "
            f"{'met' if em_gap >= -1 else 'missed'}); vs outcome-only searches {ip['searches']:.2f} vs "
            f"{oo['searches']:.2f} ({'met' if ip['searches'] < oo['searches'] else 'missed'}); process-aware GRPO "
            f"searches {gp['searches']:.2f} (IP-DPO {ip['searches']:.2f}, GRPO {gr['searches']:.2f})"
        )
    return out


def plot(results: dict[int, dict[str, dict]], path: Path) -> None:
    """Held-out EM, searches (1-hop, 2-hop) and model tokens per policy, one marker per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["warmstart", *POLICIES]
    labels = ["SFT warm\nstart", *(POLICIES[n][0].replace(" ", "\n", 1) for n in POLICIES)]
    panels = (("em", "held-out EM (%)", 100), ("searches_1", "searches / one-hop question", 1),
              ("searches_2", "searches / two-hop question", 1), ("model_tokens", "model tokens / question", 1))  # fmt: skip
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    for ax, (key, label, scale) in zip(axes, panels, strict=True):
        for i, (seed, policies) in enumerate(results.items()):
            xs = [j + 0.08 * (i - 1) for j, n in enumerate(names) if n in policies]
            ax.plot(xs, [scale * policies[n][key] for n in names if n in policies], "o", color=f"C{i}",
                    label=f"seed {seed}")  # fmt: skip
        ax.set_xticks(range(len(names)), labels, fontsize=7)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Over-searching warm start, same sampled trajectories: IP-DPO vs outcome-only DPO vs GRPO")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "ipdpo-efficiency")
    parser.add_argument(
        "--questions", type=int, default=64, help="IP-DPO questions per round (sets the budget)"
    )
    parser.add_argument("--policies", nargs="+", choices=sorted(POLICIES), default=list(POLICIES))
    parser.add_argument("--rounds", type=int, default=3, help="IP-DPO rounds (the budget scales with them)")
    parser.add_argument("--model", default=None, help="starting policy (default: the presets' warm start)")
    parser.add_argument("--report-only", action="store_true", help="report what already ran in --out")
    args = parser.parse_args()
    if args.questions * SAMPLES % (GROUP_QUESTIONS * SAMPLES):
        parser.error(f"--questions must be a multiple of {GROUP_QUESTIONS} (GRPO's questions per step)")
    ROUNDS[0] = args.rounds
    if args.model:
        MODEL.append(f"model.name_or_path={args.model}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"load average at start: {load_average()}", flush=True)
    if not args.report_only:
        index = ensure_bm25_index(TASK / "corpus.jsonl", args.out / "multihop-bm25")
        with running_retriever(index) as url:
            for seed in args.seeds:  # one run at a time: wall times stay comparable
                for name in args.policies:
                    print(f"seed {seed}: {name}", flush=True)
                    train(seed, name, url, args.out, args.questions)

    results: dict[int, dict[str, dict]] = {}
    comparisons: dict[int, dict[str, dict]] = {}
    stats: dict[int, dict[str, list]] = {}
    for seed in args.seeds:
        base = args.out / f"seed{seed}"
        if not (base / "ipdpo" / "round-0" / "heldout_predictions.jsonl").is_file():
            continue
        ready = [n for n in POLICIES if (base / n / "eval" / "predictions.jsonl").is_file()]
        folders = {"warmstart": warm_start_eval(seed, args.out), **{n: base / n for n in ready}}
        results[seed] = {n: summary(f) for n, f in folders.items()}
        if "ipdpo" in ready:
            comparisons[seed] = {n: compare(folders[n], folders["ipdpo"]) for n in folders if n != "ipdpo"}
        stats[seed] = {n: pair_stats(base / n) for n in ("ipdpo", "outcome_only") if n in ready}
    print(table(results))
    print()
    print(differences(comparisons))
    print()
    print(pair_table(stats))
    print("\n".join(goals(results)))
    print(f"load average at end: {load_average()}")
    plot(results, args.out / "ipdpo_efficiency.png")
    numbers = {"results": results, "compare": comparisons, "pair_stats": stats}
    (args.out / "ipdpo_efficiency.json").write_text(json.dumps(numbers, indent=2) + "\n", encoding="utf-8")
    print(f"plot: {args.out / 'ipdpo_efficiency.png'}; numbers: {args.out / 'ipdpo_efficiency.json'}")


if __name__ == "__main__":
    main()
