"""Rebuild the shipped SFT LoRA adapter of SmolLM2-135M-Instruct (data/adapters/smollm2-sft-lora/).

    python scripts/make_smollm2_adapter.py [--out data/adapters/smollm2-sft-lora] [--steps 16]

Converts the model with `autorefine fetch-model` (reused when runs/models/smollm2 holds a verified copy),
builds the MiniLM index of the demo HotpotQA corpus (reused when present), serves it on a free loopback port,
runs `autorefine train-sft` with `configs/sft/smollm2-hotpotqa.yaml` as LoRA (lr 1e-3), and copies the adapter
(stored in float16: half the bytes, and the fp32 LoRA weights round to well under their training noise) with
the run's recipe to `--out`. About 20 minutes on 2 CPU cores. Set OMP_NUM_THREADS to the cores you can spare.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # testbed/ (the bench) is not installed

from testbed.retriever import running_retriever  # noqa: E402

CLI = [sys.executable, "-m", "autorefine.cli"]
CONFIG = "configs/sft/smollm2-hotpotqa.yaml"
# The recipe: BENCHMARKS.md "A real model: SmolLM2-135M-Instruct" (SFT LoRA row).
OVERRIDES = ["lora.enabled=true", "trainer.learning_rate=1e-3"]


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REPO / "data" / "adapters" / "smollm2-sft-lora")
    parser.add_argument("--model-dir", type=Path, default=REPO / "runs" / "models" / "smollm2")
    parser.add_argument("--index", type=Path, default=REPO / "runs" / "index" / "demo-minilm")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "adapters" / "smollm2-sft-lora")
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads stall a shared machine
    os.environ.setdefault("WANDB_MODE", "offline")
    args.work.mkdir(parents=True, exist_ok=True)
    subprocess.run([*CLI, "fetch-model", "smollm2-135m-instruct", "--out", str(args.model_dir)], check=True)
    if not (args.index / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "retriever_server.cli", "build", "--corpus",
                        "data/demo/corpus.jsonl", "--out", str(args.index)], check=True, cwd=REPO)  # fmt: skip
    run_dir = args.work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    started = time.perf_counter()
    with running_retriever(args.index, log=(args.work / "retriever.log").open("wb")) as url:
        subprocess.run(
            [*CLI, "train-sft", "--config", CONFIG, f"model.name_or_path={args.model_dir}",
             f"retriever.url={url}", f"trainer.output_dir={run_dir}", f"trainer.max_steps={args.steps}",
             *OVERRIDES],
            check=True, cwd=REPO,
        )  # fmt: skip
    seconds = time.perf_counter() - started
    ship(run_dir / "final" / "adapter", args.out)
    provenance = json.loads((args.model_dir / "provenance.json").read_text(encoding="utf-8"))
    provenance.pop("gguf_file", None)  # where pip put it on the machine that converted it
    log = json.loads((run_dir / "trainer_state.json").read_text(encoding="utf-8"))["log_history"]
    losses = [h["loss"] for h in log if "loss" in h]
    recipe = {
        "base_model": "SmolLM2-135M-Instruct (autorefine fetch-model smollm2-135m-instruct)",
        "base_provenance": provenance,
        "command": " ".join(
            ["autorefine train-sft --config", CONFIG, *OVERRIDES, f"trainer.max_steps={args.steps}"]
        ),
        "training_data": "gold-like traces of data/demo/hotpotqa_train.jsonl (HotpotQA train, CC BY-SA 4.0) "
        "played through the agent loop with the MiniLM retriever over data/demo/corpus.jsonl",
        "steps": len(losses),
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "wall_s": round(seconds, 1),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "built": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    (args.out / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n", encoding="utf-8")
    print(f"adapter in {args.out} ({len(losses)} steps, loss {recipe['loss_first']} → {recipe['loss_last']})")


def ship(adapter: Path, out: Path) -> None:
    """Copy a PEFT adapter folder to `out` with its weights in float16."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    # Where the base is on the machine that trained it says nothing elsewhere; where `fetch-model` puts it does.
    config["base_model_name_or_path"] = "runs/models/smollm2"
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    save_file({k: v.half().contiguous() for k, v in weights.items()}, str(out / "adapter_model.safetensors"))


if __name__ == "__main__":
    main()
