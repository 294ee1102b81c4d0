"""A real pretrained chat model on a laptop: SmolLM2-135M-Instruct through evaluation, SFT (LoRA and full), GRPO.

    python benchmarks/real_model.py [--out runs/bench/real-model] [--sft-steps 16] [--grpo-steps 10]
                                    [--ipdpo-questions 32] [--limit N]

Every stage runs the public command a user runs (`autorefine fetch-model`, `evaluate`, `train-sft`,
`train-grpo`, `train-ipdpo`), on the demo HotpotQA questions with the MiniLM retriever over the demo corpus:

1. fetch and convert the model (reused when `runs/models/smollm2` already holds a verified copy);
2. zero-shot evaluation of the 100 dev questions with retrieval, and the no-retrieval baseline;
3. `train-sft` on gold-like traces of the 400 training questions, LoRA and full fine-tuning, each evaluated;
4. `train-grpo` with LoRA from the better warm start (by held-out F1), evaluated; per-step reward, valid-format
   rate, searches, tokens and time come from the trainer's log;
5. one IP-DPO round (`train-ipdpo`, LoRA) from the same warm start as GRPO, evaluated: samples, pairs and the
   DPO epoch's metrics come from the round's files.

Laptop budgets everywhere: one search with the top-2 documents (cut to 256 tokens), 64 new tokens per turn.
Prints the tables that go into BENCHMARKS.md and writes them with every number as JSON. Each finished stage
is recorded in `<out>/stages/`: rerun the same command after an interruption and it goes on from there.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.synthetic_setup import load_average  # noqa: E402
from testbed.retriever import running_retriever  # noqa: E402

CLI = [sys.executable, "-m", "autorefine.cli"]
DEV = REPO / "data/demo/hotpotqa_dev.jsonl"
MODEL_DIR = REPO / "runs" / "models" / "smollm2"  # `autorefine fetch-model smollm2-135m-instruct`
INDEX = REPO / "runs" / "index" / "demo-minilm"  # MiniLM over the demo corpus
SFT_CONFIG = "configs/sft/smollm2-hotpotqa.yaml"
GRPO_CONFIG = "configs/grpo/smollm2-hotpotqa-lora.yaml"
IPDPO_CONFIG = "configs/ipdpo/smollm2-hotpotqa-lora.yaml"
# The rollout limits of the two presets above, for `autorefine evaluate`.
LIMITS = ["--max-turns", "1", "--max-new-tokens", "64", "--max-obs-tokens", "256",
          "--max-completion-tokens", "512", "--topk", "2"]  # fmt: skip


def run(command: list[str], log: Path) -> float:
    """Run a command from the repository root with its output in `log`; returns its wall time."""
    print(f"$ {' '.join(command)}", flush=True)
    started = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w", encoding="utf-8") as out:
        result = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"{command[3]} failed (exit {result.returncode}); end of {log}:\n{tail}")
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB → GiB, largest child so far
    print(
        f"  {seconds / 60:.1f} min (load {load_average()}; largest process so far {peak:.1f} GiB)", flush=True
    )
    return seconds


def stage(out: Path, name: str, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one stage once: its record is kept in out/stages/, so a rerun after a crash resumes after it.

    (On a shared machine another job's memory can get a training process OOM-killed hours into a run.)
    """
    path = out / "stages" / f"{name}.json"
    if path.is_file():
        print(f"{name}: done in an earlier run ({path})", flush=True)
        return json.loads(path.read_text(encoding="utf-8"))
    record = work()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def child_environment() -> None:
    """Defaults every command this benchmark runs inherits."""
    # A shared machine stalls spinning OpenMP threads; W&B has no network here.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("WANDB_MODE", "offline")


def prepare(model_dir: Path, index: Path, logs: Path) -> dict[str, Any]:
    """The converted model (`fetch-model`, reused when verified) and the MiniLM demo index; fetch timings."""
    run([*CLI, "fetch-model", "smollm2-135m-instruct", "--out", str(model_dir)], logs / "fetch.log")
    if not (index / "manifest.json").is_file():
        run([sys.executable, "-m", "retriever_server.cli", "build", "--corpus", "data/demo/corpus.jsonl",
             "--out", str(index)], logs / "index.log")  # fmt: skip
    return json.loads((model_dir / "provenance.json").read_text(encoding="utf-8"))["timings_s"]


def evaluate(model: Path, out: Path, url: str | None, limit: int | None) -> dict[str, Any]:
    """`autorefine evaluate` on the dev questions (with retrieval, or without when `url` is None)."""
    # Without retrieval the loop allows no search: --max-turns would contradict --no-retrieval.
    retrieval = ["--retriever-url", url, *LIMITS] if url else ["--no-retrieval", *LIMITS[2:]]
    command = [*CLI, "evaluate", "--model", str(model), "--datasets", f"hotpotqa_dev={DEV}", *retrieval,
               "--out", str(out), "--no-progress"]  # fmt: skip
    if limit:
        command += ["--limit", str(limit)]
    shutil.rmtree(out, ignore_errors=True)  # a fresh run: its wall time covers every question
    seconds = run(command, out.with_suffix(".log"))
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    return {**metrics["datasets"]["hotpotqa_dev"], "wall_s": seconds, "load": load_average()}


def history(run_dir: Path) -> list[dict[str, Any]]:
    """Per-step logs of a training run."""
    return json.loads((run_dir / "trainer_state.json").read_text(encoding="utf-8"))["log_history"]


def train_sft(model: Path, url: str, out: Path, lora: bool, steps: int) -> dict[str, Any]:
    """`train-sft` from `model`; returns the final policy, the run's timings and losses."""
    shutil.rmtree(out, ignore_errors=True)
    extra = ["lora.enabled=true", "trainer.learning_rate=1e-3"] if lora else []
    seconds = run(
        [*CLI, "train-sft", "--config", SFT_CONFIG, f"model.name_or_path={model}", f"retriever.url={url}",
         f"trainer.output_dir={out}", f"trainer.max_steps={steps}", *extra],
        out.parent / f"{out.name}.log",
    )  # fmt: skip
    steps_log = [h for h in history(out) if "loss" in h]
    return {
        "final": str(out / "final"),
        "wall_s": seconds,
        "steps": len(steps_log),
        "loss_first": float(steps_log[0]["loss"]),
        "loss_last": float(steps_log[-1]["loss"]),
        "load": load_average(),
    }


def train_grpo(model: Path, url: str, out: Path, steps: int) -> dict[str, Any]:
    """`train-grpo` with LoRA from `model`; returns the final (merged) policy and per-step metrics."""
    shutil.rmtree(out, ignore_errors=True)
    seconds = run(
        [*CLI, "train-grpo", "--config", GRPO_CONFIG, f"model.name_or_path={model}", f"retriever.url={url}",
         f"trainer.output_dir={out}", f"trainer.max_steps={steps}"],
        out.parent / f"{out.name}.log",
    )  # fmt: skip
    keys = {
        "reward": "reward",
        "format": "rewards/format/mean",
        "f1": "rewards/f1/mean",
        "searches": "rollout/searches",
        "model_tokens": "rollout/model_tokens",
        "document_tokens": "rollout/document_tokens",
        "step_s": "time/step_s",
        "rollout_s": "time/rollout_s",
        "clipped": "completions/clipped_ratio",
    }
    per_step = [
        {"step": h["step"], **{k: float(h[v]) for k, v in keys.items() if v in h}}
        for h in history(out)
        if "reward" in h
    ]
    return {"final": str(out / "final"), "wall_s": seconds, "steps": per_step, "load": load_average()}


def ipdpo_round(model: Path, url: str, out: Path, questions: int) -> dict[str, Any]:
    """One IP-DPO round with LoRA from `model` (sample, score, pair, one DPO epoch); its record.

    A policy too weak to give `pairs.min_pairs` pairs stops the round before training: the record then says so
    (with the pair statistics) and holds no "final" policy.
    """
    shutil.rmtree(out, ignore_errors=True)
    log = out.parent / f"{out.name}.log"
    started = time.perf_counter()
    try:
        run(
            [*CLI, "train-ipdpo", "--config", IPDPO_CONFIG, f"model.name_or_path={model}", f"retriever.url={url}",
             f"trainer.output_dir={out}", "rounds=1", "heldout.file=null",  # evaluated below like the others
             f"sampling.questions_per_round={questions}"],
            log,
        )  # fmt: skip
        stopped = None
    except RuntimeError:
        text = log.read_text(encoding="utf-8", errors="replace")
        if (end := text.find("not training on so little")) < 0:
            raise
        stopped = text[text.rfind("round 1: ", 0, end) :].strip()
    seconds = time.perf_counter() - started
    round_dir = out / "round-1"
    paired = json.loads((round_dir / "pair_stats.json").read_text(encoding="utf-8"))
    record: dict[str, Any] = {
        "from": str(model),
        "final": None if stopped else str(round_dir),
        "wall_s": seconds,
        "samples": paired.get("samples", {}),
        "pairs": paired["stats"],
        "load": load_average(),
    }
    if stopped:
        return {**record, "stopped": stopped}
    summary = json.loads((round_dir / "summary.json").read_text(encoding="utf-8"))
    return {**record, "dpo": summary["dpo"]}


def ipdpo_line(r: dict[str, Any]) -> str:
    """What the IP-DPO round sampled, paired and trained."""
    samples, pairs = r["samples"], r["pairs"]
    line = (
        f"IP-DPO LoRA from {r['from']}: one round in {r['wall_s'] / 60:.1f} min; {pairs['questions']} questions × "
        f"{pairs['samples'] // max(pairs['questions'], 1)} samples: valid format {100 * samples.get('format', 0):.1f}%, "
        f"F1 {100 * samples.get('outcome', 0):.1f}, process {samples.get('process', 0):.2f}, "
        f"searches {samples.get('searches', 0):.2f}; {pairs['pairs']} pairs {pairs['by_type']}, "
        f"skipped {pairs['skipped']}"
    )
    if r.get("note"):  # recorded with the stage when a run was cut or resumed
        line += f"\n  note: {r['note']}"
    if r["final"] is None:
        return f"{line}\n  stopped before training: {r['stopped']}"
    dpo = r["dpo"]
    return (
        f"{line}\n  DPO: {dpo.get('pairs', '?')} pairs, {dpo.get('steps', 0)} updates, loss "
        f"{dpo.get('loss_first', float('nan')):.3f} → {dpo.get('loss_last', float('nan')):.3f}, reward accuracy "
        f"{dpo.get('rewards_accuracies_mean', float('nan')):.2f} (after the epoch on the training pairs: "
        f"{dpo.get('pairs_reward_accuracy', float('nan')):.2f})"
    )


def row(name: str, m: dict[str, Any]) -> str:
    """One line of the evaluation table."""
    return (
        f"| {name} | {100 * m['format']:.1f} | {m['reward']:.3f} | {100 * m['em']:.1f} | {100 * m['f1']:.1f} | "
        f"{100 * m['retrieval_success']:.1f} | {m['searches']:.2f} | {m['model_tokens']:.0f} | "
        f"{m['document_tokens']:.0f} | {m['wall_s'] / 60:.1f} |"
    )


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "real-model")
    parser.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    parser.add_argument("--index", type=Path, default=INDEX)
    parser.add_argument("--limit", type=int, help="evaluate on the first N dev questions (default: all 100)")
    parser.add_argument("--sft-steps", type=int, default=16)
    parser.add_argument("--grpo-steps", type=int, default=10)
    parser.add_argument(
        "--ipdpo-questions", type=int, default=32, help="training questions sampled by IP-DPO"
    )
    args = parser.parse_args()
    child_environment()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict[str, Any] = {"load_start": load_average(), "cpus": os.cpu_count()}

    results["fetch"] = prepare(args.model_dir, args.index, args.out)

    evals: dict[str, dict[str, Any]] = {}
    out, limit = args.out, args.limit
    with running_retriever(args.index, log=(out / "retriever.log").open("wb")) as url:
        evals["zero-shot, no retrieval"] = stage(
            out, "eval-zero-closed", lambda: evaluate(args.model_dir, out / "eval-zero-closed", None, limit)
        )
        evals["zero-shot, retrieval"] = stage(
            out, "eval-zero", lambda: evaluate(args.model_dir, out / "eval-zero", url, limit)
        )
        sft_runs = {}
        for name, lora in (("SFT LoRA", True), ("SFT full", False)):
            slug = name.replace(" ", "-").lower()
            sft_runs[name] = stage(
                out,
                slug,
                lambda s=slug, lora=lora: train_sft(args.model_dir, url, out / s, lora, args.sft_steps),
            )
            evals[name] = stage(
                out,
                f"eval-{slug}",
                lambda n=name, s=slug: evaluate(Path(sft_runs[n]["final"]), out / f"eval-{s}", url, limit),
            )
        results["sft"] = sft_runs
        start_from = max(sft_runs, key=lambda k: (evals[k]["f1"], evals[k]["format"]))
        grpo = stage(
            out,
            "grpo-lora",
            lambda: train_grpo(Path(sft_runs[start_from]["final"]), url, out / "grpo-lora", args.grpo_steps),
        )
        results["grpo"] = {**grpo, "from": start_from}
        evals[f"{start_from} + GRPO LoRA"] = stage(
            out, "eval-grpo", lambda: evaluate(Path(grpo["final"]), out / "eval-grpo", url, limit)
        )
        # IP-DPO starts from the same warm start as GRPO, not from GRPO's policy: the two methods side by side
        # (TeaRAG's recipe is SFT then IP-DPO), each judged against the one policy both began with.
        ipdpo = stage(
            out,
            "ipdpo-lora",
            lambda: ipdpo_round(
                Path(sft_runs[start_from]["final"]), url, out / "ipdpo-lora", args.ipdpo_questions
            ),
        )
        results["ipdpo"] = {**ipdpo, "from": start_from}
        if ipdpo["final"]:
            evals[f"{start_from} + IP-DPO LoRA"] = stage(
                out, "eval-ipdpo", lambda: evaluate(Path(ipdpo["final"]), out / "eval-ipdpo", url, limit)
            )

    results["evaluations"] = evals
    results["total_min"] = (time.perf_counter() - started) / 60
    results["load_end"] = load_average()
    lines = [
        "| policy | valid format | reward | EM | F1 | retrieval success | searches/q | model tokens | doc tokens | eval min |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(row(name, m) for name, m in evals.items()),
        "",
        "| GRPO step | reward | valid format | F1 | searches | model tokens | doc tokens | step s | rollout s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {s['step']} | {s.get('reward', 0):.3f} | {100 * s.get('format', 0):.1f} | {100 * s.get('f1', 0):.1f} | "
            f"{s.get('searches', 0):.2f} | {s.get('model_tokens', 0):.0f} | {s.get('document_tokens', 0):.0f} | "
            f"{s.get('step_s', 0):.0f} | {s.get('rollout_s', 0):.0f} |"
            for s in grpo["steps"]
        ),
        "",
        *(
            f"{name}: {r['steps']} steps in {r['wall_s'] / 60:.1f} min, loss {r['loss_first']:.3f} → {r['loss_last']:.3f}"
            for name, r in results["sft"].items()
        ),
        f"GRPO LoRA from {start_from}: {len(grpo['steps'])} steps in {grpo['wall_s'] / 60:.1f} min",
        ipdpo_line(results["ipdpo"]),
        f"fetch-model timings (s): {results['fetch']}",
        f"total {results['total_min']:.1f} min; load {results['load_start']} at start, {results['load_end']} at end",
    ]
    table = "\n".join(lines)
    print(table)
    (args.out / "real_model.md").write_text(table + "\n", encoding="utf-8")
    (args.out / "real_model.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
