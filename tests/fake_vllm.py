"""Stand-ins for vLLM (which needs a CUDA GPU) that return exactly what the real objects return.

- `LLM`, `SamplingParams`, `RequestOutput`, `CompletionOutput`, `Logprob`: vLLM's offline API, as TRL's colocate
  mode builds and feeds it (`LLM(model=..., tensor_parallel_size=..., seed=..., logprobs_mode=...)`,
  `llm.generate([{"prompt_token_ids": ...}], sampling_params=..., use_tqdm=False)`, and weight loading through
  `llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights`). A tensor-parallel `LLM`
  checks, with a collective over its group, that every rank called `generate` with the same requests, which
  is what vLLM's `external_launcher` workers require (a rank that skips a call leaves the others waiting).
  `llm.llm_engine.model_config.max_model_len` is the window vLLM resolves (`max_model_len`, else the model
  config's); the fake does not enforce it.
- `FakeVLLMServer`: a real HTTP server with `vllm serve`'s `/health`, `/v1/models` (with `max_model_len`, as
  vLLM's model cards have it), `/server_info`, `/v1/completions` (choices with `token_ids`, `prompt_token_ids`
  and completions-style `logprobs`), `/reset_prefix_cache` and the weight-update endpoints TRL calls; the NCCL
  broadcast of the weights is replaced by an HTTP upload. Like vLLM it refuses, with HTTP 400 and vLLM's error
  body, a request whose prompt + `max_tokens` exceeds `max_model_len` (`--max-model-len`; by default the
  model config's `max_position_embeddings`). It logs, per completion request, the weights version, whether an
  update was in progress and the `max_tokens` asked for.
- `FakeVLLMClient`: TRL's real `VLLMClient` (its `generate` and `parse_logprobs` run unchanged) with only the
  NCCL weight transfer replaced.
- `install()`: makes `import vllm` and TRL's vLLM checks see these fakes (also in `accelerate launch`ed
  processes: see tests/launch_grpo.py).

Both share one sampler over a transformers model loaded from the same folder vLLM would load, applying vLLM's
sampling parameters in vLLM's order (repetition penalty, temperature, min-p, top-k, top-p) and reporting
`processed_logprobs`, the mode TRL starts vLLM in: log-probs of the distribution actually sampled from.
"""

from __future__ import annotations

import importlib.machinery
import inspect
import io
import json
import math
import os
import sys
import threading
import time
import types
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from fastapi import FastAPI, Request
from fastapi.responses import Response

# --- vLLM's data classes (vllm.sampling_params, vllm.outputs, vllm.logprobs) ------------------------------


@dataclass
class Logprob:
    """vllm.logprobs.Logprob."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class SamplingParams:
    """The vllm.SamplingParams fields TRL and autorefine set (vLLM's defaults)."""

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    structured_outputs: Any = None

    def __post_init__(self) -> None:
        if self.n != 1:
            raise NotImplementedError("the fake samples n=1 per request (TRL's colocate mode does too)")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k < -1 or not 0 < self.top_p <= 1 or self.temperature < 0:
            raise ValueError(f"invalid sampling parameters: {self}")


@dataclass
class StructuredOutputsParams:
    """vllm.sampling_params.StructuredOutputsParams (never used by autorefine)."""

    regex: str | None = None


@dataclass
class CompletionOutput:
    """vllm.outputs.CompletionOutput."""

    index: int
    text: str
    token_ids: Sequence[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    routed_experts: Any = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    lora_request: Any = None
    kv_transfer_params: dict[str, Any] | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


class RequestOutput:
    """vllm.outputs.RequestOutput."""

    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int] | None,
        prompt_logprobs: Any,
        outputs: list[CompletionOutput],
        finished: bool,
        metrics: Any = None,
        lora_request: Any = None,
        encoder_prompt: str | None = None,
        encoder_prompt_token_ids: list[int] | None = None,
        num_cached_tokens: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.prompt_logprobs = prompt_logprobs
        self.outputs = outputs
        self.finished = finished
        self.metrics = metrics
        self.lora_request = lora_request
        self.encoder_prompt = encoder_prompt
        self.encoder_prompt_token_ids = encoder_prompt_token_ids
        self.num_cached_tokens = num_cached_tokens


# --- the shared sampler -------------------------------------------------------------------------------------


@dataclass
class Sampled:
    """One finished request."""

    token_ids: list[int]
    logprobs: list[float]  # processed log-prob of each sampled token
    ranks: list[int]
    finish_reason: str
    stop_reason: int | str | None
    text: str


@dataclass
class Policy:
    """A transformers model served the way vLLM would serve the same folder."""

    path: str
    model: Any = None
    tokenizer: Any = None
    generation_eos: set[int] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    version: int = 0  # bumped by every weight load

    def __post_init__(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        self.model = AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        # vLLM reads generation_config.json and stops on its EOS ids too (generation_config="auto").
        try:
            eos = GenerationConfig.from_pretrained(self.path).eos_token_id
        except OSError:
            eos = None
        self.generation_eos = {eos} if isinstance(eos, int) else set(eos or [])
        self.generation_eos.discard(self.tokenizer.eos_token_id)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy named tensors into the model (vLLM's `model.load_weights`); unknown names fail, as in vLLM."""
        state = self.model.state_dict()
        loaded = set()
        with torch.no_grad():
            for name, tensor in weights:
                if name not in state:
                    raise KeyError(f"vLLM model has no weight {name!r}")
                state[name].copy_(tensor.detach().to(state[name].device, state[name].dtype))
                loaded.add(name)
        self.version += 1
        return loaded

    def sample(
        self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams], generator: torch.Generator
    ) -> list[Sampled]:
        """Decode every request step by step, batched; each stops on EOS, a stop id/string or max_tokens."""
        with self.lock, torch.no_grad():
            return self._sample(prompts, params, generator)

    def _sample(
        self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams], generator: torch.Generator
    ) -> list[Sampled]:
        from transformers import DynamicCache

        eos = self.tokenizer.eos_token_id
        generators = [
            torch.Generator().manual_seed(p.seed) if p.seed is not None else generator for p in params
        ]
        out: list[list[int]] = [[] for _ in prompts]
        lps: list[list[float]] = [[] for _ in prompts]
        ranks: list[list[int]] = [[] for _ in prompts]
        done: dict[int, tuple[str, int | str | None]] = {}
        width = max(map(len, prompts))
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, prompt in enumerate(prompts):
            ids[r, width - len(prompt) :] = torch.tensor(list(prompt))
            mask[r, width - len(prompt) :] = 1
        cache = DynamicCache()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self._forward(ids, mask, positions, cache)
        while len(done) < len(prompts):
            step = torch.zeros((len(prompts), 1), dtype=torch.long)  # finished rows are fed padding
            for i, p in enumerate(params):
                if i in done:
                    continue
                scores = _processed_logprobs(logits[i].clone(), [*prompts[i], *out[i]], p)
                if p.temperature == 0:
                    token = int(scores.argmax())
                else:
                    token = int(torch.multinomial(scores.exp(), 1, generator=generators[i]))
                step[i, 0] = token
                out[i].append(token)
                lps[i].append(float(scores[token]))
                ranks[i].append(int((scores > scores[token]).sum()) + 1)
                text = self.tokenizer.decode(out[i], skip_special_tokens=p.skip_special_tokens)
                hit = next((s for s in p.stop if s in text), None)
                if token == eos and not p.ignore_eos:
                    done[i] = ("stop", None)
                elif token in set(p.stop_token_ids) | self.generation_eos:
                    done[i] = ("stop", token)
                elif hit is not None:
                    done[i] = ("stop", hit)
                elif len(out[i]) >= (p.max_tokens or 16):
                    done[i] = ("length", None)
            if len(done) < len(prompts):
                mask = torch.cat([mask, torch.ones((len(prompts), 1), dtype=torch.long)], dim=1)
                logits = self._forward(step, mask, mask.sum(-1, keepdim=True) - 1, cache)
        results = []
        for i, p in enumerate(params):
            finish, reason = done[i]
            text = self.tokenizer.decode(out[i], skip_special_tokens=p.skip_special_tokens)
            if isinstance(reason, str):  # vLLM cuts the text at the stop string; the ids stay whole
                end = text.index(reason) + (len(reason) if p.include_stop_str_in_output else 0)
                text = text[:end]
            results.append(Sampled(out[i], lps[i], ranks[i], finish, reason, text))
        return results

    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any
    ) -> torch.Tensor:
        """Next-token logits of every row, extending `cache` in place."""
        name = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        output = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{name: cache}
        )
        return output.logits[:, -1].float()


def _processed_logprobs(logits: torch.Tensor, context: list[int], p: SamplingParams) -> torch.Tensor:
    """vLLM's sampler order; returns log-probs of the distribution sampled from (-inf where filtered)."""
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(context)), dtype=torch.long)
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
    if p.temperature == 0:
        return torch.log_softmax(logits, -1)
    logits = logits / p.temperature
    if p.min_p > 0:
        probs = torch.softmax(logits, -1)
        logits[probs < p.min_p * probs.max()] = -math.inf
    if p.top_k > 0:
        kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
        logits[logits < kth] = -math.inf
    if p.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = (
            cumulative - torch.softmax(sorted_logits, -1) >= p.top_p
        )  # mass before this token already enough
        logits[order[drop]] = -math.inf
    return torch.log_softmax(logits, -1)


# --- vllm.LLM -------------------------------------------------------------------------------------------


class _Namespace:
    pass


class LLM:
    """vllm.LLM over a transformers model, with vLLM's per-engine seeded sampler."""

    instances: ClassVar[list[LLM]] = []  # every LLM built in this process, for tests to inspect

    def __init__(self, model: str, *, tensor_parallel_size: int = 1, seed: int = 0, **kwargs: Any) -> None:
        self.kwargs = {"model": model, "tensor_parallel_size": tensor_parallel_size, "seed": seed, **kwargs}
        self.policy = Policy(str(model))
        self.generator = torch.Generator().manual_seed(seed)
        self.tp_size = tensor_parallel_size
        self.tp_group = None
        self.calls: list[int] = []  # number of requests of every generate call
        if tensor_parallel_size > 1:
            import torch.distributed as dist

            world = dist.get_world_size()
            self.tp_group, _ = dist.new_subgroups_by_enumeration(
                [list(range(i, i + tensor_parallel_size)) for i in range(0, world, tensor_parallel_size)]
            )
        # TRL colocate mode loads weights through this chain.
        runner = _Namespace()
        runner.model = _Namespace()
        runner.model.load_weights = self.policy.load_weights
        worker = _Namespace()
        worker.model_runner = runner
        executor = _Namespace()
        executor.driver_worker = worker
        self.llm_engine = _Namespace()
        self.llm_engine.model_executor = executor
        # vLLM's resolved context window: `max_model_len` as given, else the model config's.
        self.llm_engine.model_config = _Namespace()
        self.llm_engine.model_config.max_model_len = (
            kwargs.get("max_model_len") or self.policy.model.config.max_position_embeddings
        )
        LLM.instances.append(self)

    def get_tokenizer(self) -> Any:
        return self.policy.tokenizer

    def reset_prefix_cache(self) -> bool:
        return True

    def sleep(self, level: int = 1) -> None:
        raise NotImplementedError("sleep mode is not faked")

    def generate(
        self,
        prompts: Sequence[dict[str, list[int]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        **kwargs: Any,
    ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order (prompts as {"prompt_token_ids": [...]})."""
        if any(not isinstance(p, dict) or "prompt_token_ids" not in p for p in prompts):
            raise TypeError("the fake takes TokensPrompt dicts only")
        params = sampling_params or SamplingParams()
        params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params) != len(prompts):
            raise ValueError("one SamplingParams per prompt, or one for all")
        ids = [list(p["prompt_token_ids"]) for p in prompts]
        if self.tp_group is not None:
            import torch.distributed as dist

            requests = [None] * self.tp_size
            dist.all_gather_object(requests, (ids, [repr(p) for p in params]), group=self.tp_group)
            if any(r != requests[0] for r in requests):
                raise AssertionError("tensor-parallel ranks called generate with different requests")
        self.calls.append(len(ids))
        results = self.policy.sample(ids, params, self.generator)
        return [
            _request_output(str(n), prompt, result, p.logprobs, self.policy.tokenizer)
            for n, (prompt, result, p) in enumerate(zip(ids, results, params, strict=True))
        ]


def _request_output(
    request_id: str, prompt: list[int], result: Sampled, logprobs: int | None, tokenizer: Any
) -> RequestOutput:
    steps = None
    if logprobs is not None:
        steps = [
            {t: Logprob(lp, rank, tokenizer.decode([t]))}
            for t, lp, rank in zip(result.token_ids, result.logprobs, result.ranks, strict=True)
        ]
    completion = CompletionOutput(
        index=0,
        text=result.text,
        token_ids=list(result.token_ids),
        cumulative_logprob=sum(result.logprobs) if logprobs is not None else None,
        logprobs=steps,
        finish_reason=result.finish_reason,
        stop_reason=result.stop_reason,
    )
    return RequestOutput(request_id, None, prompt, None, [completion], finished=True)


# --- `vllm serve` and TRL's client ------------------------------------------------------------------------


class ContextLengthError(ValueError):
    """vLLM's `VLLMValidationError` for a request that does not fit `max_model_len` (HTTP 400)."""

    def __init__(self, message: str, parameter: str, value: int) -> None:
        # vLLM's str() of the error appends what was rejected; that string is the body's message.
        super().__init__(f"{message} (parameter={parameter}, value={value})")
        self.parameter = parameter


def check_context_length(prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
    """vLLM's own check of a completion request (TokenizeParams with max_total_tokens=max_model_len)."""
    if max_tokens > max_model_len:
        # vLLM's message really lacks the space before "cannot".
        raise ContextLengthError(
            f"max_tokens={max_tokens}cannot be greater than max_model_len={max_model_len}. "
            "Please request fewer output tokens.",
            "max_tokens",
            max_tokens,
        )
    max_input = max_model_len - max_tokens
    if prompt_tokens > max_input:
        raise ContextLengthError(
            f"You passed {prompt_tokens} input tokens and requested {max_tokens} output tokens. "
            f"However, the model's context length is only {max_model_len} tokens, resulting in a maximum "
            f"input length of {max_input} tokens. Please reduce the length of the input prompt.",
            "input_tokens",
            prompt_tokens,
        )


class FakeVLLMServer:
    """`vllm serve MODEL` on 127.0.0.1, in a thread, with the endpoints TRL's client calls."""

    def __init__(
        self,
        model: str,
        port: int,
        *,
        push_delay_s: float = 0.0,
        nan_logprob_at: int | None = None,
        max_model_len: int | None = None,
    ):
        self.policy = Policy(model)
        self.model_path = model
        self.name = os.path.basename(model.rstrip("/"))
        # vLLM's default context window is the model config's (here always max_position_embeddings).
        self.max_model_len = max_model_len or self.policy.model.config.max_position_embeddings
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.push_delay_s = push_delay_s
        self.nan_logprob_at = nan_logprob_at  # report NaN for this position of every completion
        self.generator = torch.Generator().manual_seed(0)
        self.updating = False
        self.requests: list[dict[str, Any]] = []  # one record per completion request
        self.updates = 0
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def app(self) -> FastAPI:
        """The server's routes (annotations resolve at module level: FastAPI reads them)."""
        app = FastAPI()

        def json_response(payload: Any) -> Response:
            # vLLM's responses may carry NaN (Python's json writes and reads it; TRL's client maps it to None).
            return Response(json.dumps(payload), media_type="application/json")

        @app.get("/health")
        def health() -> Response:
            return Response(status_code=200)

        @app.get("/v1/models")
        def models() -> Response:
            card = {
                "id": self.name,
                "object": "model",
                "created": int(time.time()),
                "owned_by": "vllm",
                "root": self.model_path,
                "parent": None,
                "max_model_len": self.max_model_len,
                "permission": [],
            }
            return json_response({"object": "list", "data": [card]})

        @app.get("/get_world_size")
        def world_size() -> Response:
            return json_response({"world_size": 1})

        @app.get("/server_info")
        def server_info() -> Response:
            model_config = {"logprobs_mode": "processed_logprobs", "max_model_len": self.max_model_len}
            config = {"model_config": model_config, "weight_transfer_config": {}}
            return json_response({"vllm_config": config})

        @app.post("/start_weight_update")
        def start() -> Response:
            self.updating = True
            return json_response({})

        @app.post("/fake/weights")
        async def weights(request: Request) -> Response:
            tensors = torch.load(io.BytesIO(await request.body()), weights_only=True)
            time.sleep(self.push_delay_s)  # a slow broadcast widens the window a racing rank would hit
            self.policy.load_weights(tensors.items())
            return json_response({})

        @app.post("/finish_weight_update")
        def finish() -> Response:
            self.updating = False
            self.updates += 1
            return json_response({})

        @app.post("/reset_prefix_cache")
        def reset() -> Response:
            return json_response({"success": True})

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            body = await request.json()
            try:
                return json_response(self.complete(body, request.headers.get("x-rank")))
            except ContextLengthError as err:
                # vLLM's ErrorResponse: {"error": {message, type, param, code}} with the HTTP status as code.
                error = {"message": str(err), "type": "BadRequestError", "param": err.parameter, "code": 400}
                return Response(json.dumps({"error": error}), status_code=400, media_type="application/json")

        return app

    def complete(self, body: dict[str, Any], rank: str | None) -> dict[str, Any]:
        """vLLM's /v1/completions for token-id prompts (`return_token_ids`, `return_tokens_as_token_ids`)."""
        self.requests.append(
            {
                "rank": rank,
                "version": self.policy.version,
                "updating": self.updating,
                "prompts": len(body["prompt"]),
                "max_tokens": body.get("max_tokens"),
            }
        )
        known = {f for f in SamplingParams.__dataclass_fields__}
        params = SamplingParams(**{k: v for k, v in body.items() if k in known})
        prompts = body["prompt"]
        for prompt in prompts:  # vLLM validates every prompt of the request before generating any
            check_context_length(len(prompt), params.max_tokens or 16, self.max_model_len)
        results = self.policy.sample(prompts, [params] * len(prompts), self.generator)
        choices = []
        for index, (prompt, result) in enumerate(zip(prompts, results, strict=True)):
            logprobs = None
            if body.get("logprobs") is not None:
                values = list(result.logprobs)
                if self.nan_logprob_at is not None and self.nan_logprob_at < len(values):
                    values[self.nan_logprob_at] = math.nan
                tokens = [f"token_id:{t}" for t in result.token_ids]
                logprobs = {
                    "text_offset": list(range(len(tokens))),
                    "token_logprobs": values,
                    "tokens": tokens,
                    "top_logprobs": [{tok: max(v, -9999.0)} for tok, v in zip(tokens, values, strict=True)],
                }
            choices.append(
                {
                    "index": index,
                    "text": result.text,
                    "logprobs": logprobs,
                    "finish_reason": result.finish_reason,
                    "stop_reason": result.stop_reason,
                    "token_ids": result.token_ids if body.get("return_token_ids") else None,
                    "prompt_logprobs": None,
                    "prompt_token_ids": list(prompt) if body.get("return_token_ids") else None,
                }
            )
        return {
            "id": f"cmpl-{len(self.requests)}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.name,
            "choices": choices,
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        }

    def __enter__(self) -> FakeVLLMServer:
        import uvicorn

        config = uvicorn.Config(self.app(), host="127.0.0.1", port=self.port, log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake vLLM server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)


def fake_client_class() -> type:
    """TRL's `VLLMClient` with its NCCL weight transfer replaced by an HTTP upload; everything else is TRL's."""
    import requests
    from trl.generation.vllm_client import VLLMClient

    class FakeVLLMClient(VLLMClient):
        def __init__(
            self,
            base_url: str | None = None,
            host: str = "0.0.0.0",
            server_port: int = 8000,
            group_port: int = 51216,
            connection_timeout: float = 0.0,
        ) -> None:
            # VLLMClient.__init__ refuses to run without vLLM installed; this is the rest of it.
            self.session = requests.Session()
            self.session.headers["X-Rank"] = os.environ.get("RANK", "0")
            self.base_url = (base_url or f"http://{host}:{server_port}").rstrip("/")
            self.host = host
            self.group_port = group_port
            self.communicator = None
            self._updating_weights = False
            self.check_server(connection_timeout, retry_interval=0.2)
            self.model = self._get(f"{self.base_url}/v1/models")["data"][0]["id"]

        def init_communicator(self, device: Any = 0) -> None:
            self.communicator = "http"

        def update_named_params(
            self, metadata: Any, named_params: Iterable[tuple[str, torch.Tensor]]
        ) -> None:
            buffer = io.BytesIO()
            torch.save({name: tensor.detach().cpu() for name, tensor in named_params}, buffer)
            self._start_weight_update()
            self._post(f"{self.base_url}/fake/weights", data=buffer.getvalue())
            self._finish_weight_update()

        def close_communicator(self) -> None:
            self.communicator = None

    return FakeVLLMClient


# --- installing the fakes ----------------------------------------------------------------------------------


def install(monkeypatch: Any = None) -> None:
    """Make `import vllm` return these fakes and point TRL's vLLM integration at them.

    With pytest's `monkeypatch`, everything is undone after the test; without it (a launched process), for good.
    """

    def set_attr(obj: Any, name: str, value: Any) -> None:
        if monkeypatch is not None:
            monkeypatch.setattr(obj, name, value, raising=False)
        else:
            setattr(obj, name, value)

    def set_module(name: str, value: types.ModuleType) -> None:
        if monkeypatch is not None:
            monkeypatch.setitem(sys.modules, name, value)
        else:
            sys.modules[name] = value

    # TRL decides at import whether vLLM is there: import it before `vllm` exists, then patch its names.
    import trl.generation.vllm_client as client_module
    import trl.generation.vllm_generation as generation
    import trl.trainer.grpo_trainer  # noqa: F401

    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    module.__version__ = "0.30.0"
    for name in ("LLM", "SamplingParams", "RequestOutput", "CompletionOutput"):
        setattr(module, name, globals()[name])
    sampling = types.ModuleType("vllm.sampling_params")
    sampling.SamplingParams = SamplingParams
    sampling.StructuredOutputsParams = StructuredOutputsParams
    logprobs = types.ModuleType("vllm.logprobs")
    logprobs.Logprob = Logprob
    outputs = types.ModuleType("vllm.outputs")
    outputs.RequestOutput, outputs.CompletionOutput = RequestOutput, CompletionOutput
    for name, fake in (
        ("vllm", module),
        ("vllm.sampling_params", sampling),
        ("vllm.logprobs", logprobs),
        ("vllm.outputs", outputs),
    ):
        set_module(name, fake)

    client = fake_client_class()
    set_attr(generation, "is_vllm_available", lambda *args, **kwargs: True)
    set_attr(generation, "LLM", LLM)
    set_attr(generation, "SamplingParams", SamplingParams)
    set_attr(generation, "VLLMClient", client)
    set_attr(client_module, "VLLMClient", client)
