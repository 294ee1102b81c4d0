"""Trainer callbacks every method shares: held-out evaluation (early stop, best checkpoint), step timing, run config."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from autorefine.data import Question, read_questions
from autorefine.evaluation.predictions import Prediction, aggregate
from autorefine.evaluation.runner import predict_shard
from autorefine.protocol import PromptTemplate
from autorefine.rollout.agent import AgentLoop, RolloutSettings, Searcher
from autorefine.rollout.engines import TrainerEngine
from autorefine.scoring.metrics import mean_metrics
from autorefine.settings import to_dict, write_run_config
from autorefine.training.distributed import gathered, on_main
from autorefine.trl_private import record_metric

if TYPE_CHECKING:
    from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeldoutSettings:
    """Periodic greedy evaluation on held-out (validation) questions during training (the `heldout` section)."""

    file: str | None = None  # FlashRAG questions; None: no held-out evaluation
    limit: int | None = None  # use only the first N questions
    every: int = 0  # steps between evaluations (0: never); also evaluated before the first step
    batch_size: int = 64
    save_best: bool = True  # keep the best-reward policy in <output_dir>/best
    stop_at_em: float | None = None  # stop training once held-out EM reaches this


# Written next to the best policy: the held-out reward and step it was saved for, so a resumed run compares
# its evaluations with the real best instead of overwriting `best/` with the first one.
BEST_FILE = "heldout_best.json"


class HeldoutEvalCallback(TrainerCallback):
    """Every `every` steps, greedy rollouts on held-out questions → `heldout/*` metrics.

    Rollouts use the trainer's configured engine (`TrainerEngine`, vLLM included). Questions are split across
    processes in shards padded to the same number of batches (a lockstep engine needs every process in every
    batch) and results gathered, so every rank sees the same numbers and takes the same decisions (stop
    early, save best).
    """

    def __init__(
        self,
        trainer: Trainer,
        questions: Sequence[Question],
        searcher: Searcher,
        rollout: RolloutSettings,
        template: PromptTemplate,
        *,
        every: int,
        stop_at_em: float | None = None,
        save_best: bool = False,
        batch_size: int = 64,
        on_result: Callable[[int, dict[str, float]], None] | None = None,
        engine: TrainerEngine | None = None,
    ) -> None:
        self.trainer = trainer
        self.engine = engine
        self.questions = list(questions)
        self.searcher = searcher
        self.rollout = rollout
        self.template = template
        self.every = every
        self.stop_at_em = stop_at_em
        self.save_best = save_best
        self.batch_size = batch_size
        self.on_result = on_result
        self.best_reward = float("-inf")
        self.history: list[dict[str, float]] = []

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics of the current policy, the same on every process."""
        trainer = self.trainer
        acc = trainer.accelerator
        if self.engine is None:
            self.engine = TrainerEngine(trainer)
        model = trainer.model
        was_training = model.training
        model.eval()
        try:
            with self.engine.current_policy(push_weights=True) as engine:
                loop = AgentLoop(engine, self.searcher, self.rollout, self.template)
                local = predict_shard(
                    loop,
                    self.questions,
                    rank=acc.process_index,
                    world_size=acc.num_processes,
                    batch_size=self.batch_size,
                )
        finally:
            model.train(was_training)
        predictions: list[Prediction] = gathered(acc, local)
        return aggregate(predictions)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.every <= 0 or state.global_step % self.every != 0:
            return
        self._run(args, state, control)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        best = Path(args.output_dir) / "best" / BEST_FILE
        if state.global_step > 0 and self.save_best:
            # Resumed: `best/` may hold a policy from before (or after) the checkpoint; only beat it. Read by the
            # main process for all: a node with an older view of the folder would decide alone to save (a
            # collective under FSDP or ZeRO-3).
            saved = on_main(
                self.trainer.accelerator,
                lambda: json.loads(best.read_text(encoding="utf-8"))["reward"] if best.is_file() else None,
            )
            if saved is not None:
                self.best_reward = saved
        if self.every > 0 and state.global_step == 0:
            self._run(args, state, control, log=False)

    def _run(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, log: bool = True
    ) -> None:
        started = time.perf_counter()
        metrics = self.evaluate()
        summary = {"step": state.global_step, **metrics, "seconds": time.perf_counter() - started}
        self.history.append(summary)
        if self.trainer.accelerator.is_main_process:
            logger.info(
                "held-out @ step %d: EM %.3f  F1 %.3f  searches %.2f  (%d questions, %.0f s)",
                state.global_step,
                metrics["em"],
                metrics["f1"],
                metrics["searches"],
                metrics["count"],
                summary["seconds"],
            )
            _append_jsonl(Path(args.output_dir) / "heldout.jsonl", summary)
        if log:
            for metric in mean_metrics():
                record_metric(self.trainer, f"heldout/{metric.name}", metrics[metric.name])
        if self.on_result is not None:
            self.on_result(state.global_step, metrics)
        if self.save_best and metrics["reward"] > self.best_reward:
            self.best_reward = metrics["reward"]
            best = Path(args.output_dir) / "best"
            self.trainer.save_model(str(best))
            if self.trainer.accelerator.is_main_process:
                record = {"step": state.global_step, "reward": metrics["reward"], "em": metrics["em"]}
                (best / BEST_FILE).write_text(json.dumps(record) + "\n", encoding="utf-8")
        if self.stop_at_em is not None and metrics["em"] >= self.stop_at_em:
            logger.info("held-out EM %.3f reached the target %.3f: stopping", metrics["em"], self.stop_at_em)
            control.should_training_stop = True
            control.should_save = True


def add_heldout_evaluation(
    trainer: Trainer,
    heldout: HeldoutSettings,
    rollout: RolloutSettings,
    template: PromptTemplate,
    searcher: Searcher | None,
    engine: TrainerEngine | None = None,
    on_result: Callable[[int, dict[str, float]], None] | None = None,
) -> None:
    """Attach a `HeldoutEvalCallback` (on the trainer's `engine`) when the settings ask for held-out evaluation."""
    if not heldout.file or heldout.every <= 0:
        return
    if searcher is None:
        raise ValueError("held-out evaluation needs a retriever")
    trainer.add_callback(
        HeldoutEvalCallback(
            trainer,
            read_questions(heldout.file, limit=heldout.limit),
            searcher,
            rollout,
            template,
            every=heldout.every,
            stop_at_em=heldout.stop_at_em,
            save_best=heldout.save_best,
            batch_size=heldout.batch_size,
            engine=engine,
            on_result=on_result,
        )
    )


class StepTimerCallback(TrainerCallback):
    """Logs `time/step_s` and `time/update_s` (the step minus the rollout time the rollout reported)."""

    def __init__(self, trainer: Trainer, rollout_seconds: Callable[[], float]) -> None:
        self.trainer = trainer
        self.rollout_seconds = rollout_seconds
        self._started = 0.0
        self._rollout_at_start = 0.0

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._started = time.perf_counter()
        self._rollout_at_start = self.rollout_seconds()

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        step = time.perf_counter() - self._started
        rollout = self.rollout_seconds() - self._rollout_at_start
        record_metric(self.trainer, "time/step_s", step)
        record_metric(self.trainer, "time/update_s", max(step - rollout, 0.0))


class RetrieverCacheCallback(TrainerCallback):
    """Logs `retriever/cache_hit_rate`: the share of this step's searches the server answered from its cache."""

    def __init__(self, trainer: Trainer, server_cache: Callable[[], dict[str, Any] | None]) -> None:
        self.trainer = trainer
        self.server_cache = server_cache  # RetrieverClient.server_cache: the one place that reads it
        self._last: dict[str, Any] | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._last = self.server_cache()  # searches before training (readiness, other runs) are not ours

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        now = self.server_cache()
        if now is None:
            return
        last = self._last or {"hits": 0, "misses": 0}
        self._last = now
        hits, lookups = (
            now["hits"] - last["hits"],
            now["hits"] + now["misses"] - last["hits"] - last["misses"],
        )
        if lookups > 0:  # a restarted server resets its counters: that step shows nothing
            record_metric(self.trainer, "retriever/cache_hit_rate", hits / lookups)


class SaveRunConfigCallback(TrainerCallback):
    """Writes the run's configuration into the run folder and every checkpoint: each says how it was made."""

    def __init__(self, config: Any) -> None:
        self.config = to_dict(config)

    def _write(self, folder: Path) -> None:
        if folder.is_dir():
            write_run_config(folder, self.config)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.is_world_process_zero:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            self._write(Path(args.output_dir))

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.is_world_process_zero:
            self._write(Path(args.output_dir) / f"checkpoint-{state.global_step}")


def _append_jsonl(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
