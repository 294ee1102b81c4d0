"""Generation engine on vLLM: an in-process `vllm.LLM` (TRL colocate mode) or a `trl vllm-serve` server.

vLLM is imported lazily and only here; on machines without it, constructing this engine raises a clear error.
Stop strings go through vLLM's sampling parameters; `finish_generation` still makes the final cut so that
every engine ends turns by the same rule.

vLLM returns the sampled token's log-prob and at most `max_logprobs` top candidates per position (after
top-k/top-p in TRL's `processed_logprobs` mode), never the whole distribution: generations carry no
entropies, and the per-block entropy health signals are not logged with this engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from autorefine.rollout.engine import Generation, SamplingParams, eos_token_ids, finish_generation

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

VLLM_MISSING = (
    "vLLM is not installed. Install the GPU extra (`pip install 'autorefine[gpu]'`, CUDA machines only) "
    "or use the transformers engine (`rollout.engine: transformers`)."
)


def require_vllm() -> Any:
    """Import vllm or raise an ImportError that says how to get it."""
    try:
        import vllm
    except ImportError as err:
        raise ImportError(VLLM_MISSING) from err
    return vllm


class VLLMEngine:
    """Colocated `vllm.LLM` (pass `llm`, e.g. TRL's own instance) or a TRL vLLM server (pass `client`)."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        llm: Any = None,
        client: Any = None,
        model: str | None = None,
        **llm_kwargs: Any,
    ) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = eos_token_ids(tokenizer)
        if client is not None:
            self.client, self.llm = client, None
            return
        vllm = require_vllm()
        if llm is None:
            if model is None:
                raise ValueError("VLLMEngine needs an `llm`, a `client`, or a `model` path to load")
            # Every turn re-sends the whole trajectory: prefix caching turns that into incremental work.
            llm = vllm.LLM(model=model, enable_prefix_caching=True, **llm_kwargs)
        self.llm, self.client = llm, None
        self._sampling_params_cls = vllm.SamplingParams

    @classmethod
    def from_server(
        cls, tokenizer: PreTrainedTokenizerBase, base_url: str, timeout: float = 240.0
    ) -> VLLMEngine:
        """Engine talking to `trl vllm-serve` at `base_url` over HTTP (weights are synced by TRL itself)."""
        try:
            from trl.generation.vllm_client import VLLMClient
        except ImportError as err:
            raise ImportError(VLLM_MISSING) from err
        return cls(tokenizer, client=VLLMClient(base_url=base_url, connection_timeout=timeout))

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: Sequence[int],
        params: SamplingParams,
        stop: Sequence[str],
    ) -> list[Generation]:
        """One continuation per prompt, in order."""
        if self.client is not None:
            return self._generate_on_server(prompts, max_new_tokens, params, stop)
        sampling = [
            self._sampling_params_cls(
                n=1,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k if params.top_k > 0 else -1,
                max_tokens=max(1, budget),
                stop=list(stop),
                include_stop_str_in_output=True,
                logprobs=0,
                seed=params.seed,
            )
            for budget in max_new_tokens
        ]
        outputs = self.llm.generate(
            [{"prompt_token_ids": list(p)} for p in prompts], sampling_params=sampling, use_tqdm=False
        )
        results = []
        for output, budget in zip(outputs, max_new_tokens, strict=True):
            completion = output.outputs[0]
            ids = list(completion.token_ids)
            # With logprobs=0 vLLM returns, per position, a dict holding the sampled token's Logprob.
            logprobs = [
                step[token].logprob for step, token in zip(completion.logprobs or [], ids, strict=False)
            ]
            logprobs += [0.0] * (len(ids) - len(logprobs))
            results.append(finish_generation(ids, logprobs, budget, stop, self.eos_ids, self.tokenizer))
        return results

    def _generate_on_server(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: Sequence[int],
        params: SamplingParams,
        stop: Sequence[str],
    ) -> list[Generation]:
        extra: dict[str, Any] = {"stop": list(stop), "include_stop_str_in_output": True}
        if params.seed is not None:
            extra["seed"] = params.seed
        out = self.client.generate(
            prompts=[list(p) for p in prompts],
            n=1,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            max_tokens=max(1, max(max_new_tokens)),
            logprobs=0,
            generation_kwargs=extra,
        )
        results = []
        for ids, token_logprobs, budget in zip(
            out["completion_ids"], out["logprobs"], max_new_tokens, strict=True
        ):
            logprobs = [step[0] if step else 0.0 for step in token_logprobs]
            results.append(finish_generation(ids, logprobs, budget, stop, self.eos_ids, self.tokenizer))
        return results
