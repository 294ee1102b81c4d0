"""Helpers the test modules share: data paths, a scripted engine, tiny run configs, DPO pair builders.

Fixtures (servers, indexes, models) are in `conftest.py`; `fake_vllm.py` is the stand-in for vLLM.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autorefine.rollout import Generation

# --- paths of the data the tests read (all inside the repository) -----------------------------------------

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = REPO_ROOT / "data" / "demo"
DEMO_CORPUS = DEMO_DIR / "corpus.jsonl"
WIKI18_SAMPLE = DEMO_DIR / "wiki18_sample.jsonl"
HOTPOTQA_DEV = DEMO_DIR / "hotpotqa_dev.jsonl"
SYNTHETIC_DIR = REPO_ROOT / "data" / "synthetic"
MULTIHOP_DIR = REPO_ROOT / "data" / "synthetic_multihop"
QWEN_TOKENIZER = REPO_ROOT / "data" / "tokenizers" / "qwen2.5"
SMOLLM2_TOKENIZER = REPO_ROOT / "data" / "tokenizers" / "smollm2"
# The converted SmolLM2 (`autorefine fetch-model`), kept between test sessions: CI converts it once.
SMOLLM2_CACHE = REPO_ROOT / ".cache" / "models" / "smollm2-135m-instruct"


# --- a scripted `GenerationEngine` for agent-loop tests: plays fixed turns per prompt, shaped like a real one --


@dataclass
class Turn:
    text: str
    finish: str = "stop"  # "stop" | "eos"


class ScriptedEngine:
    """Plays a fixed list of turns per question; records every generation it returned."""

    def __init__(
        self, tokenizer, scripts: dict[tuple[int, ...], list[Turn]], eos_ids: set[int] | None = None
    ):
        self.tokenizer = tokenizer
        self.scripts = scripts
        if eos_ids is not None:  # as `TransformersEngine.eos_ids`: the tokenizer's EOS and the model's
            self.eos_ids = eos_ids
        self.calls: dict[tuple[int, ...], int] = dict.fromkeys(scripts, 0)
        self.returned: dict[tuple[int, ...], list[list[int]]] = {k: [] for k in scripts}

    def generate(self, prompts, max_new_tokens, params, stop) -> list[Generation]:
        out = []
        for context, budget in zip(prompts, max_new_tokens, strict=True):
            key = next(k for k in self.scripts if tuple(context[: len(k)]) == k)
            turn = self.scripts[key][self.calls[key]]
            self.calls[key] += 1
            ids = self.tokenizer.encode(turn.text, add_special_tokens=False)
            finish = turn.finish
            if turn.finish == "eos" and (not ids or ids[-1] not in getattr(self, "eos_ids", ())):
                ids = [*ids, self.tokenizer.eos_token_id]
            if len(ids) > budget:
                ids, finish = ids[:budget], "length"
            self.returned[key].append(ids)
            out.append(Generation(ids, [-0.5] * len(ids), finish))
        return out


# --- tiny run configs ---------------------------------------------------------------------------------------


def tiny_grpo_config(url: str, out: Path, *overrides: str) -> Any:
    """The tiny-cpu GRPO preset, small and quiet: 4 questions × 8 samples per step, no W&B, no checkpoints."""
    from autorefine.config import GRPORunConfig
    from autorefine.settings import load_config

    return load_config(
        GRPORunConfig,
        REPO_ROOT / "configs" / "grpo" / "tiny-cpu.yaml",
        [
            f"retriever.url={url}",
            f"trainer.output_dir={out}",
            "trainer.report_to=[]",
            "trainer.save_strategy=no",
            "trainer.per_device_train_batch_size=32",
            "trainer.max_steps=2",
            "heldout.every=0",
            "logging.sample_table_every=0",
            *overrides,
        ],
    )


def tiny_ipdpo_config(url: str, out: Path, *overrides: str) -> Any:
    """The tiny-cpu IP-DPO preset at test size: 8 questions × 4 samples, 16 held-out questions, one round."""
    from autorefine.config import IPDPORunConfig
    from autorefine.settings import load_config

    return load_config(
        IPDPORunConfig,
        REPO_ROOT / "configs" / "ipdpo" / "tiny-cpu.yaml",
        [
            f"retriever.url={url}",
            f"trainer.output_dir={out}",
            "rounds=1",
            "sampling.questions_per_round=8",
            "sampling.samples_per_question=4",
            "sampling.batch_questions=4",
            "sampling.temperature=0.3",
            "heldout.limit=16",
            "heldout.batch_size=16",
            "pairs.min_pairs=1",
            "logging.pair_accuracy_pairs=8",
            "trainer.per_device_train_batch_size=4",
            "trainer.logging_steps=1",
            *overrides,
        ],
    )


# --- DPO pairs on the synthetic task's tokenizer ------------------------------------------------------------


@functools.cache
def synthetic_tokenizer() -> Any:
    """The synthetic task's tokenizer, loaded once."""
    from autorefine.modeling import load_tokenizer

    return load_tokenizer(SYNTHETIC_DIR / "tokenizer")


def ids(text: str) -> list[int]:
    """Token ids of `text` (synthetic tokenizer, no special tokens)."""
    return synthetic_tokenizer().encode(text, add_special_tokens=False)


def side(*parts: tuple[str, str]) -> dict:
    """A trajectory row from (kind, text) parts: kind 'model' is sampled (mask 1), anything else inserted."""
    completion, mask = [], []
    for kind, text in parts:
        tokens = ids(text)
        completion += tokens
        mask += [1 if kind == "model" else 0] * len(tokens)
    return {"prompt_ids": ids("Search, then answer.\nQuestion: What is the home city of Bigu Boslar?\n"),
            "completion_ids": completion, "env_mask": mask}  # fmt: skip


SEARCH = ("model", "<think> I will search. </think>\n<search> Bigu Boslar </search>")
DOCS = (
    "documents",
    "\n<documents>\nDoc 1(Title: Bigu Boslar) The home city of Bigu Boslar is Tewick.\n</documents>\n",
)
RIGHT = ("model", "<refine> The home city of Bigu Boslar is Tewick. </refine>\n<answer> Tewick </answer>")
WRONG = ("model", "<refine> Nothing useful. </refine>\n<answer> Pemere </answer>")


def write_pairs(path: Path, pairs: list[tuple[dict, dict]]) -> Path:
    """A pairs file of (chosen, rejected) rows, typed `wrong`."""
    path.write_text("".join(json.dumps({"id": f"q{i}", "type": "wrong", "chosen": c, "rejected": r}) + "\n"
                            for i, (c, r) in enumerate(pairs)))  # fmt: skip
    return path


def dpo_config(out: Path, *overrides: str) -> Any:
    """An IP-DPO config for one quiet DPO epoch on CPU."""
    from autorefine.config import IPDPORunConfig
    from autorefine.settings import load_config

    return load_config(
        IPDPORunConfig,
        None,
        [
            f"trainer.output_dir={out}",
            "trainer.use_cpu=true",
            "trainer.report_to=[]",
            "trainer.save_strategy=no",
            "trainer.activation_checkpointing=false",
            "trainer.per_device_train_batch_size=1",
            "trainer.logging_steps=1",
            "trainer.max_length=512",
            "nll_weight=0",
            *overrides,
        ],
    )


def dpo_trainer_for(tmp_path: Path, policy: Path, pairs: list[tuple[dict, dict]], *overrides: str) -> Any:
    """A masked-DPO trainer on `pairs`, starting from (and referenced to) `policy`."""
    from autorefine.training.ipdpo.dpo import build_dpo_trainer, make_dpo_args

    config = dpo_config(tmp_path, *overrides)
    tmp_path.mkdir(parents=True, exist_ok=True)
    pairs_file = write_pairs(tmp_path / "pairs.jsonl", pairs)
    return build_dpo_trainer(config, make_dpo_args(config, tmp_path / "dpo"), str(policy), pairs_file)


def masked_logp(model: Any, row: dict, only_model_tokens: bool = True) -> float:
    """Sum of log p(token | prefix) over the completion's model tokens (or all of them), by hand."""
    import torch

    sequence = torch.tensor([row["prompt_ids"] + row["completion_ids"]])
    with torch.no_grad():
        logps = torch.log_softmax(model(sequence).logits[0, :-1].float(), -1)
    start = len(row["prompt_ids"])
    total = 0.0
    for j, (token, keep) in enumerate(zip(row["completion_ids"], row["env_mask"], strict=True)):
        if keep or not only_model_tokens:
            total += logps[start + j - 1, token].item()
    return total


# --- a retriever that starts refusing its clients mid-run -------------------------------------------------------


class RefusingProxy:
    """A proxy (127.0.0.1, free port) to a real retriever that answers 401 after `allow` searches or `refuse()`."""

    # What our server restarted with a new API key answers to every request. Stopped on leaving `with`.
    REFUSAL = b'{"detail": "wrong API key: the bearer token sent is not this retriever\'s"}'

    def __init__(self, upstream: str, allow: int | None = None) -> None:
        import threading

        self.upstream = upstream.rstrip("/")
        self.allow = allow
        self.retrieves = 0  # POST /retrieve requests received
        self.refused = 0
        self.refusing = False
        self._lock = threading.Lock()
        self._server: Any = None
        self._thread: Any = None
        self.url = ""

    def refuse(self) -> None:
        """Answer 401 from now on."""
        with self._lock:
            self.refusing = True

    def _admit(self, path: str) -> bool:
        with self._lock:
            if path == "/retrieve":
                self.retrieves += 1
                if self.allow is not None and self.retrieves > self.allow:
                    self.refusing = True
            self.refused += self.refusing
            return not self.refusing

    def __enter__(self) -> RefusingProxy:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        import httpx

        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _forward(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if not proxy._admit(self.path):
                    headers = {"Content-Type": "application/json", "WWW-Authenticate": "Bearer"}
                    self._answer(401, proxy.REFUSAL, headers)
                    return
                response = httpx.request(
                    method,
                    proxy.upstream + self.path,
                    content=body,
                    headers={"Content-Type": self.headers.get("Content-Type", "application/json")},
                    timeout=60.0,
                )
                content_type = response.headers.get("content-type", "application/json")
                self._answer(response.status_code, response.content, {"Content-Type": content_type})

            def do_GET(self) -> None:
                self._forward("GET")

            def do_POST(self) -> None:
                self._forward("POST")

            def log_message(self, *args: Any) -> None:
                pass  # quiet: the test reads the counters

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
