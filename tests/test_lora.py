"""LoRA target modules found from the architecture, explicit lists honoured, unknown names refused."""

from __future__ import annotations

import pytest
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from autorefine.config import GRPORunConfig
from autorefine.modeling import LoraSettings, linear_module_names, load_tokenizer, lora_config, tiny_qwen2
from autorefine.settings import ConfigError, load_config
from tests.helpers import QWEN_TOKENIZER

PROJECTIONS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def tiny_llama():
    """SmolLM2's architecture (Llama, tied embeddings), shrunk."""
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def tiny_gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=64))


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (lambda: tiny_qwen2(load_tokenizer(QWEN_TOKENIZER), hidden_size=32), PROJECTIONS),
        (tiny_llama, PROJECTIONS),
        (tiny_gpt2, ["c_attn", "c_fc", "c_proj"]),  # Conv1D projections count as linear
    ],
    ids=["qwen2", "llama", "gpt2"],
)
def test_auto_finds_the_projections_of_the_decoder_layers(build, expected):
    from peft import get_peft_model

    model = build()
    assert linear_module_names(model) == expected
    config = lora_config(LoraSettings(enabled=True), model)
    assert config.target_modules == "all-linear"  # peft's own choice, as for DPO
    wrapped = get_peft_model(model, config)  # peft resolves "all-linear" to the model's projections
    resolved = {name.rsplit(".", 1)[-1] for name in wrapped.peft_config["default"].target_modules}
    assert sorted(resolved) == expected


def test_peft_adapts_exactly_those_layers_and_not_the_head():
    from peft import get_peft_model

    model = tiny_llama()
    wrapped = get_peft_model(model, lora_config(LoraSettings(enabled=True, r=4), model))
    adapted = {
        name.rsplit(".", 1)[-1] for name, m in wrapped.named_modules() if hasattr(m, "lora_A") and m.lora_A
    }
    assert sorted(adapted) == PROJECTIONS
    assert not any("lm_head" in name for name, p in wrapped.named_parameters() if p.requires_grad)
    assert not hasattr(wrapped.get_output_embeddings(), "lora_A")


def test_an_explicit_list_is_honoured():
    config = lora_config(LoraSettings(enabled=True, target_modules=["q_proj", "v_proj"]), tiny_llama())
    assert sorted(config.target_modules) == ["q_proj", "v_proj"]


def test_unknown_names_are_refused_with_the_available_ones():
    settings = LoraSettings(enabled=True, target_modules=["q_proj", "c_attn"])
    with pytest.raises(ConfigError, match=r"\['c_attn'\] are not linear layers of LlamaForCausalLM; available: "
                       r"down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"):  # fmt: skip
        lora_config(settings, tiny_llama())


def test_lora_off_gives_no_config_and_the_default_is_auto():
    assert lora_config(LoraSettings(), tiny_llama()) is None
    assert LoraSettings().target_modules == "auto"
    config = load_config(GRPORunConfig, None, ["lora.enabled=true", "lora.target_modules=[q_proj, k_proj]"])
    assert config.lora.target_modules == ["q_proj", "k_proj"]
    assert load_config(GRPORunConfig, None, ["lora.target_modules=auto"]).lora.target_modules == "auto"
    with pytest.raises(ConfigError, match="target_modules"):
        load_config(GRPORunConfig, None, ["lora.target_modules=everything"])


def test_without_a_model_auto_leaves_the_search_to_peft():
    assert lora_config(LoraSettings(enabled=True)).target_modules == "all-linear"
