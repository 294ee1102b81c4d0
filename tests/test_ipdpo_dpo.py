"""Masked DPO on TRL's real DPOTrainer with a tiny Qwen2 and the real tokenizer: inserted tokens are attended
but add nothing to the log-ratios or the NLL term; over-long pairs are dropped, never truncated; LoRA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from trl.trainer.dpo_trainer import DataCollatorForPreference

from autorefine.modeling import load_policy, tiny_qwen2
from autorefine.training.arguments import RunError
from autorefine.training.checkpoints import merge_adapter
from autorefine.training.ipdpo.collator import MaskedPreferenceCollator, dpo_example, pairs_dataset
from tests.helpers import (
    DOCS,
    RIGHT,
    SEARCH,
    WRONG,
    dpo_config,
    dpo_trainer_for,
    masked_logp,
    side,
    synthetic_tokenizer,
)

TOKENIZER = synthetic_tokenizer()


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2 saved with the synthetic task's tokenizer, as a round's starting policy."""
    out = tmp_path_factory.mktemp("policy")
    tiny_qwen2(TOKENIZER, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, seed=1).save_pretrained(
        out
    )
    TOKENIZER.save_pretrained(out)
    return out


trainer_for = dpo_trainer_for
config_for = dpo_config


def test_masked_logprob_sums_equal_a_hand_sum_over_model_tokens(tmp_path, policy_dir):
    chosen, rejected = side(SEARCH, DOCS, RIGHT), side(SEARCH, DOCS, WRONG)
    reference = load_policy(policy_dir, dtype="float32").eval()
    expected = {
        name: masked_logp(reference, row) for name, row in (("chosen", chosen), ("rejected", rejected))
    }
    unmasked = masked_logp(reference, chosen, only_model_tokens=False)
    assert abs(unmasked - expected["chosen"]) > 1.0, "the documents must weigh in an unmasked sum"

    trainer, data = trainer_for(tmp_path, policy_dir, [(chosen, rejected)], "trainer.max_steps=1")
    assert data == {"pairs": 1, "dropped_for_length": 0}
    trainer.train()
    [logged] = [h for h in trainer.state.log_history if "logps/chosen" in h]
    # TRL's sequence log-probs (taken before the step's update) are exactly the masked sums
    assert logged["logps/chosen"] == pytest.approx(expected["chosen"], abs=1e-3)
    assert logged["logps/rejected"] == pytest.approx(expected["rejected"], abs=1e-3)
    assert logged["rewards/chosen"] == pytest.approx(0.0, abs=1e-6), "policy == reference before the update"


class HiddenGrads:
    """Gradients of the loss w.r.t. the decoder's last hidden states (position p scores token p + 1)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.grads: list[torch.Tensor] = []

        def keep(module, args, kwargs, output):
            if torch.is_grad_enabled():
                output.last_hidden_state.register_hook(lambda g: self.grads.append(g.detach().clone()))

        model.get_decoder().register_forward_hook(keep, with_kwargs=True)


def loss_and_grads(trainer, collator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One DPO loss and backward on the first pair, batched by `collator`."""
    trainer.model.train()
    trainer.model.zero_grad()
    batch = collator([trainer.train_dataset[0]])
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss, {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("nll_weight", [0.0, 1.0])
def test_environment_tokens_get_no_gradient_but_are_attended(tmp_path, policy_dir, nll_weight):
    chosen, rejected = side(SEARCH, DOCS, RIGHT), side(SEARCH, DOCS, WRONG)
    trainer, _ = trainer_for(tmp_path, policy_dir, [(chosen, rejected)], f"nll_weight={nll_weight}")
    capture = HiddenGrads(trainer.model)
    loss_and_grads(trainer, trainer.data_collator)
    [grad] = capture.grads  # (chosen row, rejected row) × positions × hidden
    start = len(chosen["prompt_ids"])
    for row, trajectory in enumerate((chosen, rejected)):
        model_positions = env_positions = 0
        for j, keep in enumerate(trajectory["env_mask"]):
            g = grad[row, start + j - 1].abs().sum().item()
            if keep:
                model_positions += g > 0
            else:
                assert g == 0.0, f"row {row}: inserted token {j} received gradient"
                env_positions += 1
        assert env_positions > 10 and model_positions > 10


def test_pair_differing_only_in_masked_tokens_gives_zero_gradient(tmp_path, policy_dir):
    """Same sampled tokens, different inserted tail: the log-ratios cancel exactly, so DPO has nothing to learn."""
    tail_a = (
        "documents",
        "\n<documents>\nDoc 1(Title: Bigu Boslar) Bigu Boslar likes archery.\n</documents>\n",
    )
    tail_b = (
        "documents",
        "\n<documents>\nDoc 1(Title: Bigu Brenmair) Bigu Brenmair likes fishing.\n</documents>\n",
    )
    chosen, rejected = side(SEARCH, DOCS, RIGHT, tail_a), side(SEARCH, DOCS, RIGHT, tail_b)
    assert chosen["completion_ids"] != rejected["completion_ids"]
    trainer, _ = trainer_for(tmp_path, policy_dir, [(chosen, rejected)])

    loss, grads = loss_and_grads(trainer, trainer.data_collator)
    assert loss.item() == pytest.approx(0.6931, abs=1e-3)  # -log sigmoid(0)
    assert max(g.abs().max().item() for g in grads.values()) < 1e-7

    # TRL's own collator trains every completion token: the inserted tails then produce a gradient
    unmasked = DataCollatorForPreference(pad_token_id=TOKENIZER.pad_token_id)
    _, grads = loss_and_grads(trainer, unmasked)
    assert max(g.abs().max().item() for g in grads.values()) > 1e-4


def test_collator_keeps_trl_layout_and_masks_inserted_tokens():
    chosen, rejected = side(SEARCH, DOCS, RIGHT), side(SEARCH, WRONG)
    example = dpo_example({"chosen": chosen, "rejected": rejected})
    ours = MaskedPreferenceCollator(pad_token_id=0)([example])
    theirs = DataCollatorForPreference(pad_token_id=0)([example])
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
    prompt = len(chosen["prompt_ids"])
    for row, trajectory in enumerate((chosen, rejected)):
        end = prompt + len(trajectory["env_mask"])
        assert ours["completion_mask"][row, :prompt].sum() == 0
        assert ours["completion_mask"][row, prompt:end].tolist() == trajectory["env_mask"]
        assert ours["completion_mask"][row, end:].sum() == 0
    with pytest.raises(ValueError, match="never truncates"):
        MaskedPreferenceCollator(pad_token_id=0, max_length=8)([example])


def test_pairs_over_max_length_are_dropped_and_counted_never_truncated(tmp_path, policy_dir):
    short = (side(SEARCH, DOCS, RIGHT), side(SEARCH, DOCS, WRONG))
    long_tail = ("documents", " Bigu Boslar" * 80)
    long = (side(SEARCH, DOCS, RIGHT), side(SEARCH, DOCS, WRONG, long_tail))
    limit = len(short[0]["prompt_ids"]) + max(
        len(short[0]["completion_ids"]), len(short[1]["completion_ids"])
    )
    dataset, dropped = pairs_dataset(
        [{"chosen": c, "rejected": r} for c, r in (short, long, short)], max_length=limit
    )
    assert (len(dataset), dropped) == (2, 1)
    assert dataset[0]["rejected_ids"] == short[1]["completion_ids"], "kept pairs are whole"

    _, data = trainer_for(tmp_path, policy_dir, [short, long], f"trainer.max_length={limit}")
    assert data == {"pairs": 1, "dropped_for_length": 1}
    with pytest.raises(RunError, match=r"every pair is longer than trainer\.max_length=20"):
        trainer_for(tmp_path / "all", policy_dir, [short, long], "trainer.max_length=20")


def test_lora_trains_against_the_adapter_free_policy_and_merges_into_a_plain_folder(tmp_path, policy_dir):
    pairs = [(side(SEARCH, DOCS, RIGHT), side(SEARCH, DOCS, WRONG))] * 4
    lora = ("lora.enabled=true", "lora.r=4", "lora.alpha=8", "lora.dropout=0.0", "trainer.learning_rate=0.05",
            "trainer.max_steps=3")  # fmt: skip
    trainer, _ = trainer_for(tmp_path, policy_dir, pairs, *lora)
    assert trainer.ref_model is None, "with LoRA the reference is the policy with its adapter disabled"
    trainer.train()
    accuracies = [h["rewards/accuracies"] for h in trainer.state.log_history if "rewards/accuracies" in h]
    assert accuracies[-1] == 1.0
    trainer.save_model(str(tmp_path / "adapter"))
    merge_adapter(str(policy_dir), tmp_path / "adapter", tmp_path / "merged")
    assert not (tmp_path / "adapter").exists()
    merged = load_policy(tmp_path / "merged", dtype="float32").eval()
    base = load_policy(policy_dir, dtype="float32").eval()
    chosen, rejected = pairs[0]
    margin = lambda m: masked_logp(m, chosen) - masked_logp(m, rejected)  # noqa: E731
    assert margin(merged) > margin(base) + 0.1, "the merged policy prefers the chosen trajectory more"
