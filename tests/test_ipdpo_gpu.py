"""IP-DPO on a GPU in bf16 (skipped where no CUDA device exists, as in CI): masked DPO log-probs, and a whole
round — sampling and evaluation engines on the GPU, DPO in bf16 — on the synthetic task with real BM25."""

from __future__ import annotations

import json

import pytest
import torch

from autorefine.modeling import load_policy
from autorefine.training.ipdpo.rounds import train_ipdpo
from tests.helpers import DOCS, RIGHT, SEARCH, WRONG, masked_logp, side, synthetic_tokenizer
from tests.helpers import dpo_trainer_for as trainer_for
from tests.helpers import tiny_ipdpo_config as tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU = ("trainer.use_cpu=false", "trainer.bf16=true", "model.dtype=bfloat16")


@pytest.fixture(scope="module")
def bf16_policy_dir(tmp_path_factory):
    from autorefine.modeling import tiny_qwen2

    TOKENIZER = synthetic_tokenizer()

    out = tmp_path_factory.mktemp("policy-bf16")
    model = tiny_qwen2(TOKENIZER, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, seed=1)
    model.to(torch.bfloat16).save_pretrained(out)
    TOKENIZER.save_pretrained(out)
    return out


def test_masked_dpo_in_bf16_on_the_gpu(tmp_path, bf16_policy_dir):
    chosen, rejected = side(SEARCH, DOCS, RIGHT), side(SEARCH, DOCS, WRONG)
    reference = load_policy(bf16_policy_dir, dtype="float32").eval()
    expected = masked_logp(reference, chosen)
    trainer, _ = trainer_for(tmp_path, bf16_policy_dir, [(chosen, rejected)] * 4, *GPU, "trainer.max_steps=2")
    assert next(trainer.model.parameters()).device.type == "cuda"
    assert next(trainer.model.parameters()).dtype == torch.bfloat16
    trainer.train()
    first = next(h for h in trainer.state.log_history if "logps/chosen" in h)
    assert first["logps/chosen"] == pytest.approx(expected, rel=0.02), "bf16 sums over model tokens only"
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-3)


def test_a_round_on_the_gpu(synthetic_bm25_server, tmp_path):
    out = tmp_path / "run"
    train_ipdpo(tiny(synthetic_bm25_server, out, *GPU, "sampling.questions_per_round=32"))
    start, after = (json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines())
    assert after["pairs"]["pairs"] >= 1 and after["dpo"]["pairs"] == after["pairs"]["pairs"]
    assert after["heldout"]["count"] == start["heldout"]["count"] == 16
    assert json.loads((out / "round-1" / "config.json").read_text())["dtype"] == "bfloat16"
