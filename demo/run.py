"""`make demo` (`python -m demo`): the whole pipeline on an ordinary machine, with the commands a user would type.

Every step runs the same public command a user runs (printed before it starts), so the demo doubles as a
walkthrough: build indexes → serve them → SFT warm start → evaluate → GRPO → evaluate → benchmark-style
evaluation on HotpotQA → a real pretrained chat model (SmolLM2) on HotpotQA with and without retrieval →
report. Retriever processes are stopped at the end, on failure and on Ctrl-C. `--quick` skips the real model.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autorefine.data import read_questions
from autorefine.retrieval import RetrieverClient
from testbed.retriever import running_retriever

DEMO_CORPUS = Path("data/demo/corpus.jsonl")
SYNTHETIC = Path("data/synthetic")
HOTPOTQA_DEV = Path("data/demo/hotpotqa_dev.jsonl")
# Shared with the README and benchmarks/real_model.py: converted once, reused by every later run.
REAL_MODEL = Path("runs/models/smollm2")
# Its SFT warm start, shipped as a LoRA adapter (recipe, provenance and licence in its README.md).
REAL_ADAPTER = Path("data/adapters/smollm2-sft-lora")
# Laptop budgets for the real model: one search with the top-2 documents, short turns.
REAL_MODEL_LIMITS = ("--max-new-tokens", "64", "--max-obs-tokens", "256", "--max-completion-tokens", "512",
                     "--topk", "2")  # fmt: skip


@dataclass(frozen=True)
class DemoSize:
    """How much work each step does."""

    dense_passages: int | None  # None: the whole HotpotQA demo corpus
    sft_max_steps: int
    sft_eval_every: int
    grpo_steps: int
    grpo_eval_every: int
    heldout: int  # held-out synthetic questions for greedy evaluation
    esc_questions: int
    esc_max_samples: int
    hotpotqa: int | None  # HotpotQA demo questions (None: all 100)
    real_model: int = 0  # HotpotQA questions for SmolLM2 with and without retrieval (0: skip that step)
    grpo_batch: int = 128  # trajectories per GRPO step
    grpo_group: int = 8  # samples per question
    # At ESC's default 0.7 this small policy's answers scatter so much that no window agrees (BENCHMARKS.md).
    esc_temperature: float = 0.3


FULL = DemoSize(None, 1500, 10, 40, 10, 300, 100, 40, None, real_model=8)
# A smoke run of every step (for CI): untrained policies write every turn to its token limit, so keep it small.
QUICK = DemoSize(300, 4, 0, 2, 0, 8, 4, 5, 4, grpo_batch=8, grpo_group=4)


class Console:
    """Step headers and command echoes, so the demo reads without the code."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.started = time.perf_counter()
        self.step = 0

    def header(self, title: str, why: str) -> None:
        """Start the next step."""
        self.step += 1
        elapsed = time.perf_counter() - self.started
        print(f"\n=== Step {self.step}/{self.total}: {title}   [{elapsed / 60:.1f} min so far]", flush=True)
        print(f"    {why}", flush=True)

    def note(self, text: str) -> None:
        """An indented remark."""
        print(f"    {text}", flush=True)


def run(command: list[str], log: Path | None = None) -> None:
    """Echo a user-facing command, then run it (output to the console, or to `log` when given)."""
    print(f"\n    $ {shlex.join(command)}", flush=True)
    executable = {"autorefine": [sys.executable, "-m", "autorefine.cli"],
                  "retriever-server": [sys.executable, "-m", "retriever_server.cli"]}  # fmt: skip
    argv = executable.get(command[0], [command[0]]) + command[1:]
    if log is None:
        subprocess.run(argv, check=True)
        return
    with log.open("w", encoding="utf-8") as out:
        result = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(
            f"`{shlex.join(command)}` failed (exit {result.returncode}); end of {log}:\n{tail}"
        )


def build_indexes(out: Path, size: DemoSize, console: Console) -> tuple[Path, Path]:
    """MiniLM flat index of the HotpotQA paragraphs (cached between runs) and BM25 of the synthetic corpus."""
    index_dir = out / "index"
    corpus = DEMO_CORPUS
    if size.dense_passages is not None:
        corpus = out / "hotpotqa-sample.jsonl"
        lines = DEMO_CORPUS.read_text(encoding="utf-8").splitlines(keepends=True)[: size.dense_passages]
        corpus.parent.mkdir(parents=True, exist_ok=True)
        corpus.write_text("".join(lines), encoding="utf-8")
    dense, bm25 = index_dir / "hotpotqa-minilm", index_dir / "synthetic-bm25"
    if (dense / "manifest.json").is_file():
        console.note(f"{dense} exists: reusing it (delete it to rebuild)")
    else:
        console.note(
            "MiniLM encodes ~50 passages/s on 2 CPU cores: about 2 minutes for the 4,858 paragraphs."
        )
        run(["retriever-server", "build", "--corpus", str(corpus), "--out", str(dense)])
    run(["retriever-server", "build", "--corpus", str(SYNTHETIC / "corpus.jsonl"), "--encoder", "bm25",
         "--out", str(bm25), "--force"])  # fmt: skip
    return dense, bm25


def show_example_queries(url: str, console: Console) -> None:
    """A few HotpotQA questions through the dense retriever, top passage titles and scores."""
    questions = [q.question for q in read_questions("data/demo/hotpotqa_dev.jsonl", limit=3)]
    with RetrieverClient(url) as client:
        for question, docs in zip(questions, client.search(questions, topk=3), strict=True):
            console.note(f"Q: {question}")
            for doc in docs:
                title = doc.contents.partition("\n")[0].strip('"')
                console.note(f"   {doc.score:.3f}  {title}")


def evaluate(
    model: Path, url: str | None, out: Path, name: str, datasets: str, size_limit: int | None, *extra: str
) -> dict[str, Any]:
    """`autorefine evaluate` into out/name (`url` None: pass --no-retrieval in `extra`); returns its metrics.json."""
    target = out / "eval" / name
    retriever = ["--retriever-url", url] if url else []
    command = ["autorefine", "evaluate", "--model", str(model), "--datasets", datasets, *retriever,
               "--out", str(target), *extra]  # fmt: skip
    if size_limit is not None:
        command += ["--limit", str(size_limit)]
    run(command)
    return json.loads((target / "metrics.json").read_text(encoding="utf-8"))


def real_model_section(
    out: Path, url: str, questions: int, console: Console, model: Path = REAL_MODEL
) -> dict[str, dict[str, Any]]:
    """SmolLM2-135M-Instruct from PyPI: zero-shot (with and without retrieval) and with the shipped SFT
    adapter, on the same HotpotQA questions; one trajectory of the warm-started model."""
    console.header(
        "a real pretrained chat model: SmolLM2-135M-Instruct, zero-shot and warm-started",
        "installed from PyPI, converted to a plain HF folder, then the same evaluate command: zero-shot "
        f"(with the MiniLM retriever, and without retrieval), then with the SFT LoRA adapter in {REAL_ADAPTER} "
        "(16 steps on gold-like HotpotQA traces; scripts/make_smollm2_adapter.py rebuilds it)",
    )
    if (model / "provenance.json").is_file():
        console.note(f"{model} holds a verified conversion: reusing it")
    run(["autorefine", "fetch-model", "smollm2-135m-instruct", "--out", str(model)])
    dataset = f"hotpotqa_dev={HOTPOTQA_DEV}"
    retrieval = ("--max-turns", "1", *REAL_MODEL_LIMITS, "--no-progress")
    results = {
        "zero-shot, no retrieval": evaluate(model, None, out, "smollm2-no-retrieval", dataset, questions,
                                            "--no-retrieval", *REAL_MODEL_LIMITS, "--no-progress"),
        "zero-shot, retrieval": evaluate(model, url, out, "smollm2-retrieval", dataset, questions, *retrieval),
        "SFT adapter, retrieval": evaluate(model, url, out, "smollm2-sft", dataset, questions, *retrieval,
                                           "--adapter", str(REAL_ADAPTER)),
    }  # fmt: skip
    console.note("one trajectory of the warm-started model (search, documents, refine, answer):")
    run(["autorefine", "infer", "--model", str(model), "--adapter", str(REAL_ADAPTER), "--retriever-url", url,
         *retrieval[:-1], shown_question(out / "eval" / "smollm2-sft")])  # fmt: skip
    return results


def shown_question(evaluation: Path) -> str:
    """The first evaluated question the warm-started model answered at least partly right (else the first)."""
    from autorefine.evaluation.benchmark import read_predictions

    rows = read_predictions(evaluation)
    best = next((r for r in rows if r["scores"].get("f1", 0.0) > 0), rows[0])
    return best["question"]


def main(out: Path = Path("runs/demo"), quick: bool = False) -> int:
    """Run the demo; returns a process exit code."""
    size = QUICK if quick else FULL
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_DIR", str(out.resolve()))
    os.environ.setdefault("WANDB_SILENT", "true")
    console = Console(total=8 if size.real_model else 7)
    started = time.perf_counter()

    console.header(
        "build the retrieval indexes", "dense MiniLM over HotpotQA paragraphs; BM25 over the synthetic corpus"
    )
    dense, bm25 = build_indexes(out, size, console)

    with contextlib.ExitStack() as servers:
        console.header(
            "start the retrievers", "two local servers speaking the Search-R1 API (stopped at the end)"
        )
        logs = out / "logs"
        logs.mkdir(exist_ok=True)
        dense_log = servers.enter_context((logs / "retriever-dense.log").open("wb"))
        bm25_log = servers.enter_context((logs / "retriever-bm25.log").open("wb"))
        dense_url = servers.enter_context(running_retriever(dense, log=dense_log))
        bm25_url = servers.enter_context(running_retriever(bm25, log=bm25_log))
        console.note(f"HotpotQA (MiniLM) at {dense_url}; synthetic (BM25) at {bm25_url}")
        show_example_queries(dense_url, console)

        console.header(
            "warm-start a ~1M-parameter policy with SFT",
            "gold-like traces (search, read, refine, answer) played through the real agent loop; "
            "stops once held-out EM reaches 25 %",
        )
        sft_dir = out / "sft"
        run(["autorefine", "train-sft", "--config", "configs/sft/synthetic-warmstart.yaml",
             f"retriever.url={bm25_url}", f"trainer.output_dir={sft_dir}",
             f"trainer.max_steps={size.sft_max_steps}", f"heldout.every={size.sft_eval_every}",
             "trainer.logging_steps=50", "trainer.disable_tqdm=true"])  # fmt: skip

        console.header(
            "evaluate the warm start", "greedy on held-out people (never seen in training), then ESC"
        )
        synthetic = f"heldout={SYNTHETIC / 'heldout.jsonl'}"

        def greedy_and_esc(model: Path, stage: str) -> tuple[dict[str, Any], dict[str, Any]]:
            greedy = evaluate(
                model, bm25_url, out, f"{stage}-greedy", synthetic, size.heldout, "--no-progress"
            )
            esc = evaluate(model, bm25_url, out, f"{stage}-esc", synthetic, size.esc_questions,
                           "--decoding", "esc", "--max-samples", str(size.esc_max_samples),
                           "--temperature", str(size.esc_temperature), "--no-progress")  # fmt: skip
            return greedy, esc

        before, before_esc = greedy_and_esc(sft_dir / "final", "before")

        console.header(
            "train with GRPO",
            "16 questions × 8 sampled trajectories per step, BM25 retrieval, TRL's GRPOTrainer",
        )
        grpo_dir = out / "grpo"
        run(["autorefine", "train-grpo", "--config", "configs/grpo/tiny-cpu.yaml",
             f"model.name_or_path={sft_dir / 'final'}", f"retriever.url={bm25_url}",
             f"trainer.output_dir={grpo_dir}", f"trainer.max_steps={size.grpo_steps}",
             f"heldout.every={size.grpo_eval_every}", "trainer.logging_steps=5", "trainer.save_strategy=no",
             f"trainer.per_device_train_batch_size={size.grpo_batch}", f"trainer.num_generations={size.grpo_group}",
             "trainer.disable_tqdm=false"])  # fmt: skip

        console.header("evaluate after GRPO", "the same held-out people, greedy and ESC")
        after, after_esc = greedy_and_esc(grpo_dir / "final", "after")

        console.header(
            "evaluate on HotpotQA like a benchmark",
            "the command users run on the seven benchmarks; this tiny policy was trained on made-up people, "
            "so expect ~0 EM here: the point is the pipeline",
        )
        hotpot = evaluate(grpo_dir / "final", dense_url, out, "hotpotqa", f"hotpotqa_dev={HOTPOTQA_DEV}",
                          size.hotpotqa, "--no-progress")  # fmt: skip
        real = real_model_section(out, dense_url, size.real_model, console) if size.real_model else None

    from demo.report import write_report

    report = write_report(
        out,
        sft_dir=sft_dir,
        grpo_dir=grpo_dir,
        results={"warm start": (before, before_esc), "after GRPO": (after, after_esc)},
        hotpotqa=hotpot,
        real_model=real,
        minutes=(time.perf_counter() - started) / 60,
    )
    print((report / "README.md").read_text(encoding="utf-8"))
    return 0
