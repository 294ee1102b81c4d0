"""Generation engine on vLLM: an in-process `vllm.LLM` (TRL's colocate mode) or a vLLM server (TRL's server mode).

vLLM is imported lazily and only here; on machines without it, building this engine raises a clear error.
Stop strings and stop token ids go through vLLM's sampling parameters; `finish_generation` still makes the
final cut so that every engine ends turns by the same rule. Log-probs are what vLLM reports for the sampled
token: with TRL's `logprobs_mode="processed_logprobs"`, after temperature and any top-k/top-p/min-p filter.
A log-prob the server could not give (TRL's client turns NaN into None) is NaN here; TRL ignores NaN tokens
in its importance-sampling correction. In server mode a batch goes out as one request per distinct token budget
(sent concurrently), since a request carries one `max_tokens` and vLLM refuses (HTTP 400) any prompt whose
length + `max_tokens` exceeds the server's `--max-model-len`.

vLLM returns the sampled token's log-prob and at most `max_logprobs` top candidates per position, never the
whole distribution: generations carry no entropies, and the per-block entropy health signals are not logged
with this engine.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from autorefine.rollout.engine import Generation, SamplingParams, eos_token_ids, finish_generation

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from autorefine.rollout.lockstep import Lockstep

# Requests in flight at once to a vLLM server (TRL's client sends at most this many concurrently too).
SERVER_CONCURRENCY = 64

VLLM_MISSING = (
    "vLLM is not installed. Install the GPU extra (`pip install 'autorefine[gpu]'`, CUDA machines only) "
    "or use the transformers engine (`trainer.use_vllm=false`, `--engine transformers`)."
)


def require_vllm() -> Any:
    """Import vllm or raise an ImportError that says how to get it."""
    try:
        import vllm
    except ImportError as err:
        raise ImportError(VLLM_MISSING) from err
    return vllm


class VLLMEngine:
    """A colocated `vllm.LLM` (`llm`) or TRL's `VLLMClient` of a vLLM server (`client`).

    With `tp_group` (a tensor-parallel colocated `vllm.LLM`), every rank of the group must call `llm.generate`
    with the same requests: each call gathers the group's prompts, generates them all, and keeps this rank's
    share, as TRL does. `lockstep` (required then) makes the agent loop call it every turn on every rank.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        llm: Any = None,
        client: Any = None,
        generation_eos: int | Sequence[int] | None = None,
        tp_group: Any = None,
        lockstep: Lockstep | None = None,
    ) -> None:
        if (llm is None) == (client is None):
            raise ValueError("VLLMEngine needs exactly one of `llm` (colocated) or `client` (server)")
        if tp_group is not None and lockstep is None:
            raise ValueError(
                "a tensor-parallel vLLM (tp_group) needs a lockstep: every rank generates each turn"
            )
        self.tokenizer = tokenizer
        self.llm, self.client = llm, client
        self.tp_group = tp_group
        self.lockstep = lockstep
        # vLLM stops on the model's generation-config EOS ids too; the same ids end a turn here.
        self.eos_ids = eos_token_ids(tokenizer, generation_eos)
        self._extra_stop_ids = sorted(self.eos_ids - {tokenizer.eos_token_id})
        self._sampling_params_cls = require_vllm().SamplingParams if llm is not None else None

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: Sequence[int],
        params: SamplingParams,
        stop: Sequence[str],
    ) -> list[Generation]:
        """One continuation per prompt, in order."""
        if len(prompts) != len(max_new_tokens):
            raise ValueError(f"{len(prompts)} prompts but {len(max_new_tokens)} token budgets")
        if self.client is not None:
            raw = self._generate_on_server(prompts, max_new_tokens, params, stop) if prompts else []
        else:
            raw = self._generate_colocated(prompts, max_new_tokens, params, stop)
        return [
            finish_generation(ids, logprobs, budget, stop, self.eos_ids, self.tokenizer)
            for (ids, logprobs), budget in zip(raw, max_new_tokens, strict=True)
        ]

    def _generate_colocated(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: Sequence[int],
        params: SamplingParams,
        stop: Sequence[str],
    ) -> list[tuple[list[int], list[float]]]:
        requests = [(list(p), int(b)) for p, b in zip(prompts, max_new_tokens, strict=True)]
        start = 0
        if self.tp_group is not None:
            import torch.distributed as dist

            group_requests: list[Any] = [None] * dist.get_world_size(self.tp_group)
            dist.all_gather_object(group_requests, requests, group=self.tp_group)
            start = sum(len(r) for r in group_requests[: dist.get_rank(self.tp_group)])
            requests = [r for rank_requests in group_requests for r in rank_requests]
        if not requests:
            return []  # the same on every rank of the group: nobody calls generate
        sampling = [self._sampling_params(params, budget, stop) for _, budget in requests]
        outputs = self.llm.generate(
            [{"prompt_token_ids": ids} for ids, _ in requests], sampling_params=sampling, use_tqdm=False
        )
        outputs = outputs[start : start + len(prompts)]
        results = []
        for output in outputs:
            completion = output.outputs[0]
            ids = list(completion.token_ids)
            steps = list(completion.logprobs or [])
            # With logprobs=0 each position maps the sampled token's id to its Logprob.
            logprobs = [
                _logprob(step.get(token) if step else None) for step, token in zip(steps, ids, strict=False)
            ]
            results.append((ids, logprobs + [math.nan] * (len(ids) - len(logprobs))))
        return results

    def _sampling_params(self, params: SamplingParams, budget: int, stop: Sequence[str]) -> Any:
        return self._sampling_params_cls(
            n=1,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1,
            min_p=params.min_p,
            repetition_penalty=params.repetition_penalty,
            max_tokens=max(1, budget),
            stop=list(stop),
            stop_token_ids=self._extra_stop_ids,
            include_stop_str_in_output=True,
            logprobs=0,
            seed=params.seed,
        )

    def _generate_on_server(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: Sequence[int],
        params: SamplingParams,
        stop: Sequence[str],
    ) -> list[tuple[list[int], list[float]]]:
        # A request carries one `max_tokens`, and vLLM refuses (HTTP 400) a prompt whose length + max_tokens
        # exceeds --max-model-len: a row near the end of its completion budget must get its own budget.
        by_budget: dict[int, list[int]] = {}
        for row, budget in enumerate(max_new_tokens):
            by_budget.setdefault(max(1, int(budget)), []).append(row)
        groups = list(by_budget.items())

        def send(group: tuple[int, list[int]]) -> list[tuple[list[int], list[float]]]:
            budget, rows = group
            return self._server_request([prompts[r] for r in rows], budget, params, stop)

        if len(groups) == 1:
            answers = [send(groups[0])]
        else:
            # Concurrent requests, so the server batches them together as it would one request.
            with ThreadPoolExecutor(min(len(groups), SERVER_CONCURRENCY)) as pool:
                answers = list(pool.map(send, groups))
        results: list[tuple[list[int], list[float]]] = [([], [])] * len(prompts)
        for (_, rows), answer in zip(groups, answers, strict=True):
            for row, result in zip(rows, answer, strict=True):
                results[row] = result
        return results

    def _server_request(
        self, prompts: Sequence[Sequence[int]], budget: int, params: SamplingParams, stop: Sequence[str]
    ) -> list[tuple[list[int], list[float]]]:
        """One completion request (one `max_tokens` for all its prompts); ids and log-probs per prompt."""
        extra: dict[str, Any] = {
            "stop": list(stop),
            "stop_token_ids": self._extra_stop_ids,
            "include_stop_str_in_output": True,
        }
        if params.seed is not None:
            extra["seed"] = params.seed
        out = self.client.generate(
            prompts=[list(p) for p in prompts],
            n=1,
            repetition_penalty=params.repetition_penalty,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            min_p=params.min_p,
            max_tokens=budget,
            logprobs=0,
            generation_kwargs=extra,
        )
        token_logprobs = out["logprobs"] or [None] * len(out["completion_ids"])
        token_ids = out.get("logprob_token_ids") or [None] * len(out["completion_ids"])
        results = []
        for ids, steps, step_ids in zip(out["completion_ids"], token_logprobs, token_ids, strict=True):
            ids = list(ids)
            if steps is None:
                results.append((ids, [math.nan] * len(ids)))
                continue
            # Each position lists logprobs by rank; the sampled token's entry is the one with its id.
            logprobs = []
            for position, token in enumerate(ids):
                values = steps[position] if position < len(steps) else []
                alternatives = step_ids[position] if step_ids and position < len(step_ids) else None
                index = alternatives.index(token) if alternatives and token in alternatives else 0
                logprobs.append(_logprob(values[index] if values else None))
            results.append((ids, logprobs))
        return results

    @classmethod
    def from_server(
        cls,
        tokenizer: PreTrainedTokenizerBase,
        base_url: str,
        *,
        timeout: float = 240.0,
        generation_eos: int | Sequence[int] | None = None,
        lockstep: Lockstep | None = None,
    ) -> VLLMEngine:
        """Engine talking to a vLLM server at `base_url` through TRL's client (TRL pushes the weights)."""
        try:
            from trl.generation.vllm_client import VLLMClient

            client = VLLMClient(base_url=base_url, connection_timeout=timeout)
        except ImportError as err:
            raise ImportError(VLLM_MISSING) from err
        return cls(tokenizer, client=client, generation_eos=generation_eos, lockstep=lockstep)


def served_models(base_url: str, timeout: float = 240.0) -> list[dict[str, Any]]:
    """The model cards a vLLM server lists at `GET /v1/models` (`id`, `root`, `max_model_len`, ...).

    `vllm serve MODEL` (which `trl vllm-serve` runs) lists one card per served name (`--served-model-name`, else
    MODEL as given), each with `root` = MODEL and the `max_model_len` it was started with (`--max-model-len`,
    else the model config's). Waits up to `timeout` s for the server to answer, as TRL's client does, then
    raises ConnectionError.
    """
    import httpx

    url = f"{base_url.rstrip('/')}/v1/models"
    deadline = time.monotonic() + timeout
    while True:
        try:
            response = httpx.get(url, timeout=10.0)
            if response.status_code == 200:
                break
            problem = f"HTTP {response.status_code}: {response.text[:200]}"
        except httpx.HTTPError as err:
            problem = f"{type(err).__name__}: {err}"
        if time.monotonic() >= deadline:
            raise ConnectionError(
                f"the vLLM server at {base_url} did not answer GET /v1/models within {timeout:.0f} s "
                f"({problem}); start it first (`trl vllm-serve --model ...`)"
            )
        time.sleep(1.0)
    cards = response.json().get("data") or []
    return [card for card in cards if isinstance(card, dict)]


def same_model(trained: str, served: str) -> bool:
    """Whether a served model name is the trained one: the same name or path, or a copy in a folder of the same
    name (`/shared/models/Qwen2.5-7B` serves `Qwen/Qwen2.5-7B`); no file is read."""
    trained, served = trained.rstrip("/"), served.rstrip("/")
    return trained == served or PurePosixPath(trained).name == PurePosixPath(served).name


def serving_card(cards: Sequence[dict[str, Any]], trained: str) -> dict[str, Any] | None:
    """The card of `cards` that serves the model `trained` (by its `id` or `root`), if any."""
    for card in cards:
        if any(same_model(trained, str(card.get(key) or "")) for key in ("id", "root") if card.get(key)):
            return card
    return None


def colocated_max_model_len(llm: Any) -> int:
    """The context window of an in-process `vllm.LLM`, as vLLM resolved it (TRL reads the same attribute)."""
    return int(llm.llm_engine.model_config.max_model_len)


def _logprob(value: Any) -> float:
    """A reported log-prob as a float; a missing one (None, or a Logprob without a value) is NaN."""
    value = getattr(value, "logprob", value)
    return math.nan if value is None else float(value)
