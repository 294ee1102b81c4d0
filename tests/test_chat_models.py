"""Chat models as first-class policies: templates, end-of-turn tokens and the model/environment junction.

Two real chat tokenizers with different vocabularies: SmolLM2 (49k BPE, ChatML) and Qwen2.5 (152k, ChatML).
"""

from __future__ import annotations

import json

import pytest

from autorefine import protocol
from autorefine.modeling import load_tokenizer
from autorefine.protocol import NO_RETRIEVAL_TEMPLATE_NAME, PromptTemplate, build_prompt
from autorefine.retrieval import RetrieverClient
from autorefine.rollout import AgentLoop, FinishReason, RolloutSettings, SamplingParams
from autorefine.rollout.engine import eos_token_ids, finish_generation
from tests.helpers import QWEN_TOKENIZER, SMOLLM2_TOKENIZER, ScriptedEngine, Turn

TOKENIZERS = {"smollm2": SMOLLM2_TOKENIZER, "qwen2.5": QWEN_TOKENIZER}


@pytest.fixture(scope="module", params=list(TOKENIZERS))
def chat(request):
    """(tokenizer, the model's generation-config EOS ids) of one real chat model."""
    folder = TOKENIZERS[request.param]
    generation = json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
    return load_tokenizer(folder), generation["eos_token_id"]


@pytest.fixture(scope="module")
def client(demo_bm25_server):
    with RetrieverClient(demo_bm25_server) as c:
        yield c


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def test_prompt_is_one_user_turn_and_an_open_assistant_turn(chat):
    tokenizer, _ = chat
    prompt = build_prompt("Who wrote Hamlet", tokenizer, PromptTemplate.load(), topk=2)
    user = prompt.index("<|im_start|>user\n")
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert "Question: Who wrote Hamlet?" in prompt[user:]
    assert "<search>" in prompt[user:] and "2 most relevant passages" in prompt[user:]
    # The model continues the assistant turn: its first sampled token follows the generation prompt.
    opening = encode(tokenizer, "<|im_start|>assistant\n")
    assert encode(tokenizer, prompt)[-len(opening) :] == opening


def test_no_retrieval_prompt_has_no_search_instructions(chat):
    tokenizer, _ = chat
    template = PromptTemplate.packaged(NO_RETRIEVAL_TEMPLATE_NAME)
    prompt = build_prompt("Who wrote Hamlet", tokenizer, template, topk=2)
    assert "<search>" not in prompt and "<documents>" not in prompt
    assert "<answer>" in prompt and prompt.endswith("<|im_start|>assistant\n")


def test_a_template_that_opens_no_assistant_turn_is_refused():
    broken = load_tokenizer(SMOLLM2_TOKENIZER)
    broken.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ValueError, match="opens no assistant turn"):
        build_prompt("q", broken, PromptTemplate.load(), topk=3)


def test_stop_strings_cut_after_the_closing_tag_in_this_vocabulary(chat):
    tokenizer, generation_eos = chat
    eos = eos_token_ids(tokenizer, generation_eos)
    for text, stop, kept in [
        ("<search> capital of France </search>\n\nand more", "</search>", "</search>"),
        ("<answer> Paris </answer><|im_end|>", "</answer>", "</answer>"),
    ]:
        tokens = encode(tokenizer, text)
        gen = finish_generation(tokens, [0.0] * len(tokens), 100, protocol.STOP_STRINGS, eos, tokenizer)
        assert gen.finish == "stop"
        assert kept in tokenizer.decode(gen.token_ids)
        assert stop not in tokenizer.decode(gen.token_ids[:-1])  # no token past the one that completes it
        assert gen.token_ids == tokens[: len(gen.token_ids)]


ONE_SEARCH = RolloutSettings(max_turns=1, topk=2)


def scripted_run(tokenizer, client, eos_ids, turns, config=ONE_SEARCH):
    """One trajectory of scripted turns through the real agent loop and retriever."""
    probe = AgentLoop(ScriptedEngine(tokenizer, {}), client, config)
    prompt = probe.prompt_ids("Who portrayed Corliss Archer in the film Kiss and Tell?")
    engine = ScriptedEngine(tokenizer, {tuple(prompt): turns}, eos_ids=eos_ids)
    [trajectory] = AgentLoop(engine, client, config).run_prompt_ids([prompt], SamplingParams())
    return trajectory, engine.returned[tuple(prompt)]


def test_inserted_documents_never_merge_with_sampled_tokens(chat, client):
    tokenizer, generation_eos = chat
    eos = eos_token_ids(tokenizer, generation_eos)
    turns = [
        Turn("<think> who played her </think>\n<search> Corliss Archer Kiss and Tell </search>"),
        Turn("<refine> Shirley Temple played Corliss Archer. </refine>\n<answer> Shirley Temple </answer>"),
    ]
    t, sampled = scripted_run(tokenizer, client, eos, turns)
    docs = next(s for s in t.segments if s.kind == "documents")
    inserted = t.completion_ids[docs.start : docs.end]
    # Exactly: sampled ids, the documents tokenized on their own, sampled ids, the closing EOS.
    assert t.completion_ids == [*sampled[0], *inserted, *sampled[1], tokenizer.eos_token_id]
    assert inserted[: len(encode(tokenizer, protocol.DOCUMENTS_OPEN))] == encode(
        tokenizer, protocol.DOCUMENTS_OPEN
    )
    assert inserted[-len(encode(tokenizer, protocol.DOCUMENTS_CLOSE)) :] == encode(
        tokenizer, protocol.DOCUMENTS_CLOSE
    )
    assert t.env_mask == [1] * len(sampled[0]) + [0] * len(inserted) + [1] * len(sampled[1]) + [0]
    # Re-tokenizing the text would merge tokens across a junction in this vocabulary: what we avoid.
    text = tokenizer.decode(t.completion_ids[:-1], skip_special_tokens=False)
    assert encode(tokenizer, text) != t.completion_ids[:-1]


@pytest.mark.parametrize("end", ["<|im_end|>", "<|endoftext|>"])
def test_a_sampled_end_of_turn_ends_the_trajectory_once(chat, client, end):
    tokenizer, generation_eos = chat
    eos = eos_token_ids(tokenizer, generation_eos)
    end_id = tokenizer.convert_tokens_to_ids(end)
    assert end_id in eos  # both models' generation configs list both ids
    t, [sampled] = scripted_run(tokenizer, client, eos, [Turn(f"I do not know.{end}", finish="eos")])
    assert t.finish_reason == FinishReason.NO_ACTION
    assert t.completion_ids == sampled and t.completion_ids[-1] == end_id
    assert t.completion_ids.count(end_id) == 1
    assert t.env_mask[-1] == 1  # sampled by the model: trained on, so it learns to end turns
    assert [s.kind for s in t.segments] == ["model"]
    assert t.model_text == "I do not know."


def test_an_answer_gets_the_end_of_turn_appended_as_environment(chat, client):
    tokenizer, generation_eos = chat
    eos = eos_token_ids(tokenizer, generation_eos)
    t, [sampled] = scripted_run(tokenizer, client, eos, [Turn("<answer> Shirley Temple </answer>")])
    assert t.finish_reason == FinishReason.ANSWER
    assert t.completion_ids == [*sampled, tokenizer.eos_token_id]
    assert tokenizer.eos_token == "<|im_end|>"  # a ChatML turn closes the way the model closes its own
    assert t.env_mask[-1] == 0 and t.segments[-1].kind == "eos"
    # TRL counts a completion as truncated unless it ends on one of its EOS ids (tokenizer's + model's).
    assert t.completion_ids[-1] in eos
