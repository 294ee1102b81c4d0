"""GRPO on TRL's `GRPOTrainer` with the search-augmented agent loop as `rollout_func`.

TRL owns batching, grouping (`num_generations`), advantages, the clipped loss, KL, optimizer, checkpoints and
multi-GPU. We own the rollout: exact sampled ids, `env_mask` over inserted documents (excluded from loss, KL
and entropy; still attended), and rewards scored on the model's own text.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from autorefine.config import GRPORunConfig, check_trainer_args, to_dict
from autorefine.data import read_questions
from autorefine.modeling import load_tokenizer_and_policy, lora_config
from autorefine.protocol import PromptTemplate
from autorefine.retrieval import RetrieverClient, RetrieverUnavailableError, connect_retriever
from autorefine.rewards import RewardBreakdown, RewardConfig, trajectory_reward
from autorefine.rollout.agent import AgentLoop, RolloutConfig
from autorefine.rollout.engine import SamplingParams
from autorefine.rollout.engines import TrainerEngine
from autorefine.rollout.trajectory import Trajectory
from autorefine.training.callbacks import (
    SampleTableCallback,
    SaveRolloutsCallback,
    SaveRunConfigCallback,
    StepTimerCallback,
    add_heldout_evaluation,
    save_final,
)
from autorefine.training.flat_groups import DropFlatGroups
from autorefine.training.guardrails import GuardCallback, Guardrails, check_guard
from autorefine.training.trainer_args import RunError, require_devices, with_trainer_defaults
from autorefine.training.trl_private import after_scoring, record_metric, save_full_checkpoint

if TYPE_CHECKING:
    from trl import GRPOTrainer

logger = logging.getLogger(__name__)

# Reward components logged next to the reward itself (weight 0: they never change the advantage).
LOGGED_COMPONENTS = ("em", "f1", "cover_em", "refine_hit", "has_answer", "format")


class SearchRollout:
    """TRL `rollout_func`: the agent loop on this process's prompts (questions, repeated per group)."""

    def __init__(
        self,
        searcher: RetrieverClient,
        rollout: RolloutConfig,
        template: PromptTemplate,
        eval_temperature: float,
    ):
        self.searcher = searcher
        self.rollout = rollout
        self.template = template
        self.eval_temperature = eval_temperature
        self.total_seconds = 0.0
        self.latest: list[tuple[str, Trajectory]] = []
        self.batches = 0  # rollout batches produced so far (training and evaluation)
        self.engine: TrainerEngine | None = None  # the trainer's engine (`build_trainer` shares it)

    def __call__(self, prompts: list[str], trainer: GRPOTrainer) -> dict[str, list[Any]]:
        """Run one batch of rollouts; returns TRL's required keys plus `env_mask` and reward inputs."""
        started = time.perf_counter()
        training = trainer.model.training
        params = rollout_sampling(trainer.args, None if training else self.eval_temperature)
        if self.engine is None:
            self.engine = TrainerEngine(trainer)
        # TRL pushed the current weights to vLLM just before calling us.
        with self.engine.current_policy() as engine:
            loop = AgentLoop(engine, self.searcher, self.rollout, self.template)
            trajectories = loop.run(prompts, params)
        elapsed = time.perf_counter() - started
        self.total_seconds += elapsed
        self.latest = list(zip(prompts, trajectories, strict=True))
        self.batches += 1
        if training:
            self._record(trainer, loop.last_timings.retrieval_s, elapsed)
        return {
            "prompt_ids": [t.prompt_ids for t in trajectories],
            "completion_ids": [t.completion_ids for t in trajectories],
            "logprobs": [t.logprobs for t in trajectories],
            "env_mask": [t.env_mask for t in trajectories],
            # TRL's decoded completions include the documents: rewards read the trajectories instead.
            "trajectory": trajectories,
            "finish_reason": [str(t.finish_reason) for t in trajectories],
        }

    def _record(self, trainer: GRPOTrainer, retrieval_s: float, rollout_s: float) -> None:
        """Rollout timings, averaged over every process (per-trajectory signals: `HealthCallback`)."""
        times = trainer.accelerator.gather(
            torch.tensor([rollout_s, retrieval_s], device=trainer.accelerator.device)
        )
        times = times.view(-1, 2).mean(0)
        record_metric(trainer, "time/rollout_s", times[0].item())
        record_metric(trainer, "time/retrieval_s", times[1].item())


class TrajectoryScores:
    """Reward breakdowns of the current batch, computed once per trajectory and shared by every component."""

    def __init__(self, config: RewardConfig) -> None:
        self.config = config
        self._scored: dict[int, tuple[Trajectory, RewardBreakdown]] = {}

    def breakdowns(self, trajectories: list[Trajectory], golds: list[list[str]]) -> list[RewardBreakdown]:
        """One breakdown per trajectory; a trajectory already scored in this batch is not scored again."""
        out = []
        for trajectory, answers in zip(trajectories, golds, strict=True):
            kept = self._scored.get(id(trajectory))
            if kept is None or kept[0] is not trajectory:
                kept = (trajectory, trajectory_reward(trajectory, answers, self.config))
            out.append(kept[1])
        # Keep only this batch: ids of freed trajectories may be reused by the next one.
        self._scored = {id(t): (t, b) for t, b in zip(trajectories, out, strict=True)}
        return out

    def rewards_of(self, inputs: list[dict[str, Any]]) -> list[float]:
        """The AutoRefine reward of each row TRL scored (its `trajectory` and `golden_answers` columns)."""
        rows = self.breakdowns([x["trajectory"] for x in inputs], [x["golden_answers"] for x in inputs])
        return [b.reward for b in rows]


class RewardComponent:
    """A TRL reward function returning one component of the AutoRefine reward (named for TRL's logs)."""

    def __init__(
        self,
        component: str,
        scores: TrajectoryScores,
        on_scored: Callable[[list[str], list[Trajectory], list[float]], None] | None = None,
    ) -> None:
        self.component = component
        self.scores = scores
        self.on_scored = on_scored
        self.__name__ = component
        self.latest: list[tuple[str, list[str], float]] = []

    def __call__(
        self,
        prompts: list[Any],
        completions: list[Any],
        trajectory: list[Trajectory],
        golden_answers: list[list[str]],
        **kwargs: Any,
    ) -> list[float]:
        """Scores of what the agent loop accepted (never TRL's decoded text, which includes documents)."""
        scores = [getattr(b, self.component) for b in self.scores.breakdowns(trajectory, golden_answers)]
        ids = kwargs.get("id") or [""] * len(scores)
        self.latest = list(zip(ids, golden_answers, scores, strict=True))
        if self.on_scored is not None:
            self.on_scored(list(ids), list(trajectory), scores)
        return scores


def rollout_records(rollout: SearchRollout, reward: RewardComponent) -> list[dict[str, Any]]:
    """This process's latest trajectories with their question id, golds and reward."""
    rows = []
    for (question, t), (qid, golds, score) in zip(rollout.latest, reward.latest, strict=False):
        rows.append(
            {
                "id": qid,
                "question": question,
                "golds": " | ".join(golds),
                "trajectory": "".join(f"[{s.kind}] {s.text}\n" for s in t.segments if s.kind != "eos"),
                "answer": t.answer or "",
                "reward": score,
                "finish": str(t.finish_reason),
                "searches": t.num_searches,
                "prompt_ids": t.prompt_ids,
                "completion_ids": t.completion_ids,
                "env_mask": t.env_mask,
            }
        )
    return rows


def build_dataset(path: str, limit: int | None = None):  # -> datasets.Dataset
    """A TRL prompt dataset: `prompt` is the raw question (templating happens inside the rollout)."""
    from datasets import Dataset

    questions = read_questions(path, limit=limit)
    if not questions:
        raise RunError(f"{path} holds no questions")
    return Dataset.from_list(
        [{"id": q.id, "prompt": q.question, "golden_answers": q.golden_answers} for q in questions]
    )


def rollout_sampling(args: Any, temperature: float | None = None) -> SamplingParams:
    """Token sampling of rollouts from the trainer's arguments (`temperature` overrides theirs, e.g. greedy 0)."""
    return SamplingParams(
        temperature=args.temperature if temperature is None else temperature,
        top_p=args.top_p,
        top_k=args.top_k or 0,
        min_p=args.min_p or 0.0,
        repetition_penalty=args.repetition_penalty,
    )


# TRL's importance-sampling corrections that weight a whole trajectory by the product of its token ratios.
SEQUENCE_LEVEL_IS = ("sequence_mask", "sequence_truncate")


def check_rollout_args(args: Any) -> None:
    """Refuse, at start, trainer settings the rollout engines cannot honour or that would bias training."""
    if args.generation_kwargs:
        raise RunError(
            f"trainer.generation_kwargs ({sorted(args.generation_kwargs)}) is not passed to the multi-turn "
            "rollout engines; set trainer.temperature, top_p, top_k, min_p or repetition_penalty instead"
        )
    if args.use_vllm and args.vllm_structured_outputs_regex:
        raise RunError("trainer.vllm_structured_outputs_regex is not supported with multi-turn rollouts")
    if args.use_vllm and args.vllm_enable_sleep_mode:
        raise RunError(
            "trainer.vllm_enable_sleep_mode is not supported with multi-turn rollouts; turn it off"
        )
    sampling = rollout_sampling(args)
    filters = [
        name
        for name, on in (
            (f"top_p={sampling.top_p}", sampling.top_p < 1),
            (f"top_k={sampling.top_k}", sampling.top_k > 0),
            (f"min_p={sampling.min_p}", sampling.min_p > 0),
            (f"repetition_penalty={sampling.repetition_penalty}", sampling.repetition_penalty != 1),
        )
        if on
    ]
    sequence_level = args.vllm_importance_sampling_mode in SEQUENCE_LEVEL_IS
    if args.use_vllm and args.vllm_importance_sampling_correction and sequence_level and filters:
        raise RunError(
            f"trainer.{', '.join(filters)} cannot be combined with use_vllm and the sequence-level "
            f"vllm_importance_sampling_mode={args.vllm_importance_sampling_mode}: vLLM reports log-probs after "
            "these filters (TRL starts it with logprobs_mode=processed_logprobs) and the trainer recomputes "
            "them without, so every trajectory's correction is the product of its tokens' kept probability "
            "mass (measured on the synthetic warm start at top_p=0.95: 0.63 on average for 48 model tokens, "
            "about 0.05 at 300) and scales its policy-gradient term down (not KL, not entropy). "
            "Sample training rollouts with top_p: 1.0, top_k: 0, min_p: 0.0, repetition_penalty: 1.0, or use "
            "a token-level correction (vllm_importance_sampling_mode: token_truncate or token_mask)"
        )


def make_grpo_args(config: GRPORunConfig):  # -> trl.GRPOConfig
    """TRL arguments from the `trainer` section, with the fields autorefine derives filled in."""
    from trl import GRPOConfig

    derived = {
        "max_completion_length": "rollout.max_completion_tokens",
        "reward_weights": "reward (the AutoRefine reward has weight 1, logged components 0)",
        "remove_unused_columns": "autorefine (reward functions need the golden_answers column)",
    }
    values = with_trainer_defaults(
        check_trainer_args(GRPOConfig, config.trainer, forbidden=derived), GRPOConfig
    )
    require_devices(values)
    values.setdefault("output_dir", "runs/grpo")
    args = GRPOConfig(
        **values,
        max_completion_length=config.rollout.max_completion_tokens,
        reward_weights=[1.0] + [0.0] * len(LOGGED_COMPONENTS),
        remove_unused_columns=False,
    )
    check_rollout_args(args)
    generate_every = args.steps_per_generation * args.num_iterations
    if args.save_steps and args.save_strategy == "steps" and args.save_steps % generate_every:
        # TRL re-uses one generation batch for `generate_every` optimizer steps and does not checkpoint it.
        raise RunError(
            f"trainer.save_steps={args.save_steps} must be a multiple of steps_per_generation × num_iterations "
            f"= {generate_every}, or a resumed run would not match an uninterrupted one"
        )
    return args


def build_trainer(
    config: GRPORunConfig, client: RetrieverClient | None = None
) -> tuple[GRPOTrainer, SearchRollout]:
    """The configured GRPOTrainer and its rollout function; checks the retriever before loading the model."""
    from trl import GRPOTrainer

    args = make_grpo_args(config)
    guard_settings = check_guard(config, args)
    template = PromptTemplate.load(config.template)
    train = build_dataset(config.data.train_file)
    client = client or connect_retriever(config.retriever)
    tokenizer, model = load_tokenizer_and_policy(config.model)
    rollout = SearchRollout(client, config.rollout, template, config.eval_temperature)
    scores = TrajectoryScores(config.reward)
    rewards = [RewardComponent(c, scores) for c in ("reward", *LOGGED_COMPONENTS)]
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=rewards,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        rollout_func=rollout,
        peft_config=lora_config(config.lora, model),
    )
    # One engine per trainer, shared by the rollouts and the held-out evaluation.
    rollout.engine = TrainerEngine(trainer)
    trainer.add_callback(StepTimerCallback(trainer, lambda: rollout.total_seconds))
    log = config.logging
    trainer.add_callback(
        SampleTableCallback(
            log.sample_table_every, log.sample_table_rows, lambda: rollout_records(rollout, rewards[0])
        )
    )
    if log.save_rollouts:
        trainer.add_callback(
            SaveRolloutsCallback(lambda: (rollout.batches, rollout_records(rollout, rewards[0])))
        )
    trainer.add_callback(SaveRunConfigCallback(to_dict(config)))
    guardrails = Guardrails(trainer, guard_settings, Path(args.output_dir) / "best")
    rewards[0].on_scored = guardrails.health.observe  # every scored batch, with its question ids and rewards
    add_heldout_evaluation(trainer, config, client, rollout.engine, on_result=guardrails.heldout_result)
    guardrails.attach()  # after the held-out callback: a step's signals and rules see that step's evaluation
    if config.drop_flat_groups:
        after_scoring(trainer, DropFlatGroups(trainer, scores.rewards_of))
    return trainer, rollout


def latest_checkpoint(output_dir: str | Path) -> str | None:
    """Path of the newest `checkpoint-N` directory, or None."""
    checkpoints = sorted(Path(output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return str(checkpoints[-1]) if checkpoints else None


def run_grpo(trainer: GRPOTrainer, resume: str | None = None, command: str = "autorefine train-grpo") -> Path:
    """Train; on a lost retriever or a guard `stop`, write a checkpoint and stop with the command that resumes."""
    output_dir = Path(trainer.args.output_dir)
    if resume == "latest":
        resume = latest_checkpoint(output_dir)
        if resume is None:
            raise RunError(f"--resume latest: no checkpoint-* directory in {output_dir}")
    try:
        trainer.train(resume_from_checkpoint=resume)
    except RetrieverUnavailableError as err:
        save_full_checkpoint(trainer)
        saved = latest_checkpoint(output_dir)
        raise RunError(
            f"{err}\nThe retriever stayed down; training state was saved to {saved}.\n"
            f"Restart the retriever, then resume with: {command} --resume {saved}"
        ) from None
    guard = next((c for c in trainer.callback_handler.callbacks if isinstance(c, GuardCallback)), None)
    if guard is not None and guard.stopped is not None:
        saved = latest_checkpoint(output_dir)
        lr = trainer.optimizer.param_groups[0]["lr"] if trainer.optimizer is not None else None
        best = output_dir / "best"
        raise RunError(
            f"the guard stopped training: {guard.stopped.message}\n"
            f"Training state was saved to {saved}. Resume with: {command} --resume {saved}\n"
            + (
                f"or start again from the best policy with a lower learning rate: {command} "
                f"model.name_or_path={best} trainer.learning_rate={lr / 2:.3g} trainer.output_dir=<new folder>"
                if best.is_dir() and lr
                else ""
            )
        )
    return save_final(trainer)


def train_grpo(
    config: GRPORunConfig, resume: str | None = None, command: str = "autorefine train-grpo"
) -> Path:
    """Build the trainer from a config and run it (see `run_grpo`)."""
    trainer, _ = build_trainer(config)
    return run_grpo(trainer, resume, command)
