"""A small causal LM as a relevance judge: re-scores a query's top candidates in one pass per candidate.

Two modes, both one forward pass per (query, passage) pair, batched over the candidates, no generation:

- `query-likelihood` (default): the mean log-probability of the query's tokens, teacher-forced after
  "Passage: {p}\nPlease write a question based on this passage.\nQuestion:" (UPR-style). It asks the
  model to *explain* the query from the passage, which even a 135M model does well: a passage that holds
  the query's entities and relations makes its words likely.
- `yes-no`: the log-odds of the next token being "yes" rather than "no" after a relevance question. A
  small model barely separates gold from random passages this way (BENCHMARKS.md), so it is opt-in.

Each passage is judged alone against the query (no pairwise or listwise prompts, so K candidates cost K
short passes). Passages are cut to `MAX_PASSAGE_TOKENS`; the model runs in bf16 where the CPU has native
bf16 (AVX512-BF16/AMX).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

Hit = tuple[float, dict[str, str]]
RERANK_DTYPES = ("fp32", "bf16")
RERANK_MODES = ("query-likelihood", "yes-no")
SCORE_KINDS = {"query-likelihood": "rerank_query_logprob", "yes-no": "rerank_logodds"}
MAX_PASSAGE_TOKENS = 160
_GENERATE = "Passage: {passage}\nPlease write a question based on this passage.\nQuestion:"
_QUESTION = (
    "Does the passage contain information that helps answer the search query? Answer yes or no.\n\n"
    "Search query: {query}\n\nPassage: {passage}"
)
_YES = ("yes", "Yes", " yes", " Yes")
_NO = ("no", "No", " no", " No")


class RerankError(ValueError):
    """A reranker that cannot be used as named."""


def check_reranker(name: str, dtype: str = "bf16", mode: str = "query-likelihood") -> Path:
    """The folder of a causal LM usable as a judge; refuse anything else with a clear message."""
    if mode not in RERANK_MODES:
        raise RerankError(f"unknown rerank mode {mode!r} (choose from {', '.join(RERANK_MODES)})")
    if dtype not in RERANK_DTYPES:
        raise RerankError(f"unknown reranker dtype {dtype!r} (choose from {', '.join(RERANK_DTYPES)})")
    path = Path(name).expanduser()
    config = path / "config.json"
    if not config.is_file():
        raise RerankError(
            f"unknown reranker {name!r}: give the folder of a causal language model (config.json, weights, "
            "tokenizer), e.g. the output of `autorefine fetch-model smollm2-135m-instruct`"
        )
    architectures = json.loads(config.read_text("utf-8")).get("architectures") or []
    if not any(a.endswith("ForCausalLM") for a in architectures):
        raise RerankError(
            f"reranker {name!r} is not a causal language model (architectures {architectures}); "
            "cross-encoder weights are not installable offline here, use a causal LM judge"
        )
    return path


def _token_ids(tokenizer: Any, words: tuple[str, ...]) -> list[int]:
    """The single-token ids among `words` (a word several tokens long cannot be read from one logit)."""
    ids = {tuple(tokenizer.encode(w, add_special_tokens=False)) for w in words}
    return sorted({i[0] for i in ids if len(i) == 1})


class LMReranker:
    """Scores (query, passage) pairs with a causal LM (query likelihood or yes/no); higher is more relevant."""

    def __init__(
        self, path: Path, *, dtype: str = "bf16", batch_size: int = 16, mode: str = "query-likelihood"
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if mode not in RERANK_MODES:
            raise RerankError(f"unknown rerank mode {mode!r} (choose from {', '.join(RERANK_MODES)})")
        self.mode = mode
        self.score_kind = SCORE_KINDS[mode]
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "left"  # both modes read the last positions of every row
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.convert_ids_to_tokens(0)
        torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).eval()
        self.yes = _token_ids(self.tokenizer, _YES)
        self.no = _token_ids(self.tokenizer, _NO)
        if mode == "yes-no" and (not self.yes or not self.no):
            raise RerankError(f"reranker {path}: its tokenizer has no single token for 'yes' or 'no'")
        self.batch_size = batch_size
        self.chat = getattr(self.tokenizer, "chat_template", None) is not None
        self.seconds = 0.0

    def _cut(self, passage: str) -> str:
        """The passage's first `MAX_PASSAGE_TOKENS` tokens, as text."""
        return self.tokenizer.decode(
            self.tokenizer.encode(passage, add_special_tokens=False)[:MAX_PASSAGE_TOKENS]
        )

    def prompt(self, query: str, passage: str) -> str:
        """The yes/no judged text, ending where the model's answer starts."""
        question = _QUESTION.format(query=query, passage=self._cut(passage))
        if self.chat:
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
            )
        return f"{question}\nAnswer:"

    def query_tokens(self, query: str, passage: str) -> tuple[list[int], list[int]]:
        """The (passage prompt, query) token ids whose concatenation query likelihood teacher-forces."""
        prefix = self.tokenizer.encode(_GENERATE.format(passage=self._cut(passage)))
        return prefix, self.tokenizer.encode(" " + query.strip(), add_special_tokens=False)

    def score(self, pairs: list[tuple[str, str]]) -> list[float]:
        """Each (query, passage)'s relevance in this reranker's mode."""
        start = time.perf_counter()
        scores = self._query_likelihood(pairs) if self.mode == "query-likelihood" else self._yes_no(pairs)
        self.seconds += time.perf_counter() - start
        return scores

    def _query_likelihood(self, pairs: list[tuple[str, str]]) -> list[float]:
        """Mean log P(query token | passage prompt, earlier query tokens), batched by similar length."""
        import torch

        rows = [self.query_tokens(q, p) for q, p in pairs]
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
        pad = self.tokenizer.pad_token_id
        scores = [0.0] * len(rows)
        with torch.inference_mode():
            for i in range(0, len(order), self.batch_size):
                chunk = order[i : i + self.batch_size]
                seqs = [rows[r][0] + rows[r][1] for r in chunk]
                width = max(map(len, seqs))
                ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
                mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
                # Positions counted from each row's first real token: left padding must not shift them.
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                # The query is every row's suffix, so only the last q + 1 positions' logits are needed
                # (position t predicts token t + 1): no batch × length × vocabulary tensor.
                q = max(len(rows[r][1]) for r in chunk)
                logits = (
                    self.model(
                        input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=q + 1
                    )
                    .logits[:, :-1]
                    .float()
                )
                targets = ids[:, -q:]
                logp = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
                lengths = torch.tensor([len(rows[r][1]) for r in chunk])
                is_query = torch.arange(q).unsqueeze(0) >= (q - lengths).unsqueeze(1)  # mask the passage part
                means = (logp * is_query).sum(-1) / lengths.clamp(min=1)
                for r, value in zip(chunk, means.tolist(), strict=True):
                    scores[r] = value
        return scores

    def _yes_no(self, pairs: list[tuple[str, str]]) -> list[float]:
        """log P(yes) − log P(no) of each (query, passage), batched by similar length."""
        import torch

        prompts = [self.prompt(q, p) for q, p in pairs]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        scores = [0.0] * len(prompts)
        with torch.inference_mode():
            for i in range(0, len(order), self.batch_size):
                rows = order[i : i + self.batch_size]
                batch = self.tokenizer([prompts[r] for r in rows], return_tensors="pt", padding=True)
                # Positions counted from each row's first real token: left padding must not shift them.
                positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
                logits = self.model(**batch, position_ids=positions).logits[:, -1].float()
                logp = torch.log_softmax(logits, dim=-1)
                odds = torch.logsumexp(logp[:, self.yes], -1) - torch.logsumexp(logp[:, self.no], -1)
                for r, value in zip(rows, odds.tolist(), strict=True):
                    scores[r] = value
        return scores

    def rerank(self, queries: list[str], candidates: list[list[Hit]]) -> list[list[Hit]]:
        """Each query's candidates re-scored and sorted, best first (ties keep the first-stage order)."""
        pairs = [(q, doc["contents"]) for q, hits in zip(queries, candidates, strict=True) for _, doc in hits]
        scores = iter(self.score(pairs))
        out = []
        for hits in candidates:
            rescored = [(next(scores), doc) for _, doc in hits]
            out.append(sorted(rescored, key=lambda hit: -hit[0]))
        return out


def load_reranker(
    name: str, *, dtype: str = "bf16", batch_size: int = 16, mode: str = "query-likelihood"
) -> LMReranker:
    """The LM judge in folder `name` (checked by `check_reranker`), scoring in `mode`."""
    return LMReranker(check_reranker(name, dtype, mode), dtype=dtype, batch_size=batch_size, mode=mode)
