"""Which GRPO settings stay stable on the synthetic task, and whether the guard catches the ones that do not.

    python benchmarks/stability.py [--lrs 3e-5 1e-4 3e-4] [--losses grpo dapo dr_grpo] [--seeds 0 1]
                                   [--steps 30] [--heldout-every 5] [--jobs 2] [--out runs/bench/stability]
    python benchmarks/stability.py --rollback --lrs 3e-4 --losses dapo [...]   # the collapsing setting, rollback on
    python benchmarks/stability.py --report-only                             # table + PNG from finished runs

Every run is `autorefine train-grpo` on `configs/grpo/tiny-cpu.yaml` from the shipped warm start
(`data/synthetic/warmstart`), with one BM25 server shared by all runs, held-out EM (greedy, 300 people never
seen in training) every `--heldout-every` steps, and the default `guard` rules. Grid runs keep every rule at
its default action (`warn`); `--rollback` runs set every rule to `rollback`. A run is *collapsing* when a
held-out evaluation falls ≥ 5 EM points below the best one before it (the warm start included); the detector
*caught* it when any rule fired at most 10 steps after that evaluation. Finished runs are kept and skipped, so
an interrupted benchmark resumes; the table, `stability.json` and `stability.png` cover every run in `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from autorefine.config import GRPORunConfig  # noqa: E402
from autorefine.training.guard import Guard, GuardSettings  # noqa: E402
from benchmarks.synthetic_setup import ensure_index, load_average  # noqa: E402
from testbed.retriever import running_retriever  # noqa: E402

COLLAPSE_DROP = 0.05  # EM points (as a fraction) below the best earlier evaluation
CATCH_WITHIN = 10  # steps after the collapsing evaluation
RULES = [name for name in GRPORunConfig().guard.rules]
# What a run's record keeps of each logged step (the signals any rule could watch, and a few for context).
SIGNAL_PREFIXES = (
    "entropy",
    "health/",
    "rollout/",
    "reward",
    "learning_rate",
    "clip_ratio/",
    "frac_reward",
    "kl",
)


def run_name(lr: float, loss: str, seed: int, rollback: bool) -> str:
    """Folder name of one run."""
    return f"{'rollback' if rollback else 'grid'}-lr{lr:g}-{loss}-seed{seed}"


def train(
    url: str, out: Path, lr: float, loss: str, seed: int, rollback: bool, args: argparse.Namespace
) -> dict:
    """One `train-grpo` run; returns its record (also written to `<run>/record.json`)."""
    run = out / run_name(lr, loss, seed, rollback)
    record_file = run / "record.json"
    if record_file.is_file():
        return json.loads(record_file.read_text(encoding="utf-8"))
    command = [
        sys.executable, "-m", "autorefine.cli", "train-grpo", "--config", "configs/grpo/tiny-cpu.yaml",
        f"retriever.url={url}", f"trainer.output_dir={run}", f"trainer.seed={seed}",
        f"trainer.learning_rate={lr}", f"trainer.loss_type={loss}", f"trainer.max_steps={args.steps}",
        f"heldout.every={args.heldout_every}", "heldout.save_best=true", "trainer.save_strategy=no",
        "trainer.report_to=[]", "logging.sample_table_every=0",
        *([f"guard.{rule}.action=rollback" for rule in RULES] if rollback else []),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    load_before = load_average()
    started = time.perf_counter()
    run.mkdir(parents=True, exist_ok=True)
    with (run / "train.log").open("wb") as log:
        code = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - started
    if code not in (0, 2):  # 2: the guard stopped the run (rollbacks used up), which is a result
        raise RuntimeError(f"{run.name} failed with exit code {code}; see {run / 'train.log'}")
    record = summarize(run, lr, loss, seed, rollback, code, seconds, load_before, load_average())
    record_file.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return record


def _log_history(run: Path) -> list[dict]:
    """Per-step logs: the finished run's trainer_state.json, else the newest checkpoint's (a stopped run)."""
    checkpoints = sorted(
        run.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1])
    )
    for state in [run / "trainer_state.json", *checkpoints[::-1]]:
        if state.is_file():
            return json.loads(state.read_text(encoding="utf-8"))["log_history"]
    return []


def summarize(
    run: Path,
    lr: float,
    loss: str,
    seed: int,
    rollback: bool,
    code: int,
    seconds: float,
    load_before: str,
    load_after: str,
) -> dict:
    """Held-out curve, collapse step, what the guard said and when, and the per-step signals of one run."""
    heldout = [json.loads(line) for line in (run / "heldout.jsonl").read_text().splitlines() if line.strip()]
    curve = [(h["step"], h["em"]) for h in heldout]
    collapse = None
    for i, (step, em) in enumerate(curve[1:], start=1):
        if em <= max(e for _, e in curve[:i]) - COLLAPSE_DROP + 1e-9:
            collapse = step
            break
    guard_log = run / "guard.jsonl"
    events = [json.loads(line) for line in guard_log.read_text().splitlines()] if guard_log.is_file() else []
    alarms = [e for e in events if "rule" in e]
    signals = [
        {"step": h["step"], **{k: v for k, v in h.items() if k.startswith(SIGNAL_PREFIXES)}}
        for h in _log_history(run)
        if "loss" in h
    ]
    return {
        "run": run.name, "lr": lr, "loss": loss, "seed": seed, "rollback": rollback, "exit_code": code,
        "seconds": seconds, "load_before": load_before, "load_after": load_after,
        "curve": curve, "warm_em": curve[0][1], "final_em": curve[-1][1], "best_em": max(e for _, e in curve),
        "collapse_step": collapse,
        "alarms": [{k: a[k] for k in ("rule", "signal", "value", "step", "action", "message")} for a in alarms],
        "rollbacks": [e for e in events if "rollback" in e and "rule" not in e],
        "signals": signals,
    }  # fmt: skip


def replay(record: dict, settings: GuardSettings | None = None) -> list[dict]:
    """The alarms `settings` (default: the current defaults) raise on a grid run's logged signals.

    The guard sees exactly what it saw live: each logged step's values, plus the held-out EM of that step;
    so replaying a grid run with the settings it ran with reproduces its live alarms.
    """
    guard = Guard(settings or GuardSettings())
    heldout = dict(record["curve"])
    guard.observe(0, {"heldout/em": heldout[0]})
    alarms = []
    for logged in record["signals"]:
        values = {k: v for k, v in logged.items() if k != "step"}
        if logged["step"] in heldout:
            values["heldout/em"] = heldout[logged["step"]]
        alarms += [
            {"rule": a.rule, "signal": a.signal, "value": a.value, "step": a.step, "action": a.action}
            for a in guard.observe(logged["step"], values)
        ]
    return alarms


def caught(record: dict) -> bool | None:
    """For a collapsing run, whether some rule fired within CATCH_WITHIN steps after the collapse (or earlier)."""
    if record["collapse_step"] is None:
        return None
    return any(a["step"] <= record["collapse_step"] + CATCH_WITHIN for a in record["alarms"])


def table(records: list[dict]) -> str:
    """One row per run."""
    rows = [
        "| run | lr | loss | seed | EM warm start | EM final | EM best | collapse step | first alarm | "
        "rules fired (first step) | verdict | rollbacks | min |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|---|---|---:|---:|",
    ]
    for r in sorted(records, key=lambda r: (r["rollback"], r["lr"], r["loss"], r["seed"])):
        first: dict[str, int] = {}
        for a in r["alarms"]:
            first.setdefault(a["rule"], a["step"])
        fired = (
            ", ".join(f"{rule} ({step})" for rule, step in sorted(first.items(), key=lambda x: x[1])) or "–"
        )
        first_alarm = min(first.values()) if first else None
        verdict = {None: "stable", True: "caught", False: "**missed**"}[caught(r)]
        if r["collapse_step"] is None and r["alarms"]:
            verdict = "**false alarm**"
        rows.append(
            f"| {'rollback' if r['rollback'] else 'grid'} | {r['lr']:g} | {r['loss']} | {r['seed']} | "
            f"{100 * r['warm_em']:.1f} | {100 * r['final_em']:.1f} | {100 * r['best_em']:.1f} | "
            f"{r['collapse_step'] if r['collapse_step'] is not None else '–'} | "
            f"{first_alarm if first_alarm is not None else '–'} | {fired} | {verdict} | "
            f"{len(r['rollbacks'])} | {r['seconds'] / 60:.1f} |"
        )
    return "\n".join(rows)


def targets(records: list[dict]) -> str:
    """The issue's three targets, checked on every run."""
    grid = [r for r in records if not r["rollback"]]
    collapsing = [r for r in grid if r["collapse_step"] is not None]
    stable = [r for r in grid if r["collapse_step"] is None]
    rolled = [r for r in records if r["rollback"]]
    lines = [
        f"- collapsing runs caught within {CATCH_WITHIN} steps: {sum(bool(caught(r)) for r in collapsing)} of "
        f"{len(collapsing)}",
        f"- stable runs with any alarm: {sum(bool(r['alarms']) for r in stable)} of {len(stable)}",
        f"- rollback runs ending at or above the warm start's EM: "
        f"{sum(r['final_em'] >= r['warm_em'] for r in rolled)} of {len(rolled)}",
    ]
    return "\n".join(lines)


# Variants of the default rules replayed on the grid runs' logged signals (`sensitivity`).
VARIANTS = {
    "defaults": [],
    "per-step rules only (heldout_drop off)": ["guard.heldout_drop.action=off"],
    "per-step rules only, warmup 3, patience 1": [
        "guard.heldout_drop.action=off", "guard.warmup=3",
        *(f"guard.{r}.patience=1" for r in ("entropy_floor", "entropy_fall", "entropy_rise", "malformed_rise",
                                           "length_cap_rise")),
    ],
}  # fmt: skip


def sensitivity(records: list[dict]) -> str:
    """How variants of the default rules would have done on the grid runs (replayed, same logged values)."""
    from autorefine.settings import load_config

    grid = [r for r in records if not r["rollback"]]
    rows = [
        "| rules | collapsing runs caught (≤ 10 steps after) | first alarm − collapse step (mean) | stable runs with an alarm |",
        "|---|---:|---:|---:|",
    ]
    for name, overrides in VARIANTS.items():
        settings = load_config(GRPORunConfig, None, overrides).guard
        caught_n, delays, false_alarms = 0, [], 0
        collapsing = [r for r in grid if r["collapse_step"] is not None]
        for r in grid:
            alarms = replay(r, settings)
            if r["collapse_step"] is None:
                false_alarms += bool(alarms)
            elif alarms and alarms[0]["step"] <= r["collapse_step"] + CATCH_WITHIN:
                caught_n += 1
                delays.append(alarms[0]["step"] - r["collapse_step"])
        mean_delay = f"{sum(delays) / len(delays):+.1f}" if delays else "–"
        rows.append(
            f"| {name} | {caught_n} of {len(collapsing)} | {mean_delay} | "
            f"{false_alarms} of {len(grid) - len(collapsing)} |"
        )
    return "\n".join(rows)


def plot(records: list[dict], path: Path) -> None:
    """Held-out EM per run: one panel per (loss, lr) of the grid, one per loss for rollback runs; last row: the
    entropy of the model's tokens per step, every grid run of one learning rate together."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = [r for r in records if not r["rollback"]]
    rolled = [r for r in records if r["rollback"]]
    losses = sorted({r["loss"] for r in records})
    lrs = sorted({r["lr"] for r in grid})
    cols = max(len(lrs), len({(r["lr"], r["loss"]) for r in rolled}), 1)
    rows = len(losses) + (1 if rolled else 0) + 1
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.6 * rows), sharex=True, squeeze=False)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red"]

    def draw(ax, runs: list[dict], title: str) -> None:
        for r in runs:
            color = colors[r["seed"] % len(colors)]
            steps, ems = zip(*r["curve"], strict=True)
            ax.plot(steps, [100 * e for e in ems], marker="o", ms=3, color=color, label=f"seed {r['seed']}")
            if r["collapse_step"] is not None:
                ax.axvline(r["collapse_step"], color=color, ls=":", lw=1)
            for a in r["alarms"][:1]:
                ax.plot([a["step"]], [3], marker="v", color=color, ms=8)
            for rb in r["rollbacks"]:
                ax.plot([rb["step"]], [8], marker="x", color=color, ms=7)
        ax.set_title(title, fontsize=9)
        ax.set_ylim(0, 65)
        ax.set_ylabel("held-out EM (%)", fontsize=8)
        ax.grid(alpha=0.3)

    for i, loss in enumerate(losses):
        for j, lr in enumerate(lrs):
            draw(axes[i][j], [r for r in grid if r["loss"] == loss and r["lr"] == lr], f"{loss}, lr {lr:g}")
    if rolled:
        for j, (lr, loss) in enumerate(sorted({(r["lr"], r["loss"]) for r in rolled})):
            runs = [r for r in rolled if r["lr"] == lr and r["loss"] == loss]
            draw(axes[len(losses)][j], runs, f"{loss}, lr {lr:g}, rollback on")
    for j, lr in enumerate(lrs):
        ax = axes[-1][j]
        for r in (r for r in grid if r["lr"] == lr):
            steps = [s["step"] for s in r["signals"] if "entropy" in s]
            ax.plot(steps, [s["entropy"] for s in r["signals"] if "entropy" in s],
                    color=colors[losses.index(r["loss"]) % len(colors)], ls="-" if r["seed"] == 0 else "--",
                    lw=1, label=f"{r['loss']} seed {r['seed']}")  # fmt: skip
        ax.set_title(f"entropy of model tokens (TRL), lr {lr:g}", fontsize=9)
        ax.set_ylabel("nats", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes.flat:
        if not ax.has_data():
            ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("GRPO step")
    axes[0][0].legend(fontsize=7)
    axes[-1][0].legend(fontsize=6)
    fig.suptitle(
        "Held-out EM; dotted: collapse (−5 points from best), ▼ first guard alarm, × rollback", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-5, 1e-4, 3e-4])
    parser.add_argument("--losses", nargs="+", default=["grpo", "dapo", "dr_grpo"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--heldout-every", type=int, default=5)
    parser.add_argument("--rollback", action="store_true", help="every guard rule set to rollback")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "stability")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    if not args.report_only:
        grid = [(lr, loss, seed) for lr in args.lrs for loss in args.losses for seed in args.seeds]
        print(f"{len(grid)} runs, load {load_average()}", flush=True)
        with running_retriever(ensure_index()) as url, ThreadPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(train, url, args.out, *cell, args.rollback, args) for cell in grid]
            for future in futures:
                r = future.result()
                print(f"{r['run']}: EM {r['warm_em']:.3f} → {r['final_em']:.3f}, collapse {r['collapse_step']}, "
                      f"alarms {[(a['rule'], a['step']) for a in r['alarms']]}, {r['seconds'] / 60:.1f} min, "
                      f"load {r['load_before']} → {r['load_after']}", flush=True)  # fmt: skip

    records = []
    for path in sorted(args.out.glob("*/record.json")):
        # Summarized again from the run folder, so every record follows this script's `summarize`.
        r = json.loads(path.read_text())
        records.append(
            summarize(path.parent, r["lr"], r["loss"], r["seed"], r["rollback"], r["exit_code"], r["seconds"],
                      r["load_before"], r["load_after"])
        )  # fmt: skip
    print(table(records))
    print(targets(records))
    print(sensitivity(records))
    replayed = [
        r["run"]
        for r in records
        if not r["rollback"]
        and [(a["rule"], a["step"]) for a in replay(r)] != [(a["rule"], a["step"]) for a in r["alarms"]]
    ]
    print(f"grid runs whose live alarms differ from a replay with the current defaults: {replayed or 'none'}")  # fmt: skip
    plot(records, args.out / "stability.png")
    (args.out / "stability.json").write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    print(f"curves: {args.out / 'stability.png'}")


if __name__ == "__main__":
    main()
