"""`evaluate`/`infer --adapter PATH`: a PEFT LoRA adapter merged over its base model folder."""

from __future__ import annotations

import pytest
import torch

from autorefine.cli import main
from autorefine.modeling import load_policy
from autorefine.rollout.engines import engine_from_checkpoint
from autorefine.settings import ConfigError
from tests.helpers import SYNTHETIC_DIR

BASE = SYNTHETIC_DIR / "warmstart"
QUESTION = "What is the home city of Bigu Bolvou?"
WARMSTART_ARGS = [
    "--model", str(BASE), "--template", str(SYNTHETIC_DIR / "template.txt"),
    "--max-turns", "2", "--max-new-tokens", "48", "--max-obs-tokens", "160",
    "--max-completion-tokens", "320", "--topk", "3",
]  # fmt: skip


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A LoRA adapter over the synthetic warm start with random (non-zero) B matrices, and its logits."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(
        load_policy(BASE, dtype="float32"), LoraConfig(r=4, target_modules="all-linear")
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    folder = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(folder)
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        expected = peft_model.eval()(ids).logits
    return folder, ids, expected


def test_adapter_is_merged_over_its_base(adapter):
    folder, ids, expected = adapter
    engine = engine_from_checkpoint(str(BASE), adapter=str(folder), device="cpu", dtype="float32")
    assert not hasattr(engine.model, "peft_config")  # merged: a plain model generates at the base's speed
    with torch.no_grad():
        got = engine.model(ids).logits
        base = load_policy(BASE, dtype="float32").eval()(ids).logits
    assert torch.allclose(got, expected, atol=1e-4)
    assert not torch.allclose(got, base, atol=1e-2)  # the adapter changed the model


def test_a_folder_without_an_adapter_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"no adapter_config\.json"):
        engine_from_checkpoint(str(BASE), adapter=str(tmp_path), device="cpu")
    with pytest.raises(ConfigError, match="engine transformers"):
        engine_from_checkpoint(str(BASE), adapter=str(tmp_path), engine="vllm")


def test_infer_and_evaluate_with_an_adapter(adapter, synthetic_bm25_server, tmp_path, capsys):
    folder = str(adapter[0])
    args = [*WARMSTART_ARGS, "--retriever-url", synthetic_bm25_server, "--adapter", folder]
    assert main(["infer", *args, QUESTION]) == 0
    assert "question" in capsys.readouterr().out
    questions = tmp_path / "q.jsonl"
    questions.write_text((SYNTHETIC_DIR / "heldout.jsonl").read_text().splitlines()[0] + "\n")
    out = tmp_path / "eval"
    evaluate = ["evaluate", *args, "--datasets", f"synthetic={questions}", "--out", str(out), "--no-progress"]
    assert main(evaluate) == 0
    assert '"adapter"' in (out / "run.json").read_text() and folder in (out / "run.json").read_text()
    # Predictions of another policy (no adapter) are never mixed into the same folder.
    no_adapter = [a for a in evaluate if a not in ("--adapter", folder)]
    assert main(no_adapter) != 0
    assert "adapter" in capsys.readouterr().err
