"""GRPO on TRL's `GRPOTrainer` with the search-augmented agent loop as `rollout_func`.

TRL owns batching, grouping (`num_generations`), advantages, the clipped loss, KL, optimizer, checkpoints and
multi-GPU. We own the rollout (`autorefine.training.search_rollout`: exact sampled ids, `env_mask` over
inserted documents) and the rewards (`autorefine.training.rewards`: scored once on the model's own text, then
published to the health signals, the guard, flat-group dropping and sample files).
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from autorefine.api_key import API_KEY_ENV
from autorefine.config import GRPORunConfig
from autorefine.data import read_questions
from autorefine.modeling import (
    load_model_tokenizer,
    load_tokenizer_and_policy,
    lora_config,
    trained_weights_dtype,
)
from autorefine.protocol import PromptTemplate
from autorefine.retrieval import (
    RetrieverClient,
    RetrieverError,
    RetrieverUnavailableError,
    connect_retriever,
)
from autorefine.rollout.agent import longest_prompt
from autorefine.rollout.engine import GenerationError
from autorefine.rollout.engines import TrainerEngine, vllm_server_url
from autorefine.rollout.vllm_engine import colocated_max_model_len, served_models, serving_card
from autorefine.scoring.process import build_matcher
from autorefine.settings import check_trainer_args
from autorefine.training.arguments import RunError, check_saving, require_devices, with_trainer_defaults
from autorefine.training.callbacks import (
    RetrieverCacheCallback,
    SaveRunConfigCallback,
    StepTimerCallback,
    add_heldout_evaluation,
)
from autorefine.training.checkpoints import latest_checkpoint, save_final
from autorefine.training.distributed import (
    agreed_resume,
    check_shared_folder,
    on_every_process,
    on_main,
    process_hosts,
    start_processes,
)
from autorefine.training.grpo.difficulty import agreed_policy_hash, apply_difficulty_filter
from autorefine.training.grpo.flat_groups import DropFlatGroups
from autorefine.training.grpo.samples import LatestSamples, SampleTableCallback, SaveRolloutsCallback
from autorefine.training.guard import check_guard
from autorefine.training.guardrails import GuardCallback, Guardrails
from autorefine.training.health import rollout_means
from autorefine.training.preflight import Preflight, require_evidence
from autorefine.training.rewards import TrajectoryRewards, question_rows, reward_weights
from autorefine.training.search_rollout import SearchRollout, rollout_sampling
from autorefine.trl_private import save_full_checkpoint

if TYPE_CHECKING:
    from accelerate import PartialState
    from transformers import PreTrainedTokenizerBase
    from trl import GRPOTrainer

logger = logging.getLogger(__name__)


def build_dataset(path: str, limit: int | None = None):  # -> datasets.Dataset
    """A TRL prompt dataset of a question file (see `question_rows`)."""
    from datasets import Dataset

    questions = read_questions(path, limit=limit)
    if not questions:
        raise RunError(f"{path} holds no questions")
    return Dataset.from_list(question_rows(questions))


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


# Where a vLLM server is configured, for the errors that say it cannot be reached.
VLLM_SERVER_SETTINGS = (
    "It is found at trainer.vllm_server_host and trainer.vllm_server_port (or trainer.vllm_server_base_url): on "
    "another node, that node's address as the training nodes reach it; trainer.vllm_server_timeout waits longer "
    "for a server still loading. For the weight updates the server connects back to the main training process "
    "on trainer.vllm_group_port ({group_port}): that port must be open to it too."
)


def vllm_server_card(config: GRPORunConfig, args: Any) -> dict[str, Any]:
    """The vLLM server's card of the policy being trained; refused when unreachable or serving another model."""
    url = vllm_server_url(args)
    try:
        cards = served_models(url, timeout=args.vllm_server_timeout)
    except ConnectionError as err:
        raise RunError(f"{err}.\n{VLLM_SERVER_SETTINGS.format(group_port=args.vllm_group_port)}") from None
    trained = config.model.name_or_path
    card = serving_card(cards, trained)
    if card is None:
        served = ", ".join(str(c.get("root") or c.get("id")) for c in cards) or "no model"
        raise RunError(
            f"the vLLM server at {url} serves {served}, not the policy being trained ({trained}, "
            "model.name_or_path): the trainer replaces the served weights at every step, but the architecture, "
            "tokenizer and context window stay those of the model the server loaded. Serve the trained model: "
            f"`trl vllm-serve --model {trained}` (a copy at another path is recognised by its folder name; "
            f"otherwise add `--served-model-name {trained}`)"
        )
    return card


def vllm_context_window(
    config: GRPORunConfig, args: Any, *, contact_server: bool = True
) -> tuple[int, str] | None:
    """vLLM's context window known before any model loads, and where it comes from; None if not known yet."""
    if not args.use_vllm:
        return None
    if args.vllm_mode == "server" and not contact_server:
        return None  # the server's window is checked once the processes are up (`--check`: never)
    if args.vllm_mode == "server":
        url = vllm_server_url(args)
        limit = vllm_server_card(config, args).get("max_model_len")
        if not isinstance(limit, int):
            logger.warning(
                "the vLLM server at %s lists no max_model_len in GET /v1/models: whether the longest prompt + "
                "rollout.max_completion_tokens fits its context window is not checked at start",
                url,
            )
            return None
        return limit, f"the vLLM server at {url}: its --max-model-len, from GET /v1/models"
    if args.vllm_max_model_length:
        return args.vllm_max_model_length, "trainer.vllm_max_model_length"
    return None  # a colocated vLLM takes the model config's context length: known once it is built


def check_vllm_server_host(args: Any, hosts: list[str]) -> None:
    """Refuse a vLLM server on loopback in a job that spans machines: each machine would ask itself."""
    if not (args.use_vllm and args.vllm_mode == "server") or len(set(hosts)) < 2:
        return
    url = vllm_server_url(args)
    host = urlsplit(url).hostname or ""
    if host in ("0.0.0.0", "::", "localhost") or host.startswith("127."):
        raise RunError(
            f"this job runs on {len(set(hosts))} machines ({', '.join(dict.fromkeys(hosts))}) but the vLLM server "
            f"is at {url}, which each machine reaches as itself: set trainer.vllm_server_host (or "
            "trainer.vllm_server_base_url) to the generation node's address"
        )


def check_group_port(args: Any) -> None:
    """On the main process' node: refuse a trainer.vllm_group_port already taken (TRL's weight-update group
    listens there once the model is loaded; a clash would only show minutes later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", args.vllm_group_port))
        except OSError as err:
            raise RunError(
                f"trainer.vllm_group_port={args.vllm_group_port} is taken on {socket.gethostname()} "
                f"({err.strerror}): TRL's weight-update group listens there for the vLLM server; choose a free "
                "port"
            ) from None


def check_job(config: GRPORunConfig, args: Any) -> PartialState:
    """Once the processes are up: every node sees the output folder, and reaches the vLLM server, which in turn
    can reach the main process for the weight updates; the job's processes."""
    state = start_processes(args)
    hosts = process_hosts(state)
    check_vllm_server_host(args, hosts)
    if args.use_vllm and args.vllm_mode == "server":
        on_main(state, lambda: check_group_port(args))
    check_shared_folder(state, args.output_dir)
    return state


def rollout_questions(config: GRPORunConfig) -> list[str]:
    """Every question a run generates for: training questions, and held-out ones when evaluated."""
    questions = [q.question for q in read_questions(config.data.train_file)]
    heldout = config.heldout
    if heldout.file and heldout.every > 0:
        questions += [q.question for q in read_questions(heldout.file, limit=heldout.limit)]
    return questions


def check_context_window(
    config: GRPORunConfig,
    args: Any,
    tokenizer: PreTrainedTokenizerBase,
    window: tuple[int, str] | None = None,
    *,
    contact_server: bool = True,
) -> None:
    """Refuse a vLLM context window too small for the run's longest prompt + rollout.max_completion_tokens."""
    # Given (a built vLLM's), else the one known before loading.
    window = window or vllm_context_window(config, args, contact_server=contact_server)
    if window is None:
        return
    limit, source = window
    template = PromptTemplate.load(config.template)
    prompt, question = longest_prompt(rollout_questions(config), tokenizer, template, config.rollout.topk)
    completion = config.rollout.max_completion_tokens
    if prompt + completion <= limit:
        return
    lower = (
        f"or lower rollout.max_completion_tokens to {limit - prompt}"
        if limit > prompt
        else "(the prompt alone does not fit)"
    )
    raise RunError(
        f"the longest prompt ({prompt} tokens, question {question[:80]!r}) + rollout.max_completion_tokens "
        f"({completion}) = {prompt + completion} tokens do not fit vLLM's context window of {limit} tokens "
        f"({source}): a trajectory near its completion budget would ask vLLM for more (a vLLM server refuses "
        f"that with HTTP 400). Give vLLM at least {prompt + completion} tokens "
        f"(trainer.vllm_max_model_length, or the server's --max-model-len) {lower}"
    )


def check_colocated_context_window(
    config: GRPORunConfig, args: Any, tokenizer: PreTrainedTokenizerBase, engine: TrainerEngine
) -> None:
    """`check_context_window` for a colocated vLLM left to choose its own window (the model config's)."""
    if engine.mode != "colocate" or args.vllm_max_model_length:
        return  # the window was checked before loading
    limit = colocated_max_model_len(engine.engine.llm)
    source = "the colocated vLLM's, from the model config; trainer.vllm_max_model_length sets it"
    check_context_window(config, args, tokenizer, (limit, source))


def make_grpo_args(config: GRPORunConfig, *, check_only: bool = False):  # -> trl.GRPOConfig
    """TRL arguments from the `trainer` section, with the fields autorefine derives filled in, checked."""
    args = grpo_config(config, check_only=check_only)
    check_grpo_args(args)
    return args


def grpo_config(config: GRPORunConfig, *, check_only: bool = False):  # -> trl.GRPOConfig
    """TRL arguments from the `trainer` section plus what autorefine derives (`check_only`: built on the CPU
    where the GPU they ask for is missing, see `require_devices`)."""
    from trl import GRPOConfig

    derived = {
        "max_completion_length": "rollout.max_completion_tokens",
        "reward_weights": "reward (the AutoRefine reward has weight 1, logged metrics 0)",
        "remove_unused_columns": "autorefine (reward functions need the golden_answers column)",
    }
    values = with_trainer_defaults(
        check_trainer_args(GRPOConfig, config.trainer, forbidden=derived), GRPOConfig
    )
    require_devices(values, check_only=check_only)
    check_saving(values)
    values.setdefault("output_dir", "runs/grpo")
    if (
        values.get("bf16")
        and not config.lora.enabled
        and not isinstance(values.get("model_init_kwargs"), str)
    ):
        # TRL builds the KL reference like the policy, i.e. with fp32 master weights here; a frozen reference
        # needs no fp32 copy (it computes in bf16 under autocast anyway).
        values["model_init_kwargs"] = {"dtype": "bfloat16", **(values.get("model_init_kwargs") or {})}
    # TRL's completions table (with our extra columns) is the W&B table of sample trajectories.
    report_to = values.get("report_to") or []
    wants_table = "wandb" in ([report_to] if isinstance(report_to, str) else report_to)
    values.setdefault("log_completions", wants_table and config.logging.sample_table_every > 0)
    values.setdefault("num_completions_to_print", config.logging.sample_table_rows)
    args = GRPOConfig(
        **values,
        max_completion_length=config.rollout.max_completion_tokens,
        reward_weights=reward_weights(),
        remove_unused_columns=False,
    )
    return args


def check_grpo_args(args: Any) -> None:
    """Refuse trainer arguments a multi-turn GRPO run cannot honour (`check_rollout_args`) or resume exactly."""
    check_rollout_args(args)
    generate_every = args.steps_per_generation * args.num_iterations
    micro_steps = args.save_steps * args.gradient_accumulation_steps
    if args.save_steps and args.save_strategy == "steps" and micro_steps % generate_every:
        # TRL re-uses one generation batch for `generate_every` micro-batches (it counts `training_step` calls,
        # gradient_accumulation_steps per optimizer step) and does not checkpoint it.
        raise RunError(
            f"trainer.save_steps × gradient_accumulation_steps = {args.save_steps} × "
            f"{args.gradient_accumulation_steps} must be a multiple of steps_per_generation × num_iterations = "
            f"{generate_every} (both count micro-batches), or a resumed run would not match an uninterrupted one"
        )


def preflight(config: GRPORunConfig, pre: Preflight) -> dict[str, Any]:
    """Every check a GRPO start runs before it contacts a server or loads a model, in order; what they built."""
    from trl import GRPOConfig

    if pre.checking:
        pre.trainer(config.trainer, GRPOConfig)
    args = pre.run("trainer", lambda: grpo_config(config, check_only=pre.checking))
    built: dict[str, Any] = {"args": args}
    if args is not None:
        pre.run("trainer", lambda: check_grpo_args(args))
        built["guard"] = pre.run("guard", lambda: check_guard(config.guard, config.heldout, args))
    pre.run("model", lambda: trained_weights_dtype(config.model, config.lora))
    built["template"] = pre.run("template", lambda: PromptTemplate.load(config.template))
    built["train"] = pre.file("data.train_file", config.data.train_file, build_dataset)
    if config.reward.process_weight > 0 and built["train"] is not None:
        pre.run("reward.process_weight", lambda: require_evidence(built["train"]["evidence"], config))
    if config.heldout.file and config.heldout.every > 0:
        pre.file("heldout.file", config.heldout.file, lambda f: read_questions(f, limit=config.heldout.limit))
    built["tokenizer"] = pre.run("tokenizer", lambda: tokenizer_for_check(config, pre))
    if args is not None and built["tokenizer"] is not None and built["train"] is not None:
        # A vLLM server's window is read once the processes are up (`build_trainer`).
        pre.run(
            "context window",
            lambda: check_context_window(config, args, built["tokenizer"], contact_server=False),
        )
    if args is not None and args.use_vllm and args.vllm_mode == "server":
        pre.need(
            f"a vLLM server at {vllm_server_url(args)} serving {config.model.name_or_path}, whose context window "
            "holds the longest prompt"
        )
        pre.need(
            f"port {args.vllm_group_port} (trainer.vllm_group_port) of the main training node open to the vLLM "
            "server: it connects back there for the weight updates"
        )
    pre.retriever(config.retriever)
    return built


def tokenizer_for_check(config: GRPORunConfig, pre: Preflight) -> PreTrainedTokenizerBase | None:
    """The policy's tokenizer; on `--check`, one that cannot be loaded here (a hub name offline) is needed."""
    try:
        return load_model_tokenizer(config.model)
    except OSError:
        if not pre.checking:
            raise
        pre.need(
            f"the tokenizer of {config.model.tokenizer or config.model.name_or_path} (not loadable here)"
        )
        return None


def check_grpo(config: GRPORunConfig) -> int:
    """`train-grpo --check`: every configuration check, reported; 0 when none refuses, else 2."""
    pre = Preflight("train-grpo", checking=True)
    preflight(config, pre)
    return pre.report(config)


def build_trainer(
    config: GRPORunConfig, client: RetrieverClient | None = None
) -> tuple[GRPOTrainer, SearchRollout]:
    """The configured GRPOTrainer and its rollout function; checks the retriever before loading the model."""
    from trl import GRPOTrainer

    built = preflight(config, Preflight("train-grpo"))
    args, template, tokenizer = built["args"], built["template"], built["tokenizer"]
    state = check_job(config, args)
    if args.use_vllm and args.vllm_mode == "server":
        on_every_process(state, lambda: check_context_window(config, args, tokenizer))
    rewards = TrajectoryRewards(config.reward, build_matcher(config.reward.matcher), means=rollout_means)
    client = client or on_every_process(state, lambda: connect_retriever(config.retriever))
    difficulty = config.data.difficulty_filter
    tokenizer, model = load_tokenizer_and_policy(config.model, tokenizer=tokenizer, lora=config.lora)
    # The starting policy, before TRL wraps it (a LoRA run: the base weights its adapter starts from); the main
    # process's hash on every process (see `agreed_policy_hash`).
    policy = agreed_policy_hash(state, model) if difficulty.enabled else ""
    rollout = SearchRollout(client, config.rollout, template, config.eval_temperature)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=rewards.functions(),
        args=args,
        train_dataset=built["train"],
        processing_class=tokenizer,
        rollout_func=rollout,
        peft_config=lora_config(config.lora, model),
    )
    # One engine per trainer, shared by the rollouts and the held-out evaluation.
    rollout.engine = TrainerEngine(trainer)
    check_colocated_context_window(config, args, tokenizer, rollout.engine)
    trainer.add_callback(StepTimerCallback(trainer, lambda: rollout.total_seconds))
    if hasattr(client, "server_cache"):
        trainer.add_callback(RetrieverCacheCallback(trainer, client.server_cache))
    latest = LatestSamples()
    rewards.subscribe(latest)
    log = config.logging
    trainer.add_callback(SampleTableCallback(log.sample_table_every, log.sample_table_rows, latest))
    if log.save_rollouts:
        trainer.add_callback(SaveRolloutsCallback(latest))
    trainer.add_callback(SaveRunConfigCallback(config))
    guardrails = Guardrails(trainer, built["guard"], Path(args.output_dir) / "best")
    rewards.subscribe(guardrails.health.observe)
    add_heldout_evaluation(
        trainer,
        config.heldout,
        config.rollout,
        template,
        client,
        rollout.engine,
        on_result=guardrails.heldout_result,
    )
    guardrails.attach()  # after the held-out callback: a step's signals and rules see that step's evaluation
    if config.drop_flat_groups:
        rewards.subscribe(DropFlatGroups(trainer))
    if difficulty.enabled:
        questions = read_questions(config.data.train_file)
        kept = apply_difficulty_filter(trainer, rollout.engine, questions, config, policy, template, client)
        if kept.refilter is not None:
            rewards.subscribe(kept.refilter.observe)
    rewards.attach(trainer)
    return trainer, rollout


def failure_advice(err: Exception) -> tuple[str, str]:
    """What stopped a run (a retriever or generation engine failure), and what to fix before resuming."""
    if isinstance(err, RetrieverUnavailableError):
        return "The retriever stayed down", "Restart the retriever"
    if isinstance(err, RetrieverError) and err.status in (401, 403):
        # Most often the server was restarted with a new key; the key file is read again on resume.
        return (
            f"The retriever refused access (HTTP {err.status})",
            f"Give the run the retriever's current API key (retriever.api_key_file or ${API_KEY_ENV})",
        )
    if isinstance(err, RetrieverError):
        status = f" (HTTP {err.status})" if err.status else ""
        return f"The retriever answered with an error{status}", "Fix the retriever (see its log)"
    return "The generation engine failed", "Fix the generation engine (a vLLM server: see its log)"


def stop_with_checkpoint(trainer: GRPOTrainer, err: Exception, command: str) -> RunError:
    """Write a checkpoint of the interrupted run; the RunError that says why it stopped and how to resume."""
    if isinstance(err, GenerationError) and err.__cause__ is not None:
        # The message carries the cause's text; its traceback is what a crashed engine's bug report needs.
        logger.error("where the failure that stops training was raised:", exc_info=err.__cause__)
    what, fix = failure_advice(err)
    try:
        save_full_checkpoint(trainer)
    except Exception as save_failed:  # the state may be as broken as what stopped the run
        return RunError(
            f"{err}\n{what}, and writing a checkpoint failed too ({type(save_failed).__name__}: {save_failed}).\n"
            f"{fix}, then resume from the last saved checkpoint: {command} --resume latest"
        )
    saved = latest_checkpoint(Path(trainer.args.output_dir))
    return RunError(
        f"{err}\n{what}; training state was saved to {saved}.\n{fix}, then resume with: {command} --resume {saved}"
    )


def run_grpo(trainer: GRPOTrainer, resume: str | None = None, command: str = "autorefine train-grpo") -> Path:
    """Train; when the retriever or the engine fails, or the guard stops it, checkpoint and say how to resume."""
    output_dir = Path(trainer.args.output_dir)
    resume = agreed_resume(trainer.accelerator.state, output_dir, resume)
    try:
        trainer.train(resume_from_checkpoint=resume)
    except (RetrieverError, GenerationError) as err:
        # Any retriever failure (down, a 401 after a key change, a garbled answer) or engine failure.
        raise stop_with_checkpoint(trainer, err, command) from None
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
