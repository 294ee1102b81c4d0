"""Generation engine on transformers' `generate`: batched, left-padded, CPU or GPU.

The KV cache of one call is kept for the next: when every new context extends a context of the previous call
(the agent loop's next turn: previous context + sampled turn + documents), only the new tokens are prefilled.
Identical prompts in one call (the G samples of a GRPO group) are prefilled once and their KV cache expanded to
every row that shares them, instead of G prefills of the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import (
    DynamicCache,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteriaList,
    StopStringCriteria,
)
from transformers.cache_utils import DynamicLayer
from transformers.generation.utils import GenerateDecoderOnlyOutput

from autorefine.rollout.engine import Generation, SamplingParams, eos_token_ids, finish_generation

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from autorefine.rollout.lockstep import Lockstep

# Newer transformers 5 releases call generate's cache argument and output field `cache`; `past_key_values`
# still works there but warns on every call. Older 5.x releases only know `past_key_values`.
_CACHE = "cache" if "cache" in GenerateDecoderOnlyOutput.__dataclass_fields__ else "past_key_values"


class _SampledTokenStats(LogitsProcessor):
    """Records log p(sampled token) and the entropy of the full distribution, both at the sampling temperature.

    Nothing vocab-sized is kept per step. transformers runs user processors before its temperature/top-k/top-p
    warpers, so `scores` here are the model's logits: the entropy is that of the distribution TRL's training
    forward scores (temperature only), before any top-k/top-p cut. The token sampled from step t only becomes
    visible at step t+1 (or after generate).
    """

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature if temperature > 0 else 1.0
        self.previous: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []
        self.entropies: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.previous is not None:
            self.steps.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
        self.previous = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        # entr(p) = -p log p with entr(0) = 0, so tokens a processor set to -inf add nothing.
        self.entropies.append(torch.special.entr(self.previous.exp()).sum(-1))
        return scores

    def collect(self, new_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs of `new_tokens` and entropies of their distributions (batch × steps), finishing the last step."""
        if self.previous is not None and len(self.steps) < new_tokens.shape[1]:
            last = new_tokens[:, len(self.steps)].unsqueeze(1).to(self.previous.device)
            self.steps.append(self.previous.gather(1, last).squeeze(1))
        if not self.steps:
            empty = torch.zeros(new_tokens.shape, dtype=torch.float32)
            return empty, empty.clone()
        steps = len(self.steps)
        return torch.stack(self.steps, dim=1).cpu(), torch.stack(self.entropies[:steps], dim=1).cpu()


class _ReservedLayer(DynamicLayer):
    """A `DynamicLayer` that writes new columns into reserved room instead of concatenating.

    `DynamicLayer` copies the whole cache on every decode step (`torch.cat`): on CPU that was half of a
    batch-16 step of the 1M-parameter policy at 400 cached columns. Here a step writes one column; the cache
    is copied only when it is replaced from outside (row selection) or the reserve runs out.
    """

    reserve = 0  # columns to leave free after a prefill: the call's max_new_tokens

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new columns after the cached ones; returns views of everything cached."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.get_seq_length()
        end = start + key_states.shape[-2]
        room = getattr(self, "_room", None)
        # `keys` replaced from outside (batch_select_indices, reorder, crop) or no room left: start a new buffer.
        if room is None or self.keys is not self._view or room[0].shape[-2] < end:
            room = tuple(
                new.new_empty((*new.shape[:-2], end + max(self.reserve, 1), new.shape[-1]))
                for new in (key_states, value_states)
            )
            if start:
                room[0][..., :start, :] = self.keys
                room[1][..., :start, :] = self.values
            self._room = room
        room[0][..., start:end, :] = key_states
        room[1][..., start:end, :] = value_states
        self.keys, self.values = room[0][..., :end, :], room[1][..., :end, :]
        self._view = self.keys
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only `indices` rows; the old buffer is freed before the next update allocates a new one."""
        super().batch_select_indices(indices)
        self._room = None


def left_padded(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of `rows`, padded on the left to the longest one."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, width - len(ids) :] = 1
    return input_ids, attention_mask


def _reserved_cache(model: PreTrainedModel) -> DynamicCache | None:
    """An empty cache of `_ReservedLayer`s, or None (transformers' default) for sliding-window or hybrid models."""
    cache = DynamicCache(config=model.config)
    if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    cache.layers = [_ReservedLayer() for _ in cache.layers]
    return cache


@dataclass
class _KeptCache:
    """The previous call's KV cache and, per row, the real tokens it holds; other columns are masked padding."""

    cache: Any  # transformers DynamicCache, `length` columns
    ids: torch.Tensor  # (rows, length) the token at every cached column
    mask: torch.Tensor  # (rows, length) 1 where the column holds one of the row's real tokens
    rows: list[list[int]]  # per row: its real cached tokens, in order
    weights_version: int


class TransformersEngine:
    """Wraps a causal LM and its tokenizer; the model stays in whatever train/eval mode the caller set.

    With `reuse_cache` (the default), a call whose every context strictly extends a context of the previous
    call, in the same order, prefills only the new tokens; anything else is prefilled from scratch. Without
    it, every call runs on transformers' own cache and nothing is kept between calls.

    With `share_prefixes` (the default; needs `reuse_cache`), a fresh call whose prompts repeat prefills each
    distinct prompt once, expands its cache to the rows that repeat it, and samples every row from there: the
    same tokens and log-probs as G separate prefills up to floating-point rounding.

    With `synced_gpus` (a model sharded across processes: FSDP, DeepSpeed ZeRO-3), every forward pass is a
    collective: `generate` runs with transformers' `synced_gpus`, and a call with no prompts still runs the
    forward passes of a one-token dummy row, so that a process whose trajectories are done keeps pace.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_batch_size: int | None = None,
        reuse_cache: bool = True,
        share_prefixes: bool = True,
        synced_gpus: bool = False,
        lockstep: Lockstep | None = None,
    ) -> None:
        if synced_gpus and max_batch_size:
            # Chunk counts would differ between processes with different numbers of prompts.
            raise ValueError(
                "max_batch_size cannot be combined with synced_gpus (one generate call per turn)"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.synced_gpus = synced_gpus
        self.lockstep = lockstep
        self.eos_ids = eos_token_ids(tokenizer, getattr(model.generation_config, "eos_token_id", None))
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids)
        self._stop_criteria: dict[tuple[str, ...], StopStringCriteria] = {}
        self.reuse_cache = reuse_cache
        # Processes of a sharded model must run the same forward passes: one that deduplicates would run an
        # extra prefill the others do not.
        self.share_prefixes = share_prefixes and reuse_cache and not synced_gpus
        self._kept: _KeptCache | None = None

    def release_cache(self) -> None:
        """Drop the KV cache kept from the last call (the agent loop calls this when a rollout ends)."""
        self._kept = None

    def _weights_version(self) -> int:
        # In-place updates (optimizer steps, load_state_dict) bump every tensor's version counter: a cache
        # computed with other weights is never reused.
        return sum(p._version for p in self.model.parameters())

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
        if not prompts:
            if self.synced_gpus:
                self._generate_chunk([[self.pad_id]], [1], params, (), None, keep=False)
            return []
        size = self.max_batch_size or len(prompts)
        one_chunk = len(prompts) <= size
        # A kept cache covers one chunk; one that cannot be continued is freed before a new one is allocated.
        kept, self._kept = self._kept, None
        rows = self._continued_rows(kept, prompts) if kept is not None and one_chunk else None
        continued = (kept, rows) if kept is not None and rows is not None else None
        del kept
        out: list[Generation] = []
        for start in range(0, len(prompts), size):
            out += self._generate_chunk(
                prompts[start : start + size],
                max_new_tokens[start : start + size],
                params,
                stop,
                continued,
                keep=one_chunk,
            )
        return out

    def _generate_chunk(
        self,
        prompts: Sequence[Sequence[int]],
        budgets: Sequence[int],
        params: SamplingParams,
        stop: Sequence[str],
        continued: tuple[_KeptCache, list[int]] | None,
        keep: bool,
    ) -> list[Generation]:
        if not prompts:
            return []
        device = self.model.device
        if continued is None and self.share_prefixes:
            continued = self._shared_prefill(prompts)
        if continued is not None:
            cache, input_ids, attention_mask = self._continue(*continued, prompts)
        else:
            cache = _reserved_cache(self.model) if self.reuse_cache else None
            input_ids, attention_mask = left_padded(prompts, self.pad_id)
        for layer in getattr(cache, "layers", []):
            layer.reserve = max(budgets)
        width = input_ids.shape[1]
        # An explicit config, so a checkpoint's own sampling defaults (top_k=20, repetition penalty…) never leak in.
        config = GenerationConfig(
            max_new_tokens=max(1, max(budgets)),
            do_sample=not params.greedy,
            temperature=params.temperature if not params.greedy else None,
            top_p=params.top_p if not params.greedy else None,
            top_k=params.top_k if not params.greedy else None,
            min_p=params.min_p if not params.greedy and params.min_p > 0 else None,
            repetition_penalty=params.repetition_penalty if params.repetition_penalty != 1 else None,
            pad_token_id=self.pad_id,
            eos_token_id=sorted(self.eos_ids),
            use_cache=True,
            return_dict_in_generate=True,
        )
        stopping = StoppingCriteriaList([self._stop_criterion(stop)]) if stop else None
        recorder = _SampledTokenStats(params.temperature)
        # A sharded model gathers its weights into tensors made in this context: under inference mode they
        # would have no version counter, and the kept-cache check reads one.
        with torch.no_grad() if self.synced_gpus else torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=config,
                logits_processor=LogitsProcessorList([recorder]),
                stopping_criteria=stopping,
                synced_gpus=True if self.synced_gpus else None,  # None: transformers decides (single process)
                **{_CACHE: cache},
            )
        new_tokens = output.sequences[:, width:].cpu()
        logprobs, entropies = recorder.collect(new_tokens)
        generations = [
            finish_generation(
                new_tokens[row].tolist(),
                logprobs[row].tolist(),
                budget,
                stop,
                self.eos_ids,
                self.tokenizer,
                entropies=entropies[row].tolist(),
            )
            for row, budget in enumerate(budgets)
        ]
        if keep and self.reuse_cache:
            self._kept = self._kept_cache(output, attention_mask, prompts, generations)
        return generations

    def _shared_prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[_KeptCache, list[int]] | None:
        """Prefill every distinct prompt but its last token once; the kept cache and each prompt's row in it.

        None when no prompt repeats (nothing to share), a prompt is one token long, or the model's cache
        layers cannot be kept. The last token is left out so that `generate` still prefills one column per row
        and samples the first token from its own forward pass, exactly as it does from scratch.
        """
        distinct: dict[tuple[int, ...], int] = {}
        rows = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
        if len(distinct) == len(prompts) or min(len(p) for p in prompts) < 2:
            return None
        cache = _reserved_cache(self.model)
        if cache is None:
            return None
        prefixes = [list(p[:-1]) for p in distinct]
        input_ids, attention_mask = left_padded(prefixes, self.pad_id)
        # Positions as `generate` gives left-padded rows: counted over real tokens only.
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        device = self.model.device
        with torch.no_grad() if self.synced_gpus else torch.inference_mode():
            self.model(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                position_ids=positions.to(device),
                use_cache=True,
                logits_to_keep=1,  # only the cache is wanted; no vocabulary-wide logits for every column
                **{_CACHE: cache},
            )
        kept = _KeptCache(cache, input_ids, attention_mask, prefixes, self._weights_version())
        return kept, rows

    def _continued_rows(self, kept: _KeptCache, prompts: Sequence[Sequence[int]]) -> list[int] | None:
        """For each prompt, the kept row whose tokens it strictly extends (rows keep their order), else None."""
        if kept.weights_version != self._weights_version():
            return None
        found, start = [], 0
        for prompt in prompts:
            for row in range(start, len(kept.rows)):
                cached = kept.rows[row]
                if len(prompt) > len(cached) and list(prompt[: len(cached)]) == cached:
                    found.append(row)
                    start = row + 1
                    break
            else:
                return None
        return found

    def _continue(
        self, kept: _KeptCache, rows: list[int], prompts: Sequence[Sequence[int]]
    ) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """The kept cache cut to `rows`, and full-width ids and mask: kept columns, then the new tokens left-padded.

        `generate` prefills only the columns past the cache; positions come from the mask, so masked columns
        (padding, tokens sampled after a row had stopped) shift nothing.
        """
        index = torch.tensor(rows, dtype=torch.long)
        kept.cache.batch_select_indices(index.to(self.model.device))
        suffix_ids, suffix_mask = left_padded(
            [list(p[len(kept.rows[r]) :]) for p, r in zip(prompts, rows, strict=True)], self.pad_id
        )
        input_ids = torch.cat([kept.ids[index], suffix_ids], dim=1)
        attention_mask = torch.cat([kept.mask[index], suffix_mask], dim=1)
        return kept.cache, input_ids, attention_mask

    def _kept_cache(
        self,
        output: Any,
        attention_mask: torch.Tensor,
        prompts: Sequence[Sequence[int]],
        generations: list[Generation],
    ) -> _KeptCache | None:
        """What the next call may reuse: the cache holds every column but the last sampled one."""
        cache = getattr(output, _CACHE)
        layers = getattr(cache, "layers", None)
        if not layers or any(type(layer) is not _ReservedLayer for layer in layers):
            return None  # sliding-window or quantized layers drop columns; never reuse those
        sequences = output.sequences.cpu()
        length = sequences.shape[1] - 1
        if cache.get_seq_length() != length:
            return None
        steps = sequences.shape[1] - attention_mask.shape[1]
        mask = torch.zeros((len(prompts), length), dtype=torch.long)
        mask[:, : attention_mask.shape[1]] = attention_mask
        rows = []
        for row, (prompt, gen) in enumerate(zip(prompts, generations, strict=True)):
            fed = min(len(gen.token_ids), steps - 1)
            mask[row, attention_mask.shape[1] : attention_mask.shape[1] + fed] = 1
            rows.append([*prompt, *gen.token_ids[:fed]])
        return _KeptCache(cache, sequences[:, :length], mask, rows, self._weights_version())
