"""IP-DPO (TeaRAG's iterative, process-aware DPO) on TRL's DPOTrainer, round after round.

A round: sample K trajectories per question with the current policy (the agent loop GRPO uses), score each
once (format, outcome, process), build typed preference pairs, train one epoch of masked DPO + NLL with the
round's starting policy as the frozen reference, save `round-k/` (a plain HF model folder with tokenizer and
run config), evaluate it on held-out questions. Each stage leaves files that mark it finished, so `--resume`
continues at the first unfinished stage of the last round:

    <output_dir>/round-k/samples.parts/   per-process samples while sampling (kept when sampling stops)
    <output_dir>/round-k/samples.jsonl    every sample with its scores        → sampling finished
    <output_dir>/round-k/pair_stats.json  what pair building found
    <output_dir>/round-k/pairs.jsonl      the pairs trained on                 → pairs finished
    <output_dir>/round-k/pairs.arrow/     those pairs as a dataset every process maps (TRL caches beside it)
    <output_dir>/round-k/dpo/             the DPOTrainer's checkpoints during the epoch
    <output_dir>/round-k/training.json    DPO metrics; the model files are next to it → training finished
    <output_dir>/round-k/summary.json     the round's numbers, held-out included → round finished
    <output_dir>/rounds.jsonl             one summary line per round (round 0: the starting policy)
    <output_dir>/start-policy/            with model.gguf_file: the GGUF starting policy as a plain folder
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from autorefine.config import IPDPORunConfig
from autorefine.data import read_questions
from autorefine.files import file_sha256, read_json, write_json, write_jsonl
from autorefine.modeling import trained_weights_dtype
from autorefine.protocol import PromptTemplate
from autorefine.retrieval import RetrieverUnavailableError, connect_retriever
from autorefine.rollout.agent import AgentLoop, Searcher
from autorefine.settings import to_dict, write_run_config
from autorefine.training.arguments import RunError
from autorefine.training.checkpoints import latest_checkpoint, merge_adapter
from autorefine.training.distributed import (
    all_succeeded,
    check_shared_folder,
    free_accelerator_memory,
    gathered,
    on_every_process,
    on_main,
    process_hosts,
    start_processes,
)
from autorefine.training.ipdpo.dpo import build_dpo_trainer, dpo_metrics, make_dpo_args
from autorefine.training.ipdpo.heldout import heldout_metrics
from autorefine.training.ipdpo.pairs import (
    PairError,
    PairStats,
    build_pairs,
    read_pairs,
    stats_of_pairs,
    too_few_pairs_message,
)
from autorefine.training.ipdpo.report import (
    example_pairs,
    log_round_to_wandb,
    pair_examples_markdown,
    print_round,
    sample_summary,
    start_wandb,
)
from autorefine.training.ipdpo.sampling import SampleStore
from autorefine.training.preflight import Preflight

logger = logging.getLogger(__name__)

DEFAULT_OUTPUT_DIR = "runs/ipdpo"


# --- one round's files ----------------------------------------------------------------------------------


class RoundFiles:
    """Where a round keeps what each stage produced (see the module docstring)."""

    def __init__(self, root: Path, index: int, samples_per_question: int) -> None:
        self.index = index
        self.dir = root / f"round-{index}"
        self.samples = SampleStore(self.dir, samples_per_question)
        self.pairs = self.dir / "pairs.jsonl"
        self.pair_stats = self.dir / "pair_stats.json"
        self.dpo = self.dir / "dpo"
        self.trained = self.dir / "training.json"
        self.summary = self.dir / "summary.json"
        self.heldout_predictions = self.dir / "heldout_predictions.jsonl"

    def stage(self) -> str:
        """The last finished stage: none, sampling, pairs, training or evaluation."""
        for name, marker in (
            ("evaluation", self.summary),
            ("training", self.trained),
            ("pairs", self.pairs),
            ("sampling", self.samples.final),
        ):
            if marker.is_file():
                return name
        return "none"


def existing_rounds(root: Path) -> list[int]:
    """Indices of the round folders under `root`."""
    return sorted(int(p.name.split("-")[1]) for p in root.glob("round-*") if p.name.split("-")[1].isdigit())


# --- checks at start ------------------------------------------------------------------------------------


def output_root(config: IPDPORunConfig) -> Path:
    """The run's folder: `trainer.output_dir`, else runs/ipdpo."""
    return Path(config.trainer.get("output_dir", DEFAULT_OUTPUT_DIR))


def needs_questions(config: IPDPORunConfig) -> bool:
    """Round 1 on given pairs needs no training questions; every sampled round does."""
    return config.rounds > 1 or config.pairs.file is None


def needs_retriever(config: IPDPORunConfig) -> bool:
    """Sampling and held-out evaluation search."""
    return needs_questions(config) or bool(config.heldout.file)


def check_combination(config: IPDPORunConfig, args: Any, *, resume: bool, processes: int) -> None:
    """Refuse settings that cannot work together (launch layout, engine, tokenizer, an existing run)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        # Under ZeRO-3, every from_pretrained builds a sharded model: the sampling and evaluation engines,
        # which load whole policies outside the trainer, could not generate.
        raise RunError(
            "train-ipdpo does not run under DeepSpeed ZeRO-3 (sampling loads whole policies); use "
            "configs/accelerate/multi_gpu_ddp.yaml, deepspeed_zero2.yaml or fsdp2.yaml"
        )
    if config.sampling.engine == "vllm" and processes > 1:
        raise RunError(
            f"sampling.engine=vllm starts one vLLM engine in one process; this run has {processes} "
            "processes. Use sampling.engine=transformers (every process samples its share) or one process."
        )
    if config.model.tokenizer not in (None, config.model.name_or_path):
        raise RunError(
            "train-ipdpo loads every policy with the tokenizer saved next to it; leave model.tokenizer unset "
            f"and save the tokenizer into {config.model.name_or_path}"
        )
    max_length = args.max_length
    if max_length is not None and max_length <= config.rollout.max_completion_tokens:
        logger.warning(
            "trainer.max_length=%d leaves no room for the prompt next to rollout.max_completion_tokens=%d: "
            "pairs longer than max_length are dropped (counted in each round's logs), never truncated",
            max_length,
            config.rollout.max_completion_tokens,
        )
    root = output_root(config)
    rounds = existing_rounds(root)
    if rounds and not resume:
        raise RunError(
            f"{root} already holds round-{rounds[-1]} of a run: add --resume to continue it, or choose "
            "another trainer.output_dir"
        )
    if rounds and rounds[-1] > config.rounds:
        raise RunError(f"{root} holds round-{rounds[-1]} but rounds={config.rounds}")


def count_pairs(path: str) -> int:
    """Pairs in a given pairs file, each checked (`read_pairs`)."""
    count = sum(1 for _ in read_pairs(path))
    logger.info("round 1 trains on %d given pairs from %s", count, path)
    return count


def training_questions(path: str) -> list[Any]:
    """The training questions, refused when there are none."""
    questions = read_questions(path)
    if not questions:
        raise RunError(f"{path} holds no questions")
    return questions


def preflight(
    config: IPDPORunConfig, pre: Preflight, *, resume: bool, processes: int = 1, args: Any = None
) -> dict[str, Any]:
    """Every check an IP-DPO start runs before it contacts a server or loads a model, in order (after the
    trainer arguments, which set up the processes); what they built."""
    if pre.checking:
        from trl import DPOConfig

        pre.trainer(config.trainer, DPOConfig)
        args = pre.run(
            "trainer", lambda: make_dpo_args(config, output_root(config) / "round-1" / "dpo", check_only=True)
        )
        pre.need("a launch with one process, DDP, DeepSpeed ZeRO-2 or FSDP (ZeRO-3 is refused)")
        if config.sampling.engine == "vllm":
            pre.need("one process: sampling.engine=vllm runs one vLLM engine")
    built: dict[str, Any] = {}
    pre.run("model", lambda: trained_weights_dtype(config.model, config.lora))
    if args is not None:
        pre.run("combination", lambda: check_combination(config, args, resume=resume, processes=processes))
    if config.model.gguf_file:
        pre.file("model.gguf_file", Path(config.model.name_or_path) / config.model.gguf_file, Path)
    built["template"] = pre.run("template", lambda: PromptTemplate.load(config.template))
    pre.file("pairs.file", config.pairs.file, count_pairs)
    if needs_questions(config):
        built["questions"] = pre.file("data.train_file", config.data.train_file, training_questions)
    heldout = config.heldout
    built["heldout"] = pre.file(
        "heldout.file", heldout.file, lambda f: read_questions(f, limit=heldout.limit)
    )
    if needs_retriever(config):
        pre.retriever(config.retriever)
    return built


def check_ipdpo(config: IPDPORunConfig, resume: bool = False) -> int:
    """`train-ipdpo --check`: every configuration check, reported; 0 when none refuses, else 2."""
    pre = Preflight("train-ipdpo", checking=True)
    preflight(config, pre, resume=resume)
    return pre.report(config)


# --- the run ------------------------------------------------------------------------------------------------


class IPDPORun:
    """One `train-ipdpo` run: its configuration, processes, retriever and questions, and its rounds."""

    def __init__(
        self,
        config: IPDPORunConfig,
        *,
        resume: bool = False,
        command: str = "autorefine train-ipdpo",
        searcher: Searcher | None = None,
    ) -> None:
        self.config = config
        self.command = command
        self.root = output_root(config)
        pre = Preflight("train-ipdpo")
        self.args = pre.run("trainer", lambda: make_dpo_args(config, self.root / "round-1" / "dpo"))
        self.state = start_processes(self.args)
        process_hosts(self.state)
        # Before anything reads the folder: a node that saw another one would take other decisions.
        check_shared_folder(self.state, self.root)
        # Every process decides from the folder as it is now: the main process writes round files only once all
        # have (a broadcast does not hold its sender back), and a refusal on any stops all.
        built = on_every_process(
            self.state,
            lambda: preflight(config, pre, resume=resume, processes=self.state.num_processes, args=self.args),
        )
        self.template = built["template"]
        self.given_pairs = Path(config.pairs.file) if config.pairs.file else None
        self.questions = built.get("questions") or []
        self.heldout = built.get("heldout") or []
        if searcher is None and needs_retriever(config):
            searcher = on_every_process(self.state, lambda: connect_retriever(config.retriever))
        self.searcher = searcher
        self.wandb: Any = None

    @contextlib.contextmanager
    def _on_every_process(self, stage: str, kept: str = "") -> Iterator[None]:
        """Run a stage's share on this process; a failure anywhere (a lost retriever most likely) stops every
        process with one message that says how to resume. What the stage held is freed either way."""
        state = self.state
        error = None
        try:
            yield
        except RetrieverUnavailableError as err:
            error = (
                f"process {state.process_index}: {err}\nThe retriever stayed down while {stage}"
                f"{'; ' + kept if kept else ''}.\nRestart the retriever, then resume with: {self.command} --resume"
            )
        except Exception as err:
            logger.exception("%s failed on process %d", stage, state.process_index)
            error = f"process {state.process_index}: {stage} failed: {type(err).__name__}: {err}"
        finally:
            free_accelerator_memory()
        all_succeeded(state, error)

    def _convert_gguf_start(self) -> None:
        """With `model.gguf_file`, convert the starting policy once into `<output_dir>/start-policy/` and start
        from that plain folder: every loader (sampling, evaluation, the reference, a LoRA merge) reads it as it
        reads a round's folder, and no later round looks for the GGUF file anywhere."""
        from autorefine.modeling import save_gguf_as_folder

        model = self.config.model
        if model.gguf_file is None:
            return
        source = Path(model.name_or_path) / model.gguf_file
        folder = self.root / "start-policy"
        record = folder / "gguf_source.json"

        def convert() -> None:
            if not source.is_file():
                raise RunError(f"model.gguf_file: {source} not found")
            digest = file_sha256(source)
            if record.is_file():
                converted = read_json(record)
                if converted["sha256"] == digest:
                    logger.info("starting from %s (converted from %s earlier)", folder, source)
                    return
                if existing_rounds(self.root):
                    raise RunError(
                        f"{folder} was converted from another GGUF file ({converted['path']}, sha256 "
                        f"{converted['sha256'][:12]}…) than {source}; the rounds of {self.root} started from it. "
                        "Resume with the same model, or choose another trainer.output_dir"
                    )
            logger.info("converting %s into a plain model folder, %s", source, folder)
            save_gguf_as_folder(source, folder)
            write_json(record, {"path": str(source), "sha256": digest})

        on_main(self.state, convert)
        plain = dataclasses.replace(model, name_or_path=str(folder), gguf_file=None)
        self.config = dataclasses.replace(self.config, model=plain)

    # -- the rounds --------------------------------------------------------------------------------------

    def run(self) -> Path:
        """Every round (skipping finished ones); returns the folder of the last round's policy."""
        config = self.config
        if self.state.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            write_run_config(self.root, config)
            self.wandb = start_wandb(to_dict(config), self.root, self.args)
        self._convert_gguf_start()
        config = self.config
        current = config.model.name_or_path
        if self.heldout and config.heldout.evaluate_start:
            start = RoundFiles(self.root, 0, config.sampling.samples_per_question)
            if not start.summary.is_file():
                metrics = self.evaluate(start, current)
                self._finish_round(start, {"round": 0, "policy": current, "heldout": metrics})
        for index in range(1, config.rounds + 1):
            current = str(self.round(index, current))
        if self.wandb is not None:
            self.wandb.finish()
        return Path(current)

    def round(self, index: int, policy: str) -> Path:
        """One round from `policy`; returns the folder of the policy it trained."""
        config = self.config
        files = RoundFiles(self.root, index, config.sampling.samples_per_question)
        stage = files.stage()
        if stage == "evaluation":
            logger.info("round %d: finished earlier, skipping", index)
            return files.dir
        if stage != "none":
            logger.info("round %d: resuming after its %s stage", index, stage)
        started = time.perf_counter()
        if stage != "training":
            if index == 1 and self.given_pairs is not None:
                self._use_given_pairs(files)
            else:
                if not files.samples.complete:
                    self.sample(files, policy)
                self.pair(files)
            stats = PairStats.from_dict(read_json(files.pair_stats)["stats"])
            if stats.pairs < config.pairs.min_pairs:
                raise RunError(too_few_pairs_message(stats, config.pairs, f"round {index}"))
            self.train(files, policy)
        heldout = self.evaluate(files, str(files.dir))
        summary = {
            "round": index,
            "policy": str(files.dir),
            "started_from": policy,
            "pairs": read_json(files.pair_stats)["stats"],
            "samples": read_json(files.pair_stats).get("samples", {}),
            "dpo": read_json(files.trained),
            "heldout": heldout,
            "seconds": time.perf_counter() - started,
        }
        self._finish_round(files, summary)
        return files.dir

    # -- stage 1: sampling -------------------------------------------------------------------------------

    def sample(self, files: RoundFiles, policy: str) -> None:
        """Every process samples its share of the round's questions (resumable), then the parts are merged."""
        from autorefine.rollout.engines import engine_from_checkpoint
        from autorefine.scoring.process import build_matcher
        from autorefine.training.ipdpo.sampling import Progress, round_questions, sample_questions

        config, state = self.config, self.state
        seed = self.args.seed
        questions = round_questions(self.questions, files.index, config.sampling.questions_per_round, seed)
        kept = on_main(state, files.samples.compact)
        done = files.samples.done_ids()
        remaining = [q for q in questions if q.id not in done]
        share = remaining[state.process_index :: state.num_processes]
        logger.info(
            "round %d: sampling %d questions × %d%s on %d process(es); this one: %d",
            files.index,
            len(remaining),
            config.sampling.samples_per_question,
            f" ({kept} sampled before)" if kept else "",
            state.num_processes,
            len(share),
        )
        kept_note = f"the samples so far are kept in {files.samples.parts}"
        with self._on_every_process(f"sampling round {files.index}", kept_note):
            engine = engine_from_checkpoint(
                policy,
                engine=config.sampling.engine,
                dtype=config.model.dtype,
                device=str(state.device),
                max_batch_size=config.sampling.engine_batch_size,
                seed=seed,
            )
            loop = AgentLoop(engine, self.searcher, config.rollout, self.template)
            sample_questions(
                loop,
                share,
                config.sampling,
                build_matcher(config.sampling.matcher),
                config.reward,
                files.samples.part(state.process_index),
                round_index=files.index,
                seed=seed * 1_000_003 + files.index * 10_007 + state.process_index * 7_919,
                rank=state.process_index,
                progress=Progress(f"round {files.index} sampling (process {state.process_index})"),
            )
            del engine, loop
        on_main(state, lambda: files.samples.finish([q.id for q in questions]))

    # -- stage 2: pairs ----------------------------------------------------------------------------------

    def pair(self, files: RoundFiles) -> None:
        """Pairs from the round's samples (rebuilt when the pair settings changed since they were built)."""
        settings = self.config.pairs

        def build() -> None:
            wanted = dataclasses.asdict(settings)
            if files.pairs.is_file() and read_json(files.pair_stats)["settings"] == wanted:
                return
            pairs, stats = build_pairs(files.samples.rows(), settings)
            samples = sample_summary(files.samples.rows())
            write_json(files.pair_stats, {"settings": wanted, "stats": stats.to_dict(), "samples": samples})
            files.pairs.unlink(missing_ok=True)
            if stats.pairs >= settings.min_pairs:  # else the stage stays unfinished: resume rebuilds
                write_jsonl(files.pairs, pairs)

        on_main(self.state, build)

    def _use_given_pairs(self, files: RoundFiles) -> None:
        assert self.given_pairs is not None

        def copy() -> None:
            if files.pairs.is_file():
                return
            pairs = list(read_pairs(self.given_pairs))
            stats = stats_of_pairs(pairs)
            wanted = dataclasses.asdict(self.config.pairs)
            write_json(
                files.pair_stats,
                {"settings": wanted, "stats": stats.to_dict(), "source": str(self.given_pairs)},
            )
            write_jsonl(files.pairs, pairs)

        on_main(self.state, copy)

    # -- stage 3: training -------------------------------------------------------------------------------

    def train(self, files: RoundFiles, policy: str) -> None:
        """One epoch of masked DPO from `policy` (also the frozen reference); the result saved in round-k/."""
        config, state = self.config, self.state
        args = make_dpo_args(config, files.dpo)
        trainer, data = build_dpo_trainer(
            config, args, policy, files.pairs, config.logging.pair_accuracy_pairs
        )
        logger.info(
            "round %d: DPO on %d pairs (%d dropped as longer than trainer.max_length=%s)",
            files.index,
            data["pairs"],
            data["dropped_for_length"],
            args.max_length,
        )
        checkpoint = latest_checkpoint(files.dpo)
        trainer.train(resume_from_checkpoint=checkpoint)
        metrics = dpo_metrics(trainer.state.log_history)
        if trainer.eval_dataset is not None:
            # TRL logs its DPO metrics of an evaluation (with the `eval_` prefix) rather than returning them.
            trainer.evaluate()
            after = next(h for h in reversed(trainer.state.log_history) if "eval_rewards/accuracies" in h)
            metrics["pairs_reward_accuracy"] = after["eval_rewards/accuracies"]
            metrics["pairs_reward_margin"] = after["eval_rewards/margins"]
            metrics["pairs_evaluated"] = len(trainer.eval_dataset)
        metrics.update(data)
        if config.lora.enabled:
            trainer.save_model(str(files.dir / "adapter"))
        else:
            trainer.save_model(str(files.dir))
        tokenizer = trainer.processing_class
        del trainer
        free_accelerator_memory()

        def finish() -> None:
            if config.lora.enabled:
                merge_adapter(policy, files.dir / "adapter", files.dir)
                tokenizer.save_pretrained(str(files.dir))
            write_run_config(files.dir, config)
            write_json(files.trained, metrics)

        on_main(state, finish)

    # -- stage 4: held-out evaluation --------------------------------------------------------------------

    def evaluate(self, files: RoundFiles, policy: str) -> dict[str, float]:
        """Greedy held-out metrics of `policy`, questions split across processes; predictions saved."""
        from autorefine.evaluation.predictions import Prediction
        from autorefine.evaluation.runner import GREEDY, predict
        from autorefine.rollout.engines import engine_from_checkpoint

        if not self.heldout:
            return {}
        config, state = self.config, self.state
        share = self.heldout[state.process_index :: state.num_processes]
        local: list[Prediction] = []
        started = time.perf_counter()
        with self._on_every_process(f"evaluating round {files.index} on held-out questions"):
            engine = engine_from_checkpoint(policy, dtype=config.model.dtype, device=str(state.device))
            loop = AgentLoop(engine, self.searcher, config.rollout, self.template)
            local = predict(loop, share, GREEDY, batch_size=config.heldout.batch_size, reward=config.reward)
            del engine, loop
        predictions = gathered(state, local)
        metrics = heldout_metrics(self.heldout, predictions)
        metrics["seconds"] = time.perf_counter() - started

        def save() -> None:
            write_jsonl(files.heldout_predictions, (p.to_row() for p in predictions))

        on_main(state, save)
        return metrics

    # -- logging -----------------------------------------------------------------------------------------

    def _finish_round(self, files: RoundFiles, summary: dict[str, Any]) -> None:
        def write() -> None:
            write_json(files.summary, summary)
            # Rebuilt from every finished round, so a resumed run never holds a round twice or misses one.
            finished = sorted(
                self.root.glob("round-*/summary.json"), key=lambda p: int(p.parent.name.split("-")[1])
            )
            write_jsonl(self.root / "rounds.jsonl", (read_json(path) for path in finished))
            examples = (
                example_pairs(files.pairs, self.config.logging.pair_table_rows)
                if files.pairs.is_file()
                else []
            )
            if examples:
                (files.dir / "pair_examples.md").write_text(
                    pair_examples_markdown(examples), encoding="utf-8"
                )
            print_round(summary, self._baseline())
            if self.wandb is not None:
                log_round_to_wandb(self.wandb, summary, examples)

        on_main(self.state, write)

    def _baseline(self) -> dict[str, float] | None:
        start = self.root / "round-0" / "summary.json"
        return read_json(start).get("heldout") if start.is_file() else None


def train_ipdpo(
    config: IPDPORunConfig,
    resume: bool = False,
    command: str = "autorefine train-ipdpo",
    searcher: Searcher | None = None,
) -> Path:
    """Run (or resume) every round; returns the folder of the final policy."""
    return IPDPORun(config, resume=resume, command=command, searcher=searcher).run()


def build_pairs_file(
    config: IPDPORunConfig, samples: Path, out: Path, *, rescore: bool = False, questions: str | None = None
) -> PairStats:
    """Pairs from a saved samples file with the config's pair settings (re-scored first with `rescore`)."""
    from autorefine.scoring.process import build_matcher
    from autorefine.training.ipdpo.sampling import read_sample_rows, rescore_rows

    if not samples.is_file():
        raise PairError(f"samples file not found: {samples}")
    rows = read_sample_rows(samples)
    if rescore:
        by_id = {q.id: q for q in read_questions(questions or config.data.train_file)}
        rows = rescore_rows(rows, by_id, build_matcher(config.sampling.matcher), config.reward)
    pairs, stats = build_pairs(rows, config.pairs)
    write_jsonl(out, pairs)
    stats_file = out.with_name(out.stem + ".stats.json")
    write_json(
        stats_file,
        {"settings": dataclasses.asdict(config.pairs), "stats": stats.to_dict(), "source": str(samples)},
    )
    return stats
