"""The proof of issue 21: does RL lift SmolLM2-135M-Instruct beyond its SFT warm start on 2 CPU cores?

    OMP_WAIT_POLICY=PASSIVE python benchmarks/smollm2_rl.py --seeds 0 1          # run (resumes where it stopped)
    python benchmarks/smollm2_rl.py --seeds 0 1 --report-only                     # table, JSON and PNG of what ran

From the shipped SFT LoRA adapter (data/adapters/smollm2-sft-lora) merged once over the converted base
(`runs/models/smollm2`, `autorefine fetch-model smollm2-135m-instruct`) into `<out>/warmstart/model`, per seed:

1. GRPO: `autorefine train-grpo --config configs/grpo/smollm2-hotpotqa-lora.yaml` (LoRA, 4 questions × 4 samples
   per step) on the first `--train-questions` demo HotpotQA training questions, difficulty-filtered first
   (`data.difficulty_filter`, K = `--filter-samples` samples per question with the warm start; kept: solved
   sometimes, not always), for `--steps` optimizer steps, with a greedy held-out evaluation of the first
   `--heldout-limit` dev questions every `--heldout-every` steps (`heldout.*`) and a checkpoint every
   `--save-every` steps; an interrupted run goes on with `--resume latest`.
2. IP-DPO: `autorefine train-ipdpo --config configs/ipdpo/smollm2-hotpotqa-lora.yaml` (LoRA, the demo questions'
   `metadata.evidence` feeds the process score) from the same warm start, `--ipdpo-rounds` rounds, on the same
   number of sampled trajectories as GRPO's training (steps × trajectories per step = rounds × questions per
   round × 8); the difficulty filter's samples are reported beside it, not counted. Resumes inside rounds.

Every final policy (and the warm start, and the zero-shot base) is evaluated with `autorefine evaluate` on the
100 demo dev questions (the presets' rollout limits, greedy), and compared with the warm start by
`autorefine.evaluation.compare` (paired bootstrap, 95% intervals). Target: valid format +10 points and F1 +3
points over the warm start, each interval excluding 0, on every seed, GRPO in ≤ 3 hours per seed on 2 idle cores.
Reported: the table, the differences with their intervals, the wall time and where it went (rollouts,
updates, held-out evaluations, the rest: filter, loading, saving), per-step curves as a PNG (reward, valid
format, flat-group share, searches, model tokens, held-out F1 and valid format, step time), all numbers as
JSON (`<out>/smollm2_rl.{md,json,png}`).

Resume: each finished stage is recorded in `<out>/stages/`; rerun the same command after an interruption. A
training stage that did not finish resumes from its last checkpoint (GRPO, every `--save-every` steps) or its
last finished stage inside the round (IP-DPO); wall times add up over the attempts (`<run>.wall.json`).
To train a finished GRPO run longer, delete its two records (`seedN-grpo.json`, `seedN-eval-grpo.json`) and
rerun with more `--steps`: it resumes from its last checkpoint (the constant learning rate makes that exact).

Time, measured by the smoke test (2 cores, load 3-4 from another job, so upper bounds): a rollout costs
~4 s and an update ~9 s per trajectory, so a preset step of 16 trajectories takes ~3.5 min (70 s rollout,
150 s update); the filter ~2.4 s per trajectory (batched); a held-out evaluation ~3.5 s per question. The
defaults (200 questions × K 4 = 800 filter trajectories ≈ 32 min, 48 steps, 7 held-out evaluations of 100
questions) need ~4 h per seed at that load and should fit 3 h on idle cores (a step of ~2.5 min); if the first
steps log `time/step_s` above ~180 s on an idle machine, use `--steps 40` (or `--heldout-limit 50`).
Extra settings go to the runs with `--grpo-set KEY=VALUE ...` and `--ipdpo-set KEY=VALUE ...` (e.g.
`trainer.learning_rate=1e-4`, the first lever if nothing moves). An IP-DPO round with fewer than
`pairs.min_pairs` pairs (preset: 8) stops the script with train-ipdpo's reasons; rerun with other `pairs.*`
settings and it rebuilds the pairs from the same samples. The smoke test (~10 min; GRPO 1 question × 4 per
step):

    python benchmarks/smollm2_rl.py --out runs/bench/smollm2-rl-smoke --seeds 0 --steps 2 --train-questions 8 \
        --heldout-every 1 --heldout-limit 8 --save-every 1 --limit 8 --ipdpo-rounds 1 --ipdpo-questions 4 \
        --grpo-set trainer.per_device_train_batch_size=4 trainer.gradient_accumulation_steps=1 \
        trainer.steps_per_generation=1 --ipdpo-set pairs.min_pairs=1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.real_model import (  # noqa: E402
    CLI,
    DEV,
    GRPO_CONFIG,
    INDEX,
    IPDPO_CONFIG,
    MODEL_DIR,
    child_environment,
    evaluate,
    history,
    prepare,
    run,
    stage,
)
from benchmarks.synthetic_setup import load_average, read_jsonl  # noqa: E402
from testbed.retriever import running_retriever  # noqa: E402

TRAIN = REPO / "data" / "demo" / "hotpotqa_train.jsonl"
ADAPTER = REPO / "data" / "adapters" / "smollm2-sft-lora"
TARGETS = {"valid format": 0.10, "F1": 0.03}  # over the warm start, each 95% interval excluding 0
HOURS_PER_SEED = 3.0
# Per-step curves: label → key in the GRPO trainer's log.
CURVES = {
    "reward": "reward",
    "valid format": "rewards/format/mean",
    "F1": "rewards/f1/mean",
    "flat groups": "frac_reward_zero_std",
    "searches": "rollout/searches",
    "model tokens": "rollout/model_tokens",
    "step s": "time/step_s",
    "rollout s": "time/rollout_s",
    "update s": "time/update_s",
}
# The PNG's panels: per-step curves (label in CURVES, scale), then held-out F1, valid format, step time.
PANELS = (("reward", 1), ("valid format", 100), ("flat groups", 1), ("searches", 1), ("model tokens", 1))
TITLES = ("training reward (F1 + refine bonus)", "training valid format (%)", "flat-group share",
          "searches / trajectory", "model tokens / trajectory", "held-out F1", "held-out valid format (%)",
          "seconds per step: rollout, update")  # fmt: skip
LABELS = {"zero-shot": "zero-shot base", "warmstart": "SFT warm start"}


# -- budget ------------------------------------------------------------------------------------------------


def settings(preset: str, overrides: list[str]) -> dict[str, Any]:
    """A preset's YAML with the `KEY=VALUE` overrides of the command line applied (dotted keys)."""
    config = yaml.safe_load((REPO / preset).read_text(encoding="utf-8"))
    for item in overrides:
        key, _, value = item.partition("=")
        *parents, last = key.split(".")
        node = config
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    return config


def budget(args: argparse.Namespace) -> dict[str, int]:
    """Trajectories GRPO trains on, and the IP-DPO questions per round that sample as many."""
    trainer = settings(GRPO_CONFIG, args.grpo_set)["trainer"]
    per_step = trainer["per_device_train_batch_size"] * trainer["gradient_accumulation_steps"]
    trajectories = args.steps * per_step
    samples = settings(IPDPO_CONFIG, args.ipdpo_set)["sampling"]["samples_per_question"]
    questions = args.ipdpo_questions or max(trajectories // (args.ipdpo_rounds * samples), 1)
    return {
        "grpo_trajectories_per_step": per_step,
        "grpo_questions_per_step": per_step // trainer["num_generations"],
        "grpo_trajectories": trajectories,
        "filter_trajectories": args.train_questions * args.filter_samples,
        "ipdpo_questions_per_round": questions,
        "ipdpo_samples_per_question": samples,
        "ipdpo_trajectories": args.ipdpo_rounds * questions * samples,
    }


# -- the runs ----------------------------------------------------------------------------------------------


def merge_warm_start(base: Path, adapter: Path, out: Path) -> dict[str, Any]:
    """The SFT adapter merged over the base into a plain model folder (what `evaluate --adapter` loads)."""
    from autorefine.modeling import apply_adapter, load_policy, load_tokenizer

    started = time.perf_counter()
    # Merged in float32 like `--adapter`: the same weights evaluation and both trainers start from.
    apply_adapter(load_policy(base, dtype="float32"), adapter).save_pretrained(str(out))
    load_tokenizer(base).save_pretrained(str(out))
    return {
        "model": str(out),
        "base": str(base),
        "adapter": str(adapter),
        "wall_s": time.perf_counter() - started,
    }


def train_subset(n: int, out: Path) -> Path:
    """The first `n` demo training questions, the ones the difficulty filter samples."""
    path = out / f"train-{n}.jsonl"
    if not path.is_file():
        lines = TRAIN.read_text(encoding="utf-8").splitlines()[:n]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def attempts(run_dir: Path) -> list[dict[str, Any]]:
    """The recorded attempts of a training run (one per launch: seconds, resumed or not, finished or not)."""
    path = run_dir.with_suffix(".wall.json")
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []


def timed_attempt(command: list[str], run_dir: Path, resumed: bool) -> float:
    """Run a training command; its wall time is added to `<run>.wall.json` even when it fails or is killed."""
    done = attempts(run_dir)
    started, finished = time.perf_counter(), False
    try:
        run(command, run_dir.parent / f"{run_dir.name}-{len(done) + 1}.log")
        finished = True
    finally:  # a SIGTERM unwinds here too (running_retriever turns it into an exception)
        seconds = time.perf_counter() - started
        done.append({"seconds": seconds, "resumed": resumed, "finished": finished, "load": load_average()})
        run_dir.with_suffix(".wall.json").write_text(json.dumps(done, indent=2) + "\n", encoding="utf-8")
    return sum(a["seconds"] for a in done)


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's `checkpoint-N` folders, oldest first."""
    found = [p for p in run_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def train_grpo(seed: int, args: argparse.Namespace, url: str, warm: Path, train: Path) -> dict[str, Any]:
    """GRPO from the warm start on the filtered questions, resumed from its last checkpoint if it has one."""
    run_dir = args.out / f"seed{seed}" / "grpo"
    command = [*CLI, "train-grpo", "--config", GRPO_CONFIG, f"model.name_or_path={warm}", f"retriever.url={url}",
               f"trainer.output_dir={run_dir}", f"trainer.seed={seed}", f"trainer.max_steps={args.steps}",
               f"data.train_file={train}", "data.difficulty_filter.enabled=true",
               f"data.difficulty_filter.samples={args.filter_samples}",
               f"heldout.file={DEV}", f"heldout.limit={args.heldout_limit}", f"heldout.every={args.heldout_every}",
               "heldout.save_best=false",  # the dev questions judge the final policy: none is picked on them
               "trainer.save_strategy=steps", f"trainer.save_steps={args.save_every}", "trainer.save_total_limit=2",
               *args.grpo_set]  # fmt: skip
    resumed = bool(checkpoints(run_dir))
    wall = timed_attempt([*command, "--resume", "latest"] if resumed else command, run_dir, resumed)
    return {"final": str(run_dir / "final"), "wall_s": wall, "attempts": len(attempts(run_dir))}


def train_ipdpo(
    seed: int, args: argparse.Namespace, url: str, warm: Path, questions: int, train: Path
) -> dict[str, Any]:
    """IP-DPO rounds from the warm start on GRPO's trajectory budget and question pool; resumed inside rounds."""
    run_dir = args.out / f"seed{seed}" / "ipdpo"
    # The questions GRPO's filter chose from (train-ipdpo has no difficulty filter: it samples them all).
    command = [*CLI, "train-ipdpo", "--config", IPDPO_CONFIG, f"model.name_or_path={warm}", f"retriever.url={url}",
               f"trainer.output_dir={run_dir}", f"trainer.seed={seed}", f"rounds={args.ipdpo_rounds}",
               f"data.train_file={train}",
               f"sampling.questions_per_round={questions}", f"heldout.limit={args.heldout_limit}",
               *args.ipdpo_set]  # fmt: skip
    resumed = any(run_dir.glob("round-*"))  # train-ipdpo refuses a folder with rounds unless resumed
    wall = timed_attempt([*command, "--resume"] if resumed else command, run_dir, resumed)
    final = run_dir / f"round-{args.ipdpo_rounds}"
    return {"final": str(final), "wall_s": wall, "attempts": len(attempts(run_dir))}


def run_all(args: argparse.Namespace, plan: dict[str, int]) -> None:
    """Every stage not recorded yet: warm start, evaluations, GRPO and IP-DPO per seed, one at a time."""
    out, limit = args.out, args.limit
    prepare(args.model_dir, args.index, out)
    merged = stage(
        out, "warmstart", lambda: merge_warm_start(args.model_dir, args.adapter, out / "warmstart" / "model")
    )
    warm = Path(merged["model"])
    train = train_subset(args.train_questions, out)
    with running_retriever(args.index, log=(out / "retriever.log").open("ab")) as url:
        if args.zero_shot:
            stage(
                out,
                "eval-zero-shot",
                lambda: evaluate(args.model_dir, out / "eval" / "zero-shot", url, limit),
            )
        stage(out, "eval-warmstart", lambda: evaluate(warm, out / "eval" / "warmstart", url, limit))
        for method in args.methods:  # GRPO on every seed first, then IP-DPO: the order the issue asks for
            for seed in args.seeds:
                print(f"seed {seed}: {method} (load {load_average()})", flush=True)
                if method == "grpo":
                    record = stage(
                        out, f"seed{seed}-grpo", lambda s=seed: train_grpo(s, args, url, warm, train)
                    )
                else:
                    record = stage(
                        out,
                        f"seed{seed}-ipdpo",
                        lambda s=seed: train_ipdpo(
                            s, args, url, warm, plan["ipdpo_questions_per_round"], train
                        ),
                    )
                stage(
                    out,
                    f"seed{seed}-eval-{method}",
                    lambda r=record, s=seed, m=method: evaluate(
                        Path(r["final"]), out / f"seed{s}" / f"eval-{m}", url, limit
                    ),
                )


# -- reading what ran --------------------------------------------------------------------------------------


def grpo_log(run_dir: Path) -> list[dict[str, Any]]:
    """The GRPO run's log history: the finished run's, or its newest checkpoint's while it is unfinished."""
    if (run_dir / "trainer_state.json").is_file():
        return history(run_dir)
    saved = checkpoints(run_dir)
    return history(saved[-1]) if saved else []


def heldout_curve(run_dir: Path) -> list[dict[str, Any]]:
    """Held-out evaluations by step (a resumed run re-evaluates some steps: the last one of each counts)."""
    path = run_dir / "heldout.jsonl"
    by_step = {row["step"]: row for row in read_jsonl(path)} if path.is_file() else {}
    return [by_step[k] for k in sorted(by_step)]


def grpo_result(run_dir: Path) -> dict[str, Any]:
    """Per-step curves, held-out evaluations, the filter's summary and the wall-time split of one GRPO run."""
    steps = [
        {"step": h["step"], **{label: float(h[key]) for label, key in CURVES.items() if key in h}}
        for h in grpo_log(run_dir)
        if "reward" in h
    ]
    heldout = heldout_curve(run_dir)
    wall = sum(a["seconds"] for a in attempts(run_dir))
    split = {
        "rollout_s": sum(s.get("rollout s", 0.0) for s in steps),
        "update_s": sum(s.get("update s", 0.0) for s in steps),
        "heldout_s": sum(h.get("seconds", 0.0) for h in heldout),
    }
    split["other_s"] = max(wall - sum(split.values()), 0.0)  # the filter, loading, saving, lost work
    summaries = sorted((run_dir / "difficulty").glob("*/summary.json"))
    filtered = json.loads(summaries[-1].read_text(encoding="utf-8")) if summaries else {}
    filtered.pop("kept_ids", None)
    return {
        "steps": steps,
        "heldout": heldout,
        "wall_s": wall,
        "split": split,
        "attempts": attempts(run_dir),
        "filter": filtered,
    }


def ipdpo_result(run_dir: Path) -> dict[str, Any]:
    """Per-round samples, pairs, DPO metrics and held-out evaluations of one IP-DPO run, and its wall time."""
    path = run_dir / "rounds.jsonl"
    rounds = read_jsonl(path) if path.is_file() else []
    keep = ("round", "samples", "heldout", "seconds")
    return {
        "rounds": [
            {
                **{k: r[k] for k in keep if k in r},
                "pairs": r.get("pairs", {}).get("pairs"),
                "dpo": r.get("dpo", {}),
            }
            for r in rounds
        ],
        "wall_s": sum(a["seconds"] for a in attempts(run_dir)),
        "attempts": attempts(run_dir),
    }


def metrics(folder: Path) -> dict[str, Any] | None:
    """An evaluation's means on the dev questions, or None when it has not run."""
    path = folder / "metrics.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))["datasets"]["hotpotqa_dev"]


def versus_warm_start(out: Path, folder: Path) -> dict[str, Any]:
    """`autorefine compare` of the warm start (A) and a trained policy (B): paired differences with 95% CIs."""
    from autorefine.evaluation.compare import compare_runs, to_json

    warm = out / "eval" / "warmstart"
    result = to_json(compare_runs(warm, folder), warm, folder, samples=2000, seed=0)
    # One dataset: its group is the overall comparison.
    return {d["metric"]: d for d in next(iter(result["groups"].values()))}


def collect(args: argparse.Namespace, plan: dict[str, int]) -> dict[str, Any]:
    """Everything that ran in `--out`: evaluations, comparisons, training curves and wall times."""
    out = args.out
    evaluations = {name: metrics(out / "eval" / name) for name in ("zero-shot", "warmstart")}
    results: dict[str, Any] = {"budget": plan, "evaluations": {}, "compare": {}, "training": {}}
    results["evaluations"] = {k: v for k, v in evaluations.items() if v}
    for method in ("grpo", "ipdpo"):
        for seed in args.seeds:
            name, run_dir = f"{method} seed {seed}", out / f"seed{seed}" / method
            if not run_dir.is_dir():
                continue
            results["training"][name] = grpo_result(run_dir) if method == "grpo" else ipdpo_result(run_dir)
            folder = out / f"seed{seed}" / f"eval-{method}"
            if (m := metrics(folder)) is not None:
                results["evaluations"][name] = m
                if evaluations["warmstart"]:
                    results["compare"][name] = versus_warm_start(out, folder)
    return results


# -- the report --------------------------------------------------------------------------------------------


def interval(d: dict[str, Any], scale: float) -> str:
    """A difference with its 95% interval (`*` when the interval excludes 0)."""
    mark = " *" if d["significant"] else ""
    return f"{scale * d['difference']:+.1f}{mark} [{scale * d['low']:+.1f}, {scale * d['high']:+.1f}]"


def table(results: dict[str, Any]) -> str:
    """One row per policy: dev means, and the paired differences from the warm start."""
    lines = [
        "| policy | EM | F1 | valid format | searches/q | model tokens | Δ EM [95% CI] | Δ F1 [95% CI] "
        "| Δ valid format [95% CI] | train min |",
        "|---|---:|---:|---:|---:|---:|---|---|---|---:|",
    ]
    for name, m in results["evaluations"].items():
        label = LABELS.get(name, name.replace("grpo", "GRPO").replace("ipdpo", "IP-DPO"))
        d = results["compare"].get(name)
        deltas = [interval(d[k], 100) if d else "" for k in ("EM", "F1", "valid format")]
        training = results["training"].get(name)
        minutes = f"{training['wall_s'] / 60:.0f}" if training else ""
        lines.append(
            f"| {label} | {100 * m['em']:.1f} | {100 * m['f1']:.1f} | {100 * m['format']:.1f} | "
            f"{m['searches']:.2f} | {m['model_tokens']:.0f} | {' | '.join(deltas)} | {minutes} |"
        )
    return "\n".join(lines)


def time_lines(results: dict[str, Any]) -> list[str]:
    """Where each training run's wall time went."""
    lines = []
    for name, t in results["training"].items():
        head = f"{name}: {t['wall_s'] / 60:.1f} min over {len(t['attempts'])} launch(es)"
        if "split" in t:
            s, n = t["split"], max(len(t["steps"]), 1)
            f = t["filter"]
            lines.append(
                f"{head}; {len(t['steps'])} steps: rollouts {s['rollout_s'] / 60:.1f} min, updates "
                f"{s['update_s'] / 60:.1f} min ({(s['rollout_s'] + s['update_s']) / n:.0f} s per step), held-out "
                f"{s['heldout_s'] / 60:.1f} min ({len(t['heldout'])} evaluations), rest {s['other_s'] / 60:.1f} min "
                f"(filter: kept {f.get('kept', '?')} of {f.get('questions', '?')}, flat share "
                f"{f.get('flat_share', float('nan')):.2f}, loading, saving)"
            )
        else:
            rounds = [r for r in t["rounds"] if r["round"] > 0]
            per = ", ".join(
                f"round {r['round']} {r['seconds'] / 60:.1f} min ({r['pairs']} pairs)" for r in rounds
            )
            lines.append(f"{head}; {per}")
    return lines


def goals(results: dict[str, Any]) -> list[str]:
    """The issue's targets per policy: met or missed, by how much."""
    lines = []
    for name, d in results["compare"].items():
        parts = []
        for metric, target in TARGETS.items():
            x = d[metric]
            met = x["difference"] >= target and x["low"] > 0
            parts.append(
                f"{metric} {100 * x['difference']:+.1f} points (target +{100 * target:.0f}, CI low "
                f"{100 * x['low']:+.1f}: {'met' if met else 'missed'})"
            )
        training = results["training"].get(name, {})
        if name.startswith("grpo") and training:
            hours = training["wall_s"] / 3600
            parts.append(
                f"{hours:.2f} h ({'within' if hours <= HOURS_PER_SEED else 'over'} {HOURS_PER_SEED:.0f} h)"
            )
        lines.append(f"{name}: " + "; ".join(parts))
    return lines


def moving_mean(values: list[float], window: int = 5) -> list[float]:
    """Trailing mean over `window` values: per-step rewards of 4 questions are noisy."""
    out = []
    for i in range(len(values)):
        recent = values[max(0, i - window + 1) : i + 1]
        out.append(sum(recent) / len(recent))
    return out


def plot(results: dict[str, Any], plan: dict[str, int], path: Path) -> None:
    """Per-step GRPO curves per seed, with IP-DPO's held-out evaluations at equal sampled trajectories."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    ax = list(axes.flat)
    # IP-DPO round k has sampled k × questions × samples trajectories: drawn at the GRPO step with as many.
    per_round = plan["ipdpo_questions_per_round"] * plan["ipdpo_samples_per_question"]
    step_of_round = per_round / plan["grpo_trajectories_per_step"]
    for name, t in sorted(results["training"].items()):
        seed = name.split()[-1]
        color = f"C{seed}"
        if "steps" in t:
            xs = [s["step"] for s in t["steps"]]
            for panel, (label, scale) in zip(ax, PANELS, strict=False):
                ys = [scale * s.get(label, float("nan")) for s in t["steps"]]
                panel.plot(xs, ys, color=color, alpha=0.25)
                panel.plot(xs, moving_mean(ys), color=color, label=f"GRPO seed {seed} (mean of 5)")
            h = t["heldout"]
            for panel, key in ((ax[5], "f1"), (ax[6], "format")):
                ys = [100 * r[key] for r in h]
                panel.plot([r["step"] for r in h], ys, "o-", color=color, label=f"GRPO seed {seed}")
            for key, style in (("rollout s", "-"), ("update s", "--")):
                ys = [s.get(key, float("nan")) for s in t["steps"]]
                ax[7].plot(xs, ys, style, color=color, label=f"{key[:-2]}, seed {seed}")
        else:
            rounds = [r for r in t["rounds"] if r.get("heldout")]
            xs = [step_of_round * r["round"] for r in rounds]
            for panel, key in ((ax[5], "f1"), (ax[6], "format")):
                ys = [100 * r["heldout"].get(key, float("nan")) for r in rounds]
                panel.plot(xs, ys, "s--", color=color, label=f"IP-DPO seed {seed}")
    for panel, title in zip(ax, TITLES, strict=True):
        panel.set_title(title, fontsize=9)
        panel.set_xlabel("GRPO step (IP-DPO rounds at equal sampled trajectories)", fontsize=7)
        panel.grid(alpha=0.3)
        if panel.lines:
            panel.legend(fontsize=6)
    fig.suptitle("SmolLM2-135M from the SFT warm start: GRPO (LoRA, difficulty-filtered) and IP-DPO")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(args: argparse.Namespace, plan: dict[str, int]) -> None:
    """Print and write the table, the targets, the wall times, the curves and every number."""
    results = collect(args, plan)
    results["load_end"] = load_average()
    lines = [
        table(results),
        "",
        "`*`: the 95% paired-bootstrap interval (`autorefine compare`, 2000 resamples) excludes 0; Δ in points.",
        "",
        f"Budget: GRPO {args.steps} steps × {plan['grpo_trajectories_per_step']} trajectories = "
        f"{plan['grpo_trajectories']} (+ {plan['filter_trajectories']} for the difficulty filter); IP-DPO "
        f"{args.ipdpo_rounds} rounds × {plan['ipdpo_questions_per_round']} questions × "
        f"{plan['ipdpo_samples_per_question']} = {plan['ipdpo_trajectories']}",
        *time_lines(results),
        *goals(results),
    ]
    text = "\n".join(lines)
    print(text)
    (args.out / "smollm2_rl.md").write_text(text + "\n", encoding="utf-8")
    (args.out / "smollm2_rl.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    if results["training"]:
        plot(results, plan, args.out / "smollm2_rl.png")
    print(f"written: {args.out / 'smollm2_rl.md'}, .json, .png")


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "smollm2-rl")
    parser.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    parser.add_argument("--index", type=Path, default=INDEX)
    parser.add_argument("--adapter", type=Path, default=ADAPTER, help="the SFT LoRA adapter (the warm start)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--methods", nargs="+", choices=["grpo", "ipdpo"], default=["grpo", "ipdpo"])
    parser.add_argument("--steps", type=int, default=48, help="GRPO optimizer steps (sets both budgets)")
    parser.add_argument(
        "--train-questions", type=int, default=200, help="training questions the filter samples"
    )
    parser.add_argument("--filter-samples", type=int, default=4, help="K samples per question for the filter")
    parser.add_argument(
        "--heldout-every", type=int, default=8, help="GRPO steps between held-out evaluations"
    )
    parser.add_argument(
        "--heldout-limit", type=int, default=100, help="dev questions of the held-out evaluations"
    )
    parser.add_argument(
        "--save-every", type=int, default=2, help="GRPO steps between checkpoints (resume points)"
    )
    parser.add_argument("--ipdpo-rounds", type=int, default=3)
    parser.add_argument(
        "--ipdpo-questions", type=int, help="IP-DPO questions per round (default: GRPO's budget)"
    )
    parser.add_argument(
        "--limit", type=int, help="final evaluations on the first N dev questions (default: 100)"
    )
    parser.add_argument("--no-zero-shot", dest="zero_shot", action="store_false", help="skip the base model")
    parser.add_argument(
        "--grpo-set", nargs="*", default=[], metavar="KEY=VALUE", help="more train-grpo settings"
    )
    parser.add_argument(
        "--ipdpo-set", nargs="*", default=[], metavar="KEY=VALUE", help="more train-ipdpo settings"
    )
    parser.add_argument("--report-only", action="store_true", help="report what already ran in --out")
    args = parser.parse_args()
    plan = budget(args)
    child_environment()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args.out = args.out.resolve()  # the commands run from the repository root
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"budget: {plan}; load {load_average()}", flush=True)
    if not args.report_only:
        run_all(args, plan)
    report(args, plan)


if __name__ == "__main__":
    main()
