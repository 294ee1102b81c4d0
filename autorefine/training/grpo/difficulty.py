"""Difficulty filtering: GRPO trains on the questions whose groups can have a gradient.

A group whose G rewards are all equal has zero advantages and teaches nothing. Before training, every training
question is sampled K times with the starting policy (`DifficultyFilterSettings`); questions whose success rate
lies outside the band are left out of the training set. The samples' rewards are appended to
`<output_dir>/difficulty/<key>/rewards.jsonl`, one line per batch: an interrupted filter (or a resumed run) goes on
from there, and a rerun with the same policy, questions, sampling and rollout settings samples nothing. The key
hashes all of those, the policy by its weights. `summary.json` beside it holds the kept ids, the kept share and
the histogram of success rates.

With `refilter_every` N, every N optimizer steps the rollouts already sampled for training re-rate the
questions they were sampled for (the latest group of each): a question whose latest group left the band is
dropped from then on. The dropped ids are recorded per step in `<output_dir>/difficulty/refilter.json`, so a
resumed run drops the same ones.

On several processes (`accelerate launch`: DDP, DeepSpeed, FSDP) the batches are dealt out in turn, each process
sampling its share with its own engine, and every round's rewards are gathered to all processes, so every one
keeps the same questions. Only the main process reads and writes the files and hands what it read to the
others. The batches and their seeds do not depend on the number of processes, so a cache is reused on any.
Every process runs the same number of batches, the last ones possibly empty: a lockstep engine needs every
process in every turn. The re-filter sees every process's groups, so it drops the same questions everywhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset
from transformers import TrainerCallback

from autorefine.data import DifficultyFilterSettings, Question
from autorefine.files import file_sha256
from autorefine.protocol import PromptTemplate
from autorefine.rollout.agent import AgentLoop, RolloutSettings
from autorefine.scoring.reward import RewardSettings
from autorefine.scoring.trajectory import score_trajectories
from autorefine.training.arguments import RunError
from autorefine.training.distributed import gathered, on_main

if TYPE_CHECKING:
    from accelerate import PartialState
    from trl import GRPOTrainer

    from autorefine.rollout.engine import SamplingParams
    from autorefine.rollout.engines import TrainerEngine
    from autorefine.training.rewards import ScoredBatch

logger = logging.getLogger(__name__)

FOLDER = "difficulty"
REWARDS_FILE = "rewards.jsonl"
SUMMARY_FILE = "summary.json"
REFILTER_FILE = "refilter.json"
HISTOGRAM_BINS = 10


def policy_hash(model: torch.nn.Module) -> str:
    """sha256 of a model's weights (names, dtypes, shapes and bytes): which policy the samples came from.

    A model that DeepSpeed ZeRO-3 partitioned as it loaded is hashed whole, one gathered parameter at a time:
    then every process must call it (each gather is a collective).
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict(keep_vars=True).items()):
        with gathered_whole(tensor):
            data = tensor.detach()
            digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
            digest.update(data.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def zero3_partitioned(model: torch.nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 partitioned the model's parameters as it loaded (`zero.Init`)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def gathered_whole(tensor: torch.Tensor) -> contextlib.AbstractContextManager[Any]:
    """A ZeRO-3 partitioned parameter gathered whole on every process while inside; anything else as it is."""
    if not hasattr(tensor, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([tensor], modifier_rank=None)


def agreed_policy_hash(state: PartialState, model: torch.nn.Module) -> str:
    """`policy_hash` of the starting policy (before `accelerator.prepare`), the main process's on every process.

    The main process is the one sure to hold the whole weights then (FSDP's cpu_ram_efficient_loading trusts
    only local rank 0's, which it broadcasts at `prepare`), so it hashes alone and broadcasts: one hash, one
    cache folder, and no process's hash can differ. Under ZeRO-3 no process holds them whole: every process
    takes part in gathering each parameter, and the main process's digest is the one kept.
    """
    if zero3_partitioned(model):
        digest = policy_hash(model)
        return on_main(state, lambda: digest)
    return on_main(state, lambda: policy_hash(model))


def cache_key(
    policy: str,
    train_file: str,
    settings: DifficultyFilterSettings,
    params: SamplingParams,
    rollout: RolloutSettings,
    template: PromptTemplate,
    reward: RewardSettings,
    seed: int,
) -> str:
    """What the sampled rewards depend on (not the band or the success threshold: those are applied later)."""
    parts = {
        "policy": policy,
        "questions": file_sha256(Path(train_file)),
        "samples": settings.samples,
        "batch_questions": settings.batch_questions,  # seeds are per batch
        "sampling": asdict(params),
        "rollout": asdict(rollout),
        "template": hashlib.sha256(template.text.encode("utf-8")).hexdigest(),
        "reward": asdict(reward),
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class FilterResult:
    """The questions kept, every question's success rate, and where the samples are cached."""

    kept: list[Question]
    rates: dict[str, float]
    folder: Path
    sampled: int  # questions sampled by this call, on all processes (0: everything came from the cache)
    refilter: Refilter | None = None  # the re-filtering callback, when `refilter_every` is set

    @property
    def kept_share(self) -> float:
        """Share of the training questions kept."""
        return len(self.kept) / max(len(self.rates), 1)


def histogram(rates: Sequence[float]) -> list[int]:
    """Counts of success rates in HISTOGRAM_BINS equal bins over [0, 1] (1.0 falls into the last)."""
    counts = [0] * HISTOGRAM_BINS
    for rate in rates:
        counts[min(int(rate * HISTOGRAM_BINS), HISTOGRAM_BINS - 1)] += 1
    return counts


def success_rate(rewards: Sequence[float], settings: DifficultyFilterSettings) -> float:
    """Share of samples whose reward reaches the success threshold."""
    return sum(r >= settings.success_reward for r in rewards) / len(rewards)


def read_cached(path: Path) -> dict[str, list[float]]:
    """Rewards per question id from a (possibly partial) rewards file, one line per sampled batch.

    A line torn by a crash is cut from the file, so that batch is sampled again (with its own seed) and the
    next line appended starts on a line of its own.
    """
    cached: dict[str, list[float]] = {}
    if not path.is_file():
        return cached
    text = path.read_text(encoding="utf-8")
    good = 0  # characters of complete lines
    for line in text.splitlines(keepends=True):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        if not line.endswith("\n"):
            break
        cached.update(zip(row["ids"], row["rewards"], strict=True))
        good += len(line)
    if good < len(text):
        path.write_text(text[:good], encoding="utf-8")
    return cached


def shard_batches(todo: Sequence[Question], size: int, rank: int, world_size: int) -> list[list[Question]]:
    """This process's sampling batches: every `world_size`-th batch of `size` questions of `todo`, from `rank`.

    Every process gets as many batches as the busiest, the last ones possibly empty: under a lockstep engine
    each batch is collective (every process takes every turn, a sharded model's forward passes included), and
    the engines take part without prompts of their own, so no question is repeated to fill a batch.
    """
    batches = [list(todo[start : start + size]) for start in range(0, len(todo), size)]
    rounds = -(-len(batches) // world_size)
    mine = batches[rank::world_size]
    return mine + [[] for _ in range(rounds - len(mine))]


def sample_batch(
    chunk: list[Question],
    loop_for_batch: Any,
    params: SamplingParams,
    settings: DifficultyFilterSettings,
    reward: RewardSettings,
    seed: int,
) -> list[list[float]]:
    """The K rewards of each question of one batch (an empty batch still takes its turns with the others)."""
    if chunk:
        # Seeded per batch by its first question's position, on whichever process samples it, so a resumed
        # filter samples what an uninterrupted one would have.
        torch.manual_seed(seed)
    k = settings.samples
    repeated = [q for q in chunk for _ in range(k)]
    with loop_for_batch() as loop:
        trajectories = loop.run([q.question for q in repeated], params)
    scores = score_trajectories(trajectories, repeated, reward=reward) if chunk else []
    return [[s["reward"] for s in scores[i * k : (i + 1) * k]] for i in range(len(chunk))]


def append_batches(path: Path, batches: list[tuple[list[str], list[list[float]]]]) -> None:
    """Append one line per sampled batch to the rewards file (the main process's job)."""
    with path.open("a", encoding="utf-8") as out:
        for ids, rewards in batches:
            if ids:
                out.write(json.dumps({"ids": ids, "rewards": rewards}) + "\n")


def filter_questions(
    questions: Sequence[Question],
    loop_for_batch: Any,
    params: SamplingParams,
    settings: DifficultyFilterSettings,
    reward: RewardSettings,
    folder: Path,
    seed: int = 0,
    *,
    state: PartialState,
) -> FilterResult:
    """Sample the questions not yet in `folder`'s cache, then keep those whose success rate is in the band.

    `loop_for_batch()` is a context manager yielding the `AgentLoop` to sample one batch with. On several
    processes (`state`), every process calls this with the same questions: each samples its share of the
    batches, and all return the same result.
    """
    position = {q.id: i for i, q in enumerate(questions)}
    path = folder / REWARDS_FILE

    def read() -> dict[str, list[float]]:
        folder.mkdir(parents=True, exist_ok=True)
        return read_cached(path)

    # The main process reads (and mends) the file, the others take its reading: all agree on what is left.
    cached = on_main(state, read)
    todo = [q for q in questions if q.id not in cached]
    shard = shard_batches(todo, settings.batch_questions, state.process_index, state.num_processes)
    sampled = 0
    # The filter's own seeds must not move training's random stream: a run whose samples come from the cache
    # then trains exactly like one that sampled them.
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        for chunk in shard:
            first = seed + position[chunk[0].id] if chunk else seed
            rewards = sample_batch(chunk, loop_for_batch, params, settings, reward, first)
            # One batch from each process per round, in process order: the order of the batches in `todo`.
            batches = gathered(state, [([q.id for q in chunk], rewards)])
            for ids, batch_rewards in batches:
                cached.update(zip(ids, batch_rewards, strict=True))
                sampled += len(ids)
            # Written by the main process after every round (the resume unit); a failure there stops all.
            on_main(state, lambda batches=batches: append_batches(path, batches))
            if state.is_main_process:
                logger.info("difficulty filter: %d/%d questions sampled", len(cached), len(questions))
    rates = {q.id: success_rate(cached[q.id], settings) for q in questions}
    kept = [q for q in questions if settings.keeps(rates[q.id])]
    result = FilterResult(kept, rates, folder, sampled)
    flat = sum(len(set(cached[q.id])) == 1 for q in questions)
    summary = {
        "settings": asdict(settings),
        "questions": len(questions),
        "kept": len(kept),
        "kept_share": result.kept_share,
        "flat_share": flat / max(len(questions), 1),  # questions whose K rewards were all equal
        "rate_histogram": {"bins": HISTOGRAM_BINS, "counts": histogram(list(rates.values()))},
        "kept_ids": [q.id for q in kept],
    }
    on_main(state, lambda: write_summary(folder, summary))
    if state.is_main_process:
        logger.info(
            "difficulty filter: kept %d of %d questions (%.0f%%; success rate in (%g, %g)); %.0f%% had K equal "
            "rewards; success-rate histogram over [0, 1] in %d bins: %s (%s)",
            len(kept),
            len(questions),
            100 * result.kept_share,
            settings.low,
            settings.high,
            100 * summary["flat_share"],
            HISTOGRAM_BINS,
            summary["rate_histogram"]["counts"],
            "all from the cache" if sampled == 0 else f"{sampled} sampled now",
        )
    return result


def write_summary(folder: Path, summary: dict[str, Any]) -> None:
    """`summary.json`: the kept ids, the kept share and the histogram of success rates."""
    (folder / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


class KeptQuestions(Dataset):
    """The training rows of the kept questions; re-filtering drops rows, and an index past the end wraps.

    The length stays that of the first filter, so TRL's sampler (built once) keeps its epoch size; a dropped
    question's slots go to the questions still kept.
    """

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows
        self.active = list(range(len(rows)))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.rows[self.active[index % len(self.active)]]

    def drop(self, ids: set[str]) -> None:
        """Stop training on `ids`; at least one question always stays."""
        remaining = [i for i in self.active if self.rows[i]["id"] not in ids]
        self.active = remaining or self.active[:1]

    def active_ids(self) -> list[str]:
        """Ids still trained on."""
        return [self.rows[i]["id"] for i in self.active]


class Refilter(TrainerCallback):
    """Every `every` steps, drops the kept questions whose latest training group left the band.

    Every process sees every process's groups (a group may even be split across processes), so all drop the
    same questions: their datasets must stay alike, or TRL's shared sampler would deal them different prompts.
    """

    def __init__(
        self,
        dataset: KeptQuestions,
        settings: DifficultyFilterSettings,
        output_dir: Path,
        state: PartialState,
    ) -> None:
        self.dataset = dataset
        self.settings = settings
        self.path = output_dir / FOLDER / REFILTER_FILE
        self.state = state
        self.latest: dict[str, list[float]] = {}

    def observe(self, batch: ScoredBatch) -> None:
        """Remember each question's latest group of training rewards (a `TrajectoryRewards` subscriber)."""
        if not batch.training:  # the same on every process: the gather below is one call on each
            return
        # `all_rewards` holds every process's rows in process order; the ids are gathered to match.
        ids = gathered(self.state, list(batch.ids))
        if len(ids) != len(batch.all_rewards):
            raise RuntimeError(f"{len(ids)} ids gathered for {len(batch.all_rewards)} rewards")
        for start in range(0, len(ids), batch.group_size):
            self.latest[ids[start]] = batch.all_rewards[start : start + batch.group_size]

    def _history(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return json.loads(self.path.read_text(encoding="utf-8"))["history"]

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """A resumed run drops what the interrupted one had dropped by the step it resumes from."""
        # Read by the main process for all: a node with an older view of the file would drop other questions.
        for entry in on_main(self.state, self._history):
            if entry["step"] <= state.global_step:
                self.dataset.drop(set(entry["dropped"]))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Re-rate the questions sampled since the start and drop those out of the band."""
        if state.global_step % self.settings.refilter_every:
            return
        active = set(self.dataset.active_ids())
        dropped = sorted(
            qid
            for qid, rewards in self.latest.items()
            if qid in active and not self.settings.keeps(success_rate(rewards, self.settings))
        )
        self.dataset.drop(set(dropped))
        if args.process_index != 0:
            return
        history = [e for e in self._history() if e["step"] < state.global_step]
        history.append({"step": state.global_step, "dropped": dropped, "kept": len(self.dataset.active)})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"history": history}, indent=2) + "\n", encoding="utf-8")
        logger.info(
            "difficulty re-filter at step %d: dropped %d questions whose latest group left the band; %d kept",
            state.global_step,
            len(dropped),
            len(self.dataset.active),
        )


@contextlib.contextmanager
def policy_on_accelerator(trainer: GRPOTrainer, engine_mode: str) -> Iterator[None]:
    """The policy on the accelerator while the filter samples with it, back where it was afterwards."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    model, target = trainer.model, trainer.accelerator.device
    start = next(model.parameters()).device
    # Under ZeRO-1/2 and FSDP the Trainer leaves the model on the CPU until `train()` prepares it, so the
    # transformers engine would sample there. ZeRO-3 weights are already partitioned; vLLM holds its own copy
    # (moving the policy beside it would only take its memory).
    move = (
        engine_mode == "transformers"
        and start.type == "cpu"
        and target.type != "cpu"
        and not is_deepspeed_zero3_enabled()
    )
    if move:
        model.to(target)
    try:
        yield
    finally:
        if move:
            model.to(start)


def apply_difficulty_filter(
    trainer: GRPOTrainer,
    engine: TrainerEngine,
    questions: list[Question],
    config: Any,  # GRPORunConfig
    policy: str,
    template: PromptTemplate,
    searcher: Any,
) -> FilterResult:
    """Filter the trainer's training questions before `train()`; refuses a band that leaves too few."""
    from autorefine.training.rewards import question_rows
    from autorefine.training.search_rollout import rollout_sampling

    settings = config.data.difficulty_filter
    args = trainer.args
    params = rollout_sampling(args)
    processes = trainer.accelerator

    # The main process's key for all (it alone reads the question file's bytes for it): one cache folder.
    key = on_main(
        processes,
        lambda: cache_key(
            policy,
            config.data.train_file,
            settings,
            params,
            config.rollout,
            template,
            config.reward,
            args.seed,
        ),
    )
    folder = Path(args.output_dir) / FOLDER / key

    @contextlib.contextmanager
    def loop_for_batch():
        # push_weights: a colocated vLLM starts with the weights it loaded, which are the starting policy too.
        with engine.current_policy(push_weights=True) as current:
            yield AgentLoop(current, searcher, config.rollout, template)

    with policy_on_accelerator(trainer, engine.mode):
        result = filter_questions(
            questions, loop_for_batch, params, settings, config.reward, folder, args.seed, state=processes
        )
    per_batch = args.generation_batch_size // args.num_generations
    if len(result.kept) < per_batch:
        counts = histogram(list(result.rates.values()))
        raise RunError(
            f"data.difficulty_filter kept {len(result.kept)} of {len(result.rates)} questions (success rate in "
            f"({settings.low}, {settings.high}), success = reward >= {settings.success_reward}; rate histogram "
            f"over [0, 1] in {HISTOGRAM_BINS} bins: {counts}), fewer than the {per_batch} distinct questions of "
            "one generation batch. Widen the band, lower success_reward, or train on more questions "
            f"(samples are cached in {folder}: a rerun with another band samples nothing)"
        )
    dataset = KeptQuestions(question_rows(result.kept))
    trainer.train_dataset = dataset
    if settings.refilter_every:
        refilter = Refilter(dataset, settings, Path(args.output_dir), processes)
        trainer.add_callback(refilter)
        result.refilter = refilter
    return result
