"""Generation engine on transformers' `generate`: batched, left-padded, KV cache within a turn, CPU or GPU."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteriaList,
    StopStringCriteria,
)

from autorefine.rollout.engine import Generation, SamplingParams, eos_token_ids, finish_generation

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class _SampledTokenLogprobs(LogitsProcessor):
    """Records log p(sampled token) at the sampling temperature, without keeping per-step vocab-sized scores.

    transformers runs user processors before its temperature/top-k/top-p warpers, so `scores` here are the
    model's logits; the token sampled from step t only becomes visible at step t+1 (or after generate).
    """

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature if temperature > 0 else 1.0
        self.previous: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.previous is not None:
            self.steps.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
        self.previous = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def collect(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """Log-probs of `new_tokens` (batch × steps), finishing the last step."""
        if self.previous is not None and len(self.steps) < new_tokens.shape[1]:
            self.steps.append(self.previous.gather(1, new_tokens[:, len(self.steps)].unsqueeze(1)).squeeze(1))
        if not self.steps:
            return torch.zeros(new_tokens.shape, dtype=torch.float32)
        return torch.stack(self.steps, dim=1).cpu()


class TransformersEngine:
    """Wraps a causal LM and its tokenizer; the model stays in whatever train/eval mode the caller set."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_batch_size: int | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.eos_ids = eos_token_ids(tokenizer, getattr(model.generation_config, "eos_token_id", None))
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids)
        self._stop_criteria: dict[tuple[str, ...], StopStringCriteria] = {}

    def _stop_criterion(self, stop: Sequence[str]) -> StopStringCriteria:
        # Built once per stop set: construction walks the whole vocabulary (about 1.2 s per call for
        # Qwen's 152k tokens on CPU, every turn, if left to `generate(stop_strings=...)`).
        key = tuple(stop)
        if key not in self._stop_criteria:
            self._stop_criteria[key] = StopStringCriteria(self.tokenizer, list(key))
        return self._stop_criteria[key]

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: Sequence[int],
        params: SamplingParams,
        stop: Sequence[str],
    ) -> list[Generation]:
        """Continue every prompt; rows are processed in chunks of `max_batch_size`."""
        if len(prompts) != len(max_new_tokens):
            raise ValueError(f"{len(prompts)} prompts but {len(max_new_tokens)} token budgets")
        size = self.max_batch_size or max(len(prompts), 1)
        out: list[Generation] = []
        for start in range(0, len(prompts), size):
            out += self._generate_chunk(
                prompts[start : start + size], max_new_tokens[start : start + size], params, stop
            )
        return out

    def _generate_chunk(
        self,
        prompts: Sequence[Sequence[int]],
        budgets: Sequence[int],
        params: SamplingParams,
        stop: Sequence[str],
    ) -> list[Generation]:
        if not prompts:
            return []
        device = self.model.device
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
        # An explicit config, so a checkpoint's own sampling defaults (top_k=20, repetition penalty…) never leak in.
        config = GenerationConfig(
            max_new_tokens=max(1, max(budgets)),
            do_sample=not params.greedy,
            temperature=params.temperature if not params.greedy else None,
            top_p=params.top_p if not params.greedy else None,
            top_k=params.top_k if not params.greedy else None,
            pad_token_id=self.pad_id,
            eos_token_id=sorted(self.eos_ids),
            use_cache=True,
        )
        stopping = StoppingCriteriaList([self._stop_criterion(stop)]) if stop else None
        recorder = _SampledTokenLogprobs(params.temperature)
        with torch.inference_mode():
            sequences = self.model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=config,
                logits_processor=LogitsProcessorList([recorder]),
                stopping_criteria=stopping,
            )
        new_tokens = sequences[:, width:].cpu()
        logprobs = recorder.collect(new_tokens)
        return [
            finish_generation(
                new_tokens[row].tolist(), logprobs[row].tolist(), budget, stop, self.eos_ids, self.tokenizer
            )
            for row, budget in enumerate(budgets)
        ]
