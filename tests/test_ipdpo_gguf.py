"""`train-ipdpo` from a GGUF starting policy (`model.gguf_file`): converted once into a plain folder under the
run's output folder, which sampling, evaluation, the reference and every later round read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from autorefine.cli import main
from autorefine.config import IPDPORunConfig
from autorefine.modeling import load_policy, load_tokenizer
from autorefine.settings import RUN_CONFIG_FILE, load_config
from autorefine.training.arguments import RunError
from autorefine.training.ipdpo.rounds import train_ipdpo
from tests.helpers import REPO_ROOT, smollm2_bpe, write_tiny_llama_gguf

TINY_CPU = REPO_ROOT / "configs" / "ipdpo" / "tiny-cpu.yaml"
GGUF = "tiny-llama.gguf"
VOCAB = 4096


def overrides(url: str, gguf_dir: Path, out: Path) -> list[str]:
    """Two rounds of 4 questions × 4 samples from the GGUF policy, evaluated on 4 held-out questions.

    The random policy never answers: with every threshold at 0, pairs prefer the shorter of two trajectories.
    """
    return [
        f"retriever.url={url}", f"trainer.output_dir={out}",
        f"model.name_or_path={gguf_dir}", f"model.gguf_file={GGUF}",
        "rounds=2", "heldout.limit=4", "heldout.batch_size=4",
        "sampling.questions_per_round=4", "sampling.samples_per_question=4", "sampling.batch_questions=4",
        "sampling.temperature=1.0", "rollout.max_new_tokens=24", "rollout.max_completion_tokens=96",
        "pairs.min_format=0", "pairs.min_outcome=0", "pairs.min_process_gap=0", "pairs.min_pairs=1",
        "logging.pair_accuracy_pairs=0", "trainer.per_device_train_batch_size=4",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory) -> Path:
    """A folder holding a tiny random Llama GGUF with SmolLM2's BPE vocabulary (its first 4,096 ids)."""
    folder = tmp_path_factory.mktemp("gguf")
    write_tiny_llama_gguf(folder / GGUF, vocab_size=VOCAB)
    return folder


@pytest.fixture(scope="module")
def gguf_run(gguf_dir, synthetic_bm25_server, tmp_path_factory) -> Path:
    """`autorefine train-ipdpo`, two rounds from the GGUF policy; the run's output folder."""
    out = tmp_path_factory.mktemp("ipdpo-gguf") / "run"
    assert (
        main(["train-ipdpo", "--config", str(TINY_CPU), *overrides(synthetic_bm25_server, gguf_dir, out)])
        == 0
    )
    return out


def test_transformers_reads_the_tiny_gguf_with_its_bpe_tokenizer(gguf_dir):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF, dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == VOCAB
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF)
    tokens, merges, _ = smollm2_bpe(VOCAB)
    bpe = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split(" ")) for m in merges]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    text = "Search, then answer.\nQuestion: What is the home city of Bigu Brurbrun?"
    assert tokenizer.encode(text, add_special_tokens=False) == bpe.encode(text).ids
    assert tokenizer.eos_token == "<|im_end|>" and "<|im_start|>assistant" in tokenizer.chat_template


def test_two_rounds_from_a_gguf_policy_start_from_its_plain_conversion(gguf_run, gguf_dir):
    from transformers import AutoModelForCausalLM

    start = gguf_run / "start-policy"
    summaries = [json.loads(line) for line in (gguf_run / "rounds.jsonl").read_text().splitlines()]
    assert [s["round"] for s in summaries] == [0, 1, 2]
    assert [s["policy"] for s in summaries] == [str(start)] + [str(gguf_run / f"round-{i}") for i in (1, 2)]
    assert [s["started_from"] for s in summaries[1:]] == [str(start), str(gguf_run / "round-1")]
    assert all(s["pairs"]["pairs"] >= 1 for s in summaries[1:])
    assert all(s["heldout"]["count"] == 4 for s in summaries), "each policy evaluated, the GGUF one included"

    # the starting policy holds the GGUF's weights, exactly, as a plain model with the GGUF's tokenizer
    assert "quantization_config" not in json.loads((start / "config.json").read_text())
    expected = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=GGUF, dtype=torch.float32
    ).state_dict()
    for name, tensor in load_policy(start, dtype="float32").state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    tokenizer = load_tokenizer(start)
    assert json.loads((start / "gguf_source.json").read_text())["path"] == str(gguf_dir / GGUF)

    for index in (1, 2):  # each round sampled through the GGUF's chat template and saved a plain policy
        round_dir = gguf_run / f"round-{index}"
        sample = json.loads((round_dir / "samples.jsonl").read_text().splitlines()[0])
        prompt = tokenizer.decode(sample["prompt_ids"])
        assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
        model = yaml.safe_load((round_dir / RUN_CONFIG_FILE).read_text())["model"]
        assert model["gguf_file"] is None and model["name_or_path"] == str(start)
        load_policy(round_dir, dtype="float32")


def test_a_resumed_run_reuses_the_conversion_and_refuses_another_gguf(
    gguf_run, gguf_dir, synthetic_bm25_server, tmp_path
):
    converted = (gguf_run / "start-policy" / "model.safetensors").stat().st_mtime_ns
    config = load_config(IPDPORunConfig, TINY_CPU, overrides(synthetic_bm25_server, gguf_dir, gguf_run))
    assert train_ipdpo(config, resume=True) == gguf_run / "round-2"
    assert (gguf_run / "start-policy" / "model.safetensors").stat().st_mtime_ns == converted

    write_tiny_llama_gguf(tmp_path / GGUF, vocab_size=VOCAB, eos_rate=0.2)
    other = load_config(IPDPORunConfig, TINY_CPU, overrides(synthetic_bm25_server, tmp_path, gguf_run))
    with pytest.raises(RunError, match="converted from another GGUF file"):
        train_ipdpo(other, resume=True)
