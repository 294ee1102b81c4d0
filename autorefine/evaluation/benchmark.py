"""`autorefine evaluate`: every question of every dataset, batched, resumable, written as it goes.

Output folder:
- `predictions.jsonl`: one row per question (dataset, id, question, golds, prediction, scores, trajectory,
  samples, searches, extra), appended and flushed after every batch, so an interruption loses one batch.
- `run.json`: what the predictions were made with; a rerun with other settings is refused.
- `metrics.json`, `results.md`, `results.csv`: computed from the whole predictions file at the end.
- `invocations.jsonl`: one line per run of the command, with its wall time and questions per second.

Batches are cut from each dataset's full question list, and each batch's sampling seed depends only on
(seed, dataset, batch index). A rerun skips whole batches already written and redoes the batch that was
interrupted, so it reproduces exactly the batches (and, for sampled decoding on one machine, the RNG state)
of an uninterrupted run: greedy and seeded sc/esc runs resume to identical metrics.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from autorefine.data import Question, read_questions
from autorefine.evaluation.policy import EvaluationError
from autorefine.evaluation.predictions import Prediction, aggregate
from autorefine.evaluation.report import group_averages, markdown_table, write_csv
from autorefine.evaluation.runner import GREEDY_DECODING, Decoding, predict_batch
from autorefine.files import file_sha256
from autorefine.rollout.agent import AgentLoop
from autorefine.scoring.reward import RewardSettings

logger = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.jsonl"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.json"
TABLE_MD = "results.md"
TABLE_CSV = "results.csv"
INVOCATIONS_FILE = "invocations.jsonl"


class PredictionsFile:
    """`predictions.jsonl` of one output folder: the rows already there, and appends batch by batch."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: dict[tuple[str, str], dict[str, Any]] = {}
        if path.is_file():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        if lines and lines[-1].strip():
            # No newline after the last row: the process died mid-write. Drop the fragment; it is redone.
            logger.warning("%s: dropping an unfinished last line (interrupted write)", self.path)
            with self.path.open("r+b") as f:
                f.truncate(len(data) - len(lines[-1]))
        for number, line in enumerate(lines[:-1], start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                key = (str(row["dataset"]), str(row["id"]))
            except (ValueError, KeyError, TypeError) as err:
                raise EvaluationError(
                    f"{self.path}:{number}: not a prediction row ({err}); move the file away to start over"
                ) from None
            self.rows[key] = row

    def has(self, dataset: str, qid: str) -> bool:
        """True when the question already has a prediction."""
        return (dataset, qid) in self.rows

    def get(self, dataset: str, qid: str) -> Prediction:
        """The stored prediction of one question."""
        return Prediction.from_row(self.rows[(dataset, qid)])

    def append(self, dataset: str, predictions: Sequence[Prediction]) -> None:
        """Add rows and make them durable before returning."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = [{"dataset": dataset, **p.to_row()} for p in predictions]
        with self.path.open("a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())
        for r in rows:
            self.rows[(dataset, str(r["id"]))] = r


def batch_seed(seed: int, dataset: str, index: int) -> int:
    """The sampling seed of one batch: independent of which batches ran before it in this process."""
    digest = hashlib.sha256(f"{seed}/{dataset}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def check_run_file(
    path: Path, identity: dict[str, Any], files: dict[str, dict[str, Any]], done: set[str], batch_size: int
) -> None:
    """Refuse to mix predictions made with other settings or other question files; record ours."""
    if path.is_file():
        previous = json.loads(path.read_text(encoding="utf-8"))
        # A key a file from an older version never recorded cannot be checked; every other one must match.
        differing = [
            k
            for k in sorted(set(identity) | set(previous["identity"]))
            if k in previous["identity"] and previous["identity"].get(k) != identity.get(k)
        ]
        if differing:
            was = ", ".join(f"{k}={previous['identity'].get(k)}" for k in differing)
            raise EvaluationError(
                f"{path.parent} holds predictions made with different {', '.join(differing)} "
                f"(was {was}); use another --out"
            )
        for name in sorted(done & set(previous["files"]) & set(files)):
            if previous["files"][name]["sha256"] != files[name]["sha256"]:
                raise EvaluationError(
                    f"{path.parent} holds {name} predictions for another question file "
                    f"({previous['files'][name]['path']}); use another --out"
                )
        files = {**previous["files"], **files}
        if previous.get("batch_size") != batch_size:
            # Allowed (a smaller batch may be what makes a resumed run fit in memory), but batches are
            # cut differently: greedy rows may differ in the last float bits, sampled rows draw other samples.
            logger.warning(
                "%s was started with --batch-size %s, now %s: the rest is not an exact continuation",
                path.parent, previous.get("batch_size"), batch_size,
            )  # fmt: skip
    record = {"identity": identity, "files": files, "batch_size": batch_size}
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def evaluate_benchmarks(
    loop: AgentLoop,
    files: dict[str, Path],
    out: Path,
    decoding: Decoding = GREEDY_DECODING,
    *,
    limit: int | None = None,
    batch_size: int = 32,
    reward: RewardSettings = RewardSettings(),
    record: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate (or finish evaluating) every dataset into `out`; returns the metrics also written there."""
    from tqdm import tqdm

    if batch_size < 1:
        raise EvaluationError(f"--batch-size must be >= 1, got {batch_size}")
    # Every file is read (and checked) before the first model call: a bad line fails in seconds, not hours.
    questions = load_questions(files, limit)
    out.mkdir(parents=True, exist_ok=True)
    store = PredictionsFile(out / PREDICTIONS_FILE)
    settings = {
        **(record or {}),
        "decoding": dataclasses.asdict(decoding),
        "rollout": dataclasses.asdict(loop.config),
        "template": loop.template.source,
        "template_sha256": hashlib.sha256(loop.template.text.encode("utf-8")).hexdigest(),
        "reward": dataclasses.asdict(reward),
        "limit": limit,
        "batch_size": batch_size,
    }
    # The engine and weight dtype change greedy outputs too (bf16 vs fp32, vLLM's kernels vs transformers').
    identity_keys = (
        "model",
        "adapter",
        "engine",
        "dtype",
        "decoding",
        "rollout",
        "template_sha256",
        "reward",
    )
    file_info = {name: {"path": str(path), "sha256": file_sha256(path)} for name, path in files.items()}
    done = {name for name, _ in store.rows}
    check_run_file(out / RUN_FILE, {k: settings.get(k) for k in identity_keys}, file_info, done, batch_size)

    todo = [
        (name, index, batch)
        for name, qs in questions.items()
        for index, batch in enumerate(qs[i : i + batch_size] for i in range(0, len(qs), batch_size))
        if not all(store.has(name, q.id) for q in batch)
    ]
    remaining = sum(len(batch) for _, _, batch in todo)
    if remaining < sum(map(len, questions.values())):
        logger.info("resuming in %s: %d questions left", out, remaining)
    started, drawn = time.perf_counter(), 0
    # Greedy: one trajectory per question, progress in questions. sc/esc: progress in samples drawn, counted
    # as each window returns, against the budget of max_samples per question (ESC's early stops skip the rest).
    per_question = 1 if decoding.mode == "greedy" else decoding.esc.max_samples
    unit = "q" if decoding.mode == "greedy" else "sample"
    bar = tqdm(
        total=remaining * per_question, unit=unit, desc="evaluate", disable=not progress, dynamic_ncols=True
    )
    with bar:
        finished = 0
        for name, index, batch in todo:
            bar.set_postfix_str(f"{name}, {finished}/{remaining} questions")
            _seed(batch_seed(decoding.seed, name, index))
            at_start = bar.n
            # The whole batch is redone, also when an interruption kept part of it: same batch, same result.
            predictions = predict_batch(
                loop, batch, decoding, reward, on_samples=bar.update if per_question > 1 else None
            )
            store.append(name, [p for p in predictions if not store.has(name, p.id)])
            drawn += sum(p.samples for p in predictions)
            finished += len(batch)
            bar.update(at_start + len(batch) * per_question - bar.n)  # the budget early stopping saved
            bar.set_postfix_str(f"{name}, {finished}/{remaining} questions")
    seconds = time.perf_counter() - started

    per_dataset = {
        name: {**aggregate(store.get(name, q.id) for q in qs), "file": str(files[name])}
        for name, qs in questions.items()
    }
    metrics = {
        "settings": {**settings, "files": file_info},
        "datasets": per_dataset,
        "averages": group_averages(per_dataset),
    }
    _write_outputs(out, metrics)
    _log_invocation(out, remaining, drawn, seconds)
    return metrics


def _seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def _write_outputs(out: Path, metrics: dict[str, Any]) -> None:
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    (out / TABLE_MD).write_text(markdown_table(metrics) + "\n", encoding="utf-8")
    write_csv(metrics, out / TABLE_CSV)


def _log_invocation(out: Path, questions: int, trajectories: int, seconds: float) -> None:
    row = {
        "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "new_questions": questions,
        "trajectories": trajectories,
        "seconds": round(seconds, 3),
        "questions_per_second": round(questions / seconds, 4) if questions and seconds > 0 else None,
    }
    with (out / INVOCATIONS_FILE).open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def read_predictions(out: Path) -> list[dict[str, Any]]:
    """Every row of an output folder's predictions.jsonl, in file order."""
    return list(PredictionsFile(out / PREDICTIONS_FILE).rows.values())


def load_questions(files: dict[str, Path], limit: int | None) -> dict[str, list[Question]]:
    """Questions of every dataset (checked), in file order."""
    return {name: read_questions(path, limit) for name, path in files.items()}
