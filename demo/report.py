"""The demo's report folder: curves, a before/after table, example trajectories and what to run next."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from autorefine.evaluation.benchmark import PREDICTIONS_FILE

NEXT_STEPS = """## What to run next

- Look at one trajectory in colour: `autorefine infer --model {final} --retriever-url URL "What is the home city of Bigu Brurbrun?"`
  (start a retriever first: `retriever-server serve --index {index} --port 8000`).
- Train longer or change the recipe: `autorefine train-grpo --config configs/grpo/tiny-cpu.yaml trainer.max_steps=100`
  (any `section.key=value`; see the configuration reference in the README).
- The same run on 2 processes: `scripts/train_grpo.sh --accelerate-config configs/accelerate/cpu_2proc.yaml configs/grpo/tiny-cpu.yaml`.
- The W&B run of this demo is offline: `wandb sync {wandb}` uploads it when you have a network.
- Real scale (Qwen2.5-3B, 8 GPUs, wiki-18): README, section "Running at real scale".
"""


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _log_history(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "trainer_state.json"
    return json.loads(path.read_text(encoding="utf-8"))["log_history"] if path.is_file() else []


def plot_curves(sft_dir: Path, grpo_dir: Path, path: Path) -> None:
    """Three panels: held-out EM during SFT, GRPO reward per step, held-out EM during GRPO."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sft = _read_jsonl(sft_dir / "heldout.jsonl")
    grpo = _read_jsonl(grpo_dir / "heldout.jsonl")
    rewards = [(h["step"], h["reward"]) for h in _log_history(grpo_dir) if "reward" in h]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = [
        (
            axes[0],
            [(h["step"], 100 * h["em"]) for h in sft],
            "SFT step",
            "held-out EM (%)",
            "Warm start (SFT)",
        ),
        (axes[1], rewards, "GRPO step", "mean reward", "GRPO training reward"),
        (
            axes[2],
            [(h["step"], 100 * h["em"]) for h in grpo],
            "GRPO step",
            "held-out EM (%)",
            "GRPO held-out EM",
        ),
    ]
    for ax, points, xlabel, ylabel, title in panels:
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o" if len(xs) < 60 else None)
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def metrics_table(results: dict[str, tuple[dict[str, Any], dict[str, Any]]]) -> str:
    """Before/after rows for greedy and ESC decoding."""
    lines = [
        "| policy | decoding | questions | EM | F1 | searches / question | samples / question | model tokens |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for policy, (greedy, esc) in results.items():
        for decoding, metrics in (("greedy", greedy), ("ESC", esc)):
            m = next(iter(metrics["datasets"].values()))
            lines.append(
                f"| {policy} | {decoding} | {int(m['count'])} | {100 * m['em']:.1f} | {100 * m['f1']:.1f} | "
                f"{m['searches']:.2f} | {m['samples']:.1f} | {m['model_tokens']:.0f} |"
            )
    return "\n".join(lines)


def example_trajectories(eval_dir: Path, count: int = 3) -> str:
    """Markdown for a few trajectories (correct ones first), segment by segment."""
    rows = _read_jsonl(eval_dir / PREDICTIONS_FILE)
    rows.sort(key=lambda r: -r["scores"].get("em", 0.0))
    out = []
    for row in rows[:count]:
        t = row["trajectory"]
        out.append(f"### {row['question']}\n")
        out.append(f"gold: {', '.join(row['golden_answers'])} — prediction: {row['prediction']} — "
                   f"EM {row['scores'].get('em', 0):.0f}, finish: {t.get('finish_reason')}\n")  # fmt: skip
        out.append("| kind | tokens | text |\n|---|---:|---|")
        for s in t.get("segments", []):
            text = s["text"].replace("\n", "⏎").replace("|", "\\|")
            out.append(f"| {s['kind']} | {s['end'] - s['start']} | `{text}` |")
        out.append("")
    return "\n".join(out)


def esc_explained(esc_metrics: dict[str, Any]) -> str:
    """One sentence on how the ESC rows were decoded, from the settings the evaluation recorded."""
    settings = esc_metrics["settings"]
    esc = settings["decoding"]["esc"]
    return (
        f"ESC samples whole trajectories at temperature {esc['temperature']} in windows of {esc['window']}, "
        f"stops at the first window whose answers agree, else votes over {esc['max_samples']} samples; "
        f"`samples / question` against {esc['max_samples']} is what it saved. Its rows use the first "
        f"{settings['limit']} of the held-out questions."
    )


def real_model_table(results: dict[str, dict[str, Any]]) -> str:
    """SmolLM2 on HotpotQA: zero-shot without and with retrieval, then warm-started by the shipped SFT adapter."""
    lines = [
        "| SmolLM2-135M-Instruct | questions | EM | F1 | valid format | searches / question | model tokens |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, metrics in results.items():
        m = next(iter(metrics["datasets"].values()))
        lines.append(
            f"| {name} | {int(m['count'])} | {100 * m['em']:.1f} | {100 * m['f1']:.1f} | "
            f"{100 * m.get('format', 0.0):.1f} | {m['searches']:.2f} | {m['model_tokens']:.0f} |"
        )
    return "\n".join(lines)


def write_report(
    out: Path,
    *,
    sft_dir: Path,
    grpo_dir: Path,
    results: dict[str, tuple[dict[str, Any], dict[str, Any]]],
    hotpotqa: dict[str, Any],
    minutes: float,
    real_model: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """Write out/report and return its path."""
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    plot_curves(sft_dir, grpo_dir, report / "curves.png")
    table = metrics_table(results)
    (report / "metrics.md").write_text(table + "\n", encoding="utf-8")
    (report / "examples.md").write_text(example_trajectories(out / "eval" / "after-greedy"), encoding="utf-8")
    wandb_runs = sorted((out / "wandb").glob("offline-run-*")) if (out / "wandb").is_dir() else []
    hp = next(iter(hotpotqa["datasets"].values()))
    sft_steps = json.loads((sft_dir / "trainer_state.json").read_text(encoding="utf-8"))["global_step"]
    summary = [
        "# autorefine demo report",
        "",
        f"Finished in {minutes:.1f} minutes. Everything below was produced by the public commands printed above.",
        "",
        "## Held-out synthetic questions (people never seen in training)",
        "",
        table,
        "",
        f"The warm start stopped after {sft_steps} SFT steps; GRPO then ran on the warm-started policy.",
        esc_explained(results["after GRPO"][1]),
        "",
        "## HotpotQA demo questions (dense MiniLM retrieval)",
        "",
        f"{int(hp['count'])} questions: EM {100 * hp['em']:.1f}, F1 {100 * hp['f1']:.1f}, "
        f"retrieval success {100 * hp['retrieval_success']:.1f} %, {hp['searches']:.2f} searches per question. "
        "The tiny policy knows only the synthetic task; this row shows the benchmark pipeline end to end.",
        "",
        *(
            [
                "## A real pretrained chat model (SmolLM2-135M-Instruct from PyPI)",
                "",
                real_model_table(real_model),
                "",
                "Zero-shot, this 135M model does not write the protocol's tags, so nothing it answers is scored. "
                "The SFT adapter shipped in `data/adapters/smollm2-sft-lora/` (16 steps on gold-like traces "
                "of the training questions) makes it search, refine and answer in the protocol; "
                "`benchmarks/real_model.py` goes on to GRPO and IP-DPO (BENCHMARKS.md). A handful of "
                "questions is noise-level: BENCHMARKS.md has the 100-question numbers. Evaluation outputs: "
                "`eval/smollm2-no-retrieval`, `eval/smollm2-retrieval`, `eval/smollm2-sft`.",
                "",
            ]
            if real_model
            else []
        ),
        "## Files",
        "",
        "- curves: `report/curves.png`; examples: `report/examples.md`; table: `report/metrics.md`",
        f"- final policy (a plain Hugging Face folder with its tokenizer): `{grpo_dir / 'final'}`",
        f"- warm-start policy: `{sft_dir / 'final'}`",
        f"- evaluation outputs (predictions.jsonl, metrics.json, results.md): `{out / 'eval'}`",
        f"- W&B offline run: `{wandb_runs[-1] if wandb_runs else 'none (W&B disabled)'}`",
        "",
        NEXT_STEPS.format(
            final=grpo_dir / "final",
            index=out / "index" / "synthetic-bm25",
            wandb=wandb_runs[-1] if wandb_runs else "<run folder>",
        ),
    ]
    (report / "README.md").write_text("\n".join(summary), encoding="utf-8")
    return report
