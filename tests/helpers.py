"""Helpers the test modules share: data paths, a scripted engine, tiny run configs, DPO pair builders.

Fixtures (servers, indexes, models) are in `conftest.py`; `fake_vllm.py` is the stand-in for vLLM.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
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


# --- a tiny GGUF Llama with a real BPE vocabulary ---------------------------------------------------------


def smollm2_bpe(vocab_size: int) -> tuple[list[str], list[str], set[int]]:
    """SmolLM2's byte-level BPE cut to its first `vocab_size` ids: tokens, the merges among them, special ids.

    BPE ids follow merge order, so the cut vocabulary with its own merges is the same tokenizer stopped earlier.
    """
    spec = json.loads((SMOLLM2_TOKENIZER / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = {token: index for token, index in spec["model"]["vocab"].items() if index < vocab_size}
    tokens = sorted(vocab, key=vocab.__getitem__)
    merges = [
        " ".join(pair)
        for pair in (m.split(" ") if isinstance(m, str) else m for m in spec["model"]["merges"])
        if "".join(pair) in vocab and pair[0] in vocab and pair[1] in vocab
    ]
    special = {a["id"] for a in spec["added_tokens"] if a["special"] and a["id"] < vocab_size}
    return tokens, merges, special


def write_tiny_llama_gguf(
    path: Path, *, vocab_size: int = 4096, hidden: int = 16, layers: int = 2, eos_rate: float = 0.1
) -> Path:
    """A random Llama as a float32 GGUF file with SmolLM2's (cut) BPE vocabulary and chat template.

    Sampled at temperature 1 it writes random tokens and ends with `<|im_end|>` (its EOS) at about `eos_rate`
    per token, so trajectories have different lengths: every token embedding has a constant first component,
    which survives the final norm, and only the EOS row of the output layer reads it.
    """
    import gguf
    import numpy as np

    tokens, merges, special = smollm2_bpe(vocab_size)
    heads, ff, eos = 2, 2 * hidden, tokens.index("<|im_end|>")
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_name("tiny-llama-test")
    writer.add_context_length(2048)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(1)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])  # 3: control
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    writer.add_eos_token_id(eos)
    writer.add_chat_template((SMOLLM2_TOKENIZER / "chat_template.jinja").read_text(encoding="utf-8"))

    rng = np.random.default_rng(0)

    def weights(*shape: int, std: float = 0.02) -> Any:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    embeddings = weights(len(tokens), hidden)
    embeddings[:, 0] = 1.0
    writer.add_tensor("token_embd.weight", embeddings)
    for i in range(layers):
        head_dim = hidden // heads
        for name, shape in (("attn_q", (hidden, hidden)), ("attn_k", (head_dim, hidden)),
                            ("attn_v", (head_dim, hidden)), ("attn_output", (hidden, hidden)),
                            ("ffn_gate", (ff, hidden)), ("ffn_up", (ff, hidden)), ("ffn_down", (hidden, ff))):  # fmt: skip
            writer.add_tensor(f"blk.{i}.{name}.weight", weights(*shape))
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    output = weights(len(tokens), hidden, std=0.5)
    output[:, 0] = 0.0
    output[eos] = 0.0
    # After the final norm the first component is about sqrt(hidden): this sets the EOS logit to log-odds.
    output[eos, 0] = float(np.log(eos_rate * (len(tokens) - 1) / (1 - eos_rate))) / hidden**0.5
    writer.add_tensor("output.weight", output)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


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


def launch_grpo_2proc(
    tmp_path, port: int, *overrides: str, flags: tuple[str, ...] = ()
) -> tuple[int, list[dict], str]:
    """Train the tiny-cpu preset on 2 processes; returns the exit status, each rank's report and stderr."""
    report = tmp_path / "report"
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO_ROOT / "configs/accelerate/cpu_2proc.yaml"),
        "--main_process_port", str(port),
        str(REPO_ROOT / "tests/launch_grpo.py"), "--report", str(report), *flags, "--",
        f"trainer.output_dir={tmp_path / 'run'}",
        "trainer.per_device_train_batch_size=8",  # 2 × 8 = 16 trajectories = 4 questions × 4 per step
        "trainer.num_generations=4",
        "trainer.save_strategy=no",
        "trainer.report_to=[]",
        "logging.sample_table_every=0",
        *overrides,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=900)
    reports = [json.loads(p.read_text()) for p in sorted(report.glob("rank-*.json"))]
    return result.returncode, reports, result.stderr
