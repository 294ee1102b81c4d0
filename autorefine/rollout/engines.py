"""Every generation engine is built here: for a trainer's live policy, or from a saved checkpoint.

- `TrainerEngine(trainer)`: whatever generates while a trainer trains (GRPO rollouts, held-out evaluation, a
  trainer that samples its own trajectories). It builds the engine the trainer is configured with, once:
  TRL's colocated `vllm.LLM`, a vLLM server through TRL's client, or transformers' `generate` over the
  trainer's model. `with trainer_engine.current_policy() as engine:` readies it for one batch.
- `engine_from_checkpoint(path, ...)`: `autorefine evaluate` / `infer`, or sampling from a saved policy.

With several processes, generation is lockstep (`autorefine.rollout.lockstep`): the engine carries a
`Lockstep` over all processes, so the agent loop calls it once per turn on every process until none has work
left, and a searcher failure on one process is raised on all. Where the engine itself needs every process in
each call (a model sharded by FSDP or ZeRO-3; a tensor-parallel colocated vLLM), it takes part even without
prompts of its own. In vLLM server mode only the main process pushes weights, so every process waits for it
before the first turn of a batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

import torch

from autorefine.rollout.engine import GenerationEngine
from autorefine.rollout.hf_engine import TransformersEngine
from autorefine.rollout.lockstep import Lockstep
from autorefine.rollout.vllm_engine import VLLMEngine, require_vllm
from autorefine.trl_private import colocated_vllm, push_weights_to_vllm

if TYPE_CHECKING:
    from transformers import Trainer

EngineName = Literal["transformers", "vllm"]


class TrainerEngine:
    """The configured generation engine over a trainer's current policy, built once per trainer."""

    def __init__(self, trainer: Trainer) -> None:
        from trl.distributed import DistributedBackend

        self.trainer = trainer
        accelerator = trainer.accelerator
        self.lockstep = Lockstep(device=accelerator.device) if accelerator.num_processes > 1 else None
        tokenizer = trainer.processing_class
        generation_eos = getattr(trainer.model.generation_config, "eos_token_id", None)
        args = trainer.args
        self.mode: Literal["transformers", "colocate", "server"] = (
            args.vllm_mode if getattr(trainer, "use_vllm", False) else "transformers"
        )
        self.engine: GenerationEngine
        if self.mode == "colocate":
            llm, tp_group = colocated_vllm(trainer)
            self.engine = VLLMEngine(
                tokenizer, llm=llm, generation_eos=generation_eos, tp_group=tp_group, lockstep=self.lockstep
            )
        elif self.mode == "server":
            self.engine = VLLMEngine.from_server(
                tokenizer,
                vllm_server_url(args),
                timeout=args.vllm_server_timeout,
                generation_eos=generation_eos,
                lockstep=self.lockstep,
            )
        else:
            backend = DistributedBackend(accelerator)
            self.engine = TransformersEngine(
                trainer.model,
                tokenizer,
                synced_gpus=(backend.is_fsdp or backend.is_zero3) and accelerator.num_processes > 1,
                lockstep=self.lockstep,
            )

    @contextlib.contextmanager
    def current_policy(self, push_weights: bool = False) -> Iterator[GenerationEngine]:
        """The engine, generating with the trainer's current weights on every process.

        `push_weights`: copy the weights into vLLM first. TRL does that itself before each training rollout
        batch (`rollout_func`), not before anything else that generates, such as a held-out evaluation.
        """
        if isinstance(self.engine, TransformersEngine):
            with self._unwrapped_model() as model:
                self.engine.model = model
                yield self.engine
            return
        if push_weights:
            push_weights_to_vllm(self.trainer)
        if self.mode == "server" and self.lockstep is not None:
            # Only the main process pushes weights to the server; no process may send a request before it is done.
            self.trainer.accelerator.wait_for_everyone()
        yield self.engine

    @contextlib.contextmanager
    def _unwrapped_model(self) -> Iterator[Any]:
        from trl.distributed import DistributedBackend
        from trl.models import unwrap_model_for_generation

        trainer, args = self.trainer, self.trainer.args
        with contextlib.ExitStack() as stack:
            with warnings.catch_warnings():
                # TRL 1.16 reads `is_gradient_checkpointing`, which newer transformers deprecate: noise users
                # cannot act on.
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
                model = stack.enter_context(
                    unwrap_model_for_generation(
                        trainer.model_wrapped,
                        trainer.accelerator,
                        gather_deepspeed3_params=getattr(args, "ds3_gather_for_generation", True),
                        gradient_checkpointing_kwargs=checkpointing_kwargs(args),
                    )
                )
            stack.enter_context(torch.no_grad())
            stack.enter_context(
                DistributedBackend(trainer.accelerator).summon_full_params(
                    trainer.model_wrapped, recurse=False
                )
            )
            yield model


def vllm_server_url(args: Any) -> str:
    """The vLLM server a trainer's arguments name (`vllm_server_base_url`, else host and port)."""
    return args.vllm_server_base_url or f"http://{args.vllm_server_host}:{args.vllm_server_port}"


def checkpointing_kwargs(args: Any) -> dict[str, Any] | None:
    """Activation-checkpointing kwargs of trainer arguments, under whichever name this transformers uses."""
    names = {f.name for f in dataclasses.fields(args)}
    for name in ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs"):
        if name in names:
            return getattr(args, name)
    return None


def engine_from_checkpoint(
    model: str,
    *,
    engine: EngineName = "transformers",
    dtype: str = "auto",
    device: str | None = None,
    max_batch_size: int | None = None,
    seed: int = 0,
    adapter: str | None = None,
) -> GenerationEngine:
    """An engine over a saved policy (weights and tokenizer from the same folder or hub name).

    `adapter`: a PEFT LoRA adapter folder, merged into the base weights after loading (transformers only).
    """
    from autorefine.modeling import apply_adapter, load_policy, load_tokenizer
    from autorefine.settings import ConfigError

    if adapter is not None and engine != "transformers":
        raise ConfigError(
            "--adapter works with --engine transformers; for vLLM merge the adapter into a model folder first"
        )
    tokenizer = load_tokenizer(model)
    if engine == "vllm":
        vllm = require_vllm()
        # Every turn re-sends the whole trajectory: prefix caching turns that into incremental work.
        llm = vllm.LLM(model=model, dtype=dtype, seed=seed, enable_prefix_caching=True)
        return VLLMEngine(tokenizer, llm=llm, generation_eos=_generation_eos(model))
    if engine != "transformers":
        raise ValueError(f"engine must be 'transformers' or 'vllm', got {engine!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    policy = load_policy(model, dtype=dtype, device=device)
    if adapter is not None:
        policy = apply_adapter(policy, adapter)
    policy.eval()
    return TransformersEngine(policy, tokenizer, max_batch_size=max_batch_size)


def _generation_eos(model: str) -> int | list[int] | None:
    """The EOS ids of a checkpoint's generation config (Qwen2.5-Instruct lists two), or None without one."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model).eos_token_id
    except OSError:
        return None
