"""Contract tests of the vLLM engine in both of TRL's modes, through fakes shaped exactly like vLLM and TRL's client.

Colocate: `VLLMEngine(llm=...)` over tests/fake_vllm.py's `vllm.LLM`. Server: `VLLMEngine(client=...)` over TRL's
own `VLLMClient.generate` and `parse_logprobs`, talking HTTP to a fake `vllm serve`. Both fakes sample from the
warm-start policy, so the transformers engine over the same weights is the reference.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest

from autorefine import protocol
from autorefine.data import read_questions
from autorefine.modeling import load_policy, load_tokenizer
from autorefine.protocol import PromptTemplate
from autorefine.retrieval import RetrieverClient, RetrieverUnavailableError
from autorefine.rollout import AgentLoop, RolloutSettings, SamplingParams
from autorefine.rollout.hf_engine import TransformersEngine
from autorefine.rollout.vllm_engine import VLLMEngine
from tests import fake_vllm
from tests.helpers import SYNTHETIC_DIR

WARM = SYNTHETIC_DIR / "warmstart"
ROLLOUT = RolloutSettings(max_turns=2, max_new_tokens=48, max_obs_tokens=160, max_completion_tokens=320)
GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(WARM)


@pytest.fixture(scope="module")
def policy():
    return load_policy(WARM, dtype="float32").eval()


@pytest.fixture
def vllm_installed(monkeypatch):
    fake_vllm.install(monkeypatch)


@pytest.fixture(scope="module")
def server():
    from testbed.retriever import free_port

    with fake_vllm.FakeVLLMServer(str(WARM), free_port()) as running:
        yield running


def colocated(tokenizer, path=WARM, **kwargs) -> VLLMEngine:
    return VLLMEngine(tokenizer, llm=fake_vllm.LLM(model=str(path), seed=0), **kwargs)


def served(tokenizer, url: str, **kwargs) -> VLLMEngine:
    return VLLMEngine(tokenizer, client=fake_vllm.fake_client_class()(base_url=url), **kwargs)


def trajectories(engine, url: str, limit: int = 4):
    questions = [q.question for q in read_questions(SYNTHETIC_DIR / "heldout.jsonl", limit=limit)]
    with RetrieverClient(url) as client:
        loop = AgentLoop(engine, client, ROLLOUT, PromptTemplate.load(SYNTHETIC_DIR / "template.txt"))
        return loop.run(questions, GREEDY)


@pytest.mark.parametrize("mode", ["colocate", "server"])
def test_greedy_rollouts_match_the_transformers_engine(
    mode, vllm_installed, server, tokenizer, policy, synthetic_bm25_server
):
    engine = colocated(tokenizer) if mode == "colocate" else served(tokenizer, server.url)
    reference = trajectories(TransformersEngine(policy, tokenizer), synthetic_bm25_server)
    got = trajectories(engine, synthetic_bm25_server)
    assert [t.num_searches for t in got] == [t.num_searches for t in reference]
    for t, r in zip(got, reference, strict=True):
        assert t.completion_ids == r.completion_ids
        assert t.env_mask == r.env_mask
        assert t.finish_reason == r.finish_reason
        assert t.logprobs == pytest.approx(r.logprobs, abs=1e-4)


def with_extra_eos(tmp_path, tokenizer, policy):
    """A copy of the warm start whose generation config lists, besides EOS, the token it greedily writes first."""
    prompt = AgentLoop(TransformersEngine(policy, tokenizer), None, ROLLOUT).prompt_ids("Who?")
    [first] = TransformersEngine(policy, tokenizer).generate([prompt], [1], GREEDY, [])
    extra = first.token_ids[0]
    assert extra != tokenizer.eos_token_id
    folder = tmp_path / "model"
    shutil.copytree(WARM, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    config["eos_token_id"] = [tokenizer.eos_token_id, extra]  # as Qwen2.5-Instruct lists <|im_end|> too
    (folder / "generation_config.json").write_text(json.dumps(config))
    return folder, prompt, extra


def test_generation_config_eos_ids_end_a_turn_in_every_engine(vllm_installed, tmp_path, tokenizer, policy):
    from autorefine.rollout.engines import engine_from_checkpoint

    folder, prompt, extra = with_extra_eos(tmp_path, tokenizer, policy)
    engines = {
        "transformers": engine_from_checkpoint(str(folder), dtype="float32"),
        "vllm colocate": engine_from_checkpoint(str(folder), engine="vllm"),
    }
    with fake_vllm.FakeVLLMServer(str(folder), _port()) as running:
        # a trainer passes its model's generation-config EOS ids (see TrainerEngine)
        engines["vllm server"] = served(
            tokenizer, running.url, generation_eos=[tokenizer.eos_token_id, extra]
        )
        for name, engine in engines.items():
            [gen] = engine.generate([prompt], [20], GREEDY, protocol.STOP_STRINGS)
            assert (gen.token_ids, gen.finish) == ([extra], "eos"), name


def _port() -> int:
    from testbed.retriever import free_port

    return free_port()


def test_a_missing_server_logprob_is_nan_not_a_crash(tokenizer):
    with fake_vllm.FakeVLLMServer(str(WARM), _port(), nan_logprob_at=1) as running:
        engine = served(tokenizer, running.url)
        prompt = tokenizer.encode("What is the home city of Bigu Bolvou?")
        [gen] = engine.generate([prompt], [6], GREEDY, [])
    assert len(gen.logprobs) == len(gen.token_ids) == 6
    assert math.isnan(gen.logprobs[1])
    assert all(math.isfinite(x) for i, x in enumerate(gen.logprobs) if i != 1)


def test_the_fake_server_refuses_what_vllm_refuses(tokenizer):
    import httpx

    prompt = tokenizer.encode("What is the home city of Bigu Bolvou?")
    limit = len(prompt) + 4
    with fake_vllm.FakeVLLMServer(str(WARM), _port(), max_model_len=limit) as running:
        [card] = httpx.get(f"{running.url}/v1/models").json()["data"]
        body = {"model": card["id"], "prompt": [prompt], "max_tokens": 5, "return_token_ids": True}
        refused = httpx.post(f"{running.url}/v1/completions", json=body)
        fits = httpx.post(f"{running.url}/v1/completions", json={**body, "max_tokens": 4})
    assert card["max_model_len"] == limit
    assert refused.status_code == 400
    assert refused.json() == {
        "error": {
            "message": f"You passed {len(prompt)} input tokens and requested 5 output tokens. However, the "
            f"model's context length is only {limit} tokens, resulting in a maximum input length of "
            f"{limit - 5} tokens. Please reduce the length of the input prompt. "
            f"(parameter=input_tokens, value={len(prompt)})",
            "type": "BadRequestError",
            "param": "input_tokens",
            "code": 400,
        }
    }
    assert fits.status_code == 200


def test_each_row_asks_the_server_for_its_own_token_budget(tokenizer):
    """A row near the end of its completion budget must not be sent the batch's largest budget."""
    short = tokenizer.encode("What is the home city of Bigu Bolvou?")
    long = tokenizer.encode("Search, then answer. " * 4 + "What is the home city of Bigu Bolvou?")
    budgets = [12, 3, 12, 5]
    prompts = [short, long, short, long]
    limit = len(long) + 5  # the long rows fit only with their own budgets
    assert len(short) + 12 <= limit
    with fake_vllm.FakeVLLMServer(str(WARM), _port(), max_model_len=limit) as running:
        engine = served(tokenizer, running.url)
        together = engine.generate(prompts, budgets, GREEDY, [])
        alone = [engine.generate([p], [b], GREEDY, [])[0] for p, b in zip(prompts, budgets, strict=True)]
        sent = sorted(r["max_tokens"] for r in running.requests[: -len(prompts)])
    assert sent == [3, 5, 12]  # one request per distinct budget
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]  # and every answer in its place
    assert [len(g.token_ids) <= b for g, b in zip(together, budgets, strict=True)] == [True] * 4


SETTINGS = SamplingParams(temperature=0.8, top_p=0.9, top_k=7, min_p=0.05, repetition_penalty=1.3, seed=11)


def test_every_sampling_setting_reaches_both_vllm_modes(vllm_installed, server, tokenizer):
    engine = colocated(tokenizer)
    sent = []
    generate = engine.llm.generate
    engine.llm.generate = lambda prompts, sampling_params, **kw: (
        sent.extend(sampling_params) or generate(prompts, sampling_params, **kw)
    )
    engine.generate([[5, 6, 7]], [5], SETTINGS, ["</search>"])
    [colocate] = sent
    assert (colocate.temperature, colocate.top_p, colocate.top_k, colocate.min_p) == (0.8, 0.9, 7, 0.05)
    assert (colocate.repetition_penalty, colocate.seed, colocate.max_tokens) == (1.3, 11, 5)
    assert colocate.stop == ["</search>"] and colocate.include_stop_str_in_output and colocate.logprobs == 0

    bodies = []
    client = fake_vllm.fake_client_class()(base_url=server.url)
    post = client._post
    client._post = lambda url, **kw: bodies.append(kw.get("json")) or post(url, **kw)
    VLLMEngine(tokenizer, client=client).generate([[5, 6, 7]], [4], SETTINGS, ["</search>"])
    [body] = bodies
    expected = {"temperature": 0.8, "top_p": 0.9, "top_k": 7, "min_p": 0.05, "repetition_penalty": 1.3}
    assert {k: body[k] for k in expected} == expected
    assert (body["seed"], body["max_tokens"], body["logprobs"]) == (11, 4, 0)
    assert body["stop"] == ["</search>"] and body["include_stop_str_in_output"] is True


@pytest.mark.parametrize(
    "params",
    [
        pytest.param(SamplingParams(temperature=0, repetition_penalty=1.8), id="repetition_penalty"),
        # sampling that can only ever pick the most likely token is greedy decoding, in every engine
        pytest.param(SamplingParams(temperature=1.0, min_p=0.999, seed=3), id="min_p"),
        pytest.param(SamplingParams(temperature=1.0, top_k=1, seed=3), id="top_k"),
    ],
)
def test_sampling_settings_act_alike_in_both_engines(params, vllm_installed, tokenizer, policy):
    prompt = tokenizer.encode("What is the home city of Bigu Bolvou? the the the Bigu Bigu")
    greedy = TransformersEngine(policy, tokenizer).generate([prompt], [12], GREEDY, [])[0].token_ids
    hf = TransformersEngine(policy, tokenizer).generate([prompt], [12], params, [])[0].token_ids
    if params.repetition_penalty != 1:
        assert hf != greedy  # the penalty changes what greedy decoding writes
    else:
        assert hf == greedy
    assert colocated(tokenizer).generate([prompt], [12], params, [])[0].token_ids == hf


def test_vllm_settings_that_cannot_reach_the_rollouts_are_refused():
    from autorefine.config import GRPORunConfig
    from autorefine.settings import load_config
    from autorefine.training.arguments import RunError
    from autorefine.training.grpo.trainer import make_grpo_args
    from tests.helpers import REPO_ROOT

    def args(*overrides):
        return make_grpo_args(
            load_config(
                GRPORunConfig, REPO_ROOT / "configs/grpo/tiny-cpu.yaml", ["trainer.report_to=[]", *overrides]
            )
        )

    with pytest.raises(RunError, match="generation_kwargs"):
        args("trainer.generation_kwargs={suppress_tokens: [1]}")
    with pytest.raises(RunError, match="sleep_mode"):
        args("trainer.use_vllm=true", "trainer.vllm_enable_sleep_mode=true")
    with pytest.raises(RunError, match="structured_outputs"):
        args("trainer.use_vllm=true", "trainer.vllm_structured_outputs_regex=a+")
    sampling = args(
        "trainer.min_p=0.1", "trainer.repetition_penalty=1.1"
    )  # the transformers engine takes them
    assert (sampling.min_p, sampling.repetition_penalty) == (0.1, 1.1)


# --- the context window, checked at start ---------------------------------------------------------------


def longest_synthetic_prompt(tokenizer) -> int:
    """The longest training prompt of the tiny preset, every prompt built and measured."""
    from autorefine.protocol import prompt_ids

    template = PromptTemplate.load(SYNTHETIC_DIR / "template.txt")
    questions = read_questions(SYNTHETIC_DIR / "train.jsonl")
    return max(len(prompt_ids(q.question, tokenizer, template, 3)) for q in questions)


@pytest.fixture
def no_model_loading(monkeypatch):
    import autorefine.training.grpo.trainer as grpo

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the context window was checked")

    monkeypatch.setattr(grpo, "load_tokenizer_and_policy", must_not_load)


def vllm_config(tmp_path, *overrides, retriever: str | None = None):
    from tests.helpers import tiny_grpo_config

    # no retriever unless given: the window is checked before the retriever is
    url = retriever or f"http://127.0.0.1:{_port()}"
    return tiny_grpo_config(url, tmp_path, "trainer.use_vllm=true", "retriever.startup_wait_s=1", *overrides)


def test_the_longest_prompt_is_measured_exactly(tokenizer):
    from autorefine.rollout.agent import longest_prompt

    questions = [q.question for q in read_questions(SYNTHETIC_DIR / "train.jsonl")]
    template = PromptTemplate.load(SYNTHETIC_DIR / "template.txt")
    length, question = longest_prompt(questions, tokenizer, template, 3)
    assert length == longest_synthetic_prompt(tokenizer)
    assert question in questions


def test_a_vllm_server_too_small_for_prompt_plus_completion_is_refused_before_the_model_loads(
    tokenizer, tmp_path, no_model_loading
):
    from autorefine.training.arguments import RunError
    from autorefine.training.grpo.trainer import build_trainer

    prompt = longest_synthetic_prompt(tokenizer)
    limit = prompt + 320 - 1  # one token short of the preset's completion budget (320)
    with fake_vllm.FakeVLLMServer(str(WARM), _port(), max_model_len=limit) as running:
        config = vllm_config(
            tmp_path, "trainer.vllm_mode=server", f"trainer.vllm_server_base_url={running.url}"
        )
        with pytest.raises(RunError) as err:
            build_trainer(config)
    message = str(err.value)
    assert f"longest prompt ({prompt} tokens" in message
    assert f"rollout.max_completion_tokens (320) = {prompt + 320} tokens" in message
    assert f"context window of {limit} tokens (the vLLM server at {running.url}" in message
    assert f"lower rollout.max_completion_tokens to {limit - prompt}" in message


def test_an_unreachable_vllm_server_stops_the_run_before_the_model_loads(tmp_path, no_model_loading):
    from autorefine.training.arguments import RunError
    from autorefine.training.grpo.trainer import build_trainer

    url = f"http://127.0.0.1:{_port()}"
    config = vllm_config(
        tmp_path,
        "trainer.vllm_mode=server",
        f"trainer.vllm_server_base_url={url}",
        "trainer.vllm_server_timeout=1",
    )
    with pytest.raises(RunError, match=f"the vLLM server at {url} did not answer GET /v1/models within 1 s"):
        build_trainer(config)


def test_an_unreachable_vllm_server_says_where_it_is_looked_for_and_which_port_it_connects_back_to(
    tmp_path, no_model_loading
):
    from autorefine.training.arguments import RunError
    from autorefine.training.grpo.trainer import build_trainer

    port = _port()
    config = vllm_config(
        tmp_path,
        "trainer.vllm_mode=server",
        "trainer.vllm_server_host=127.0.0.1",
        f"trainer.vllm_server_port={port}",
        "trainer.vllm_group_port=51299",
        "trainer.vllm_server_timeout=1",
    )
    with pytest.raises(RunError) as err:
        build_trainer(config)
    message = str(err.value)
    assert f"the vLLM server at http://127.0.0.1:{port} did not answer GET /v1/models within 1 s" in message
    assert "trainer.vllm_server_host and trainer.vllm_server_port" in message
    assert "on trainer.vllm_group_port (51299): that port must be open to it too" in message


def test_a_vllm_server_serving_another_model_is_refused_before_the_model_loads(tmp_path, no_model_loading):
    from autorefine.training.arguments import RunError
    from autorefine.training.grpo.trainer import build_trainer

    other = shutil.copytree(WARM, tmp_path / "another-policy")  # the same weights under another name
    with fake_vllm.FakeVLLMServer(str(other), _port()) as running:
        config = vllm_config(
            tmp_path, "trainer.vllm_mode=server", f"trainer.vllm_server_base_url={running.url}"
        )
        with pytest.raises(RunError) as err:
            build_trainer(config)
    message, trained = str(err.value), config.model.name_or_path  # data/synthetic/warmstart
    assert (
        f"the vLLM server at {running.url} serves {other}, not the policy being trained ({trained}" in message
    )
    assert f"`trl vllm-serve --model {trained}`" in message and f"--served-model-name {trained}" in message
    # a copy in a folder of the trained model's name is the trained model (e.g. a node-local copy of the weights)
    copy = shutil.copytree(WARM, tmp_path / "node-local" / WARM.name)
    with fake_vllm.FakeVLLMServer(str(copy), _port()) as running:
        config = vllm_config(
            tmp_path, "trainer.vllm_mode=server", f"trainer.vllm_server_base_url={running.url}"
        )
        with pytest.raises(RetrieverUnavailableError):  # past the check, on to the retriever
            build_trainer(config)


def test_a_job_on_several_machines_refuses_a_vllm_server_on_loopback():
    from types import SimpleNamespace

    from autorefine.training.arguments import RunError
    from autorefine.training.grpo.trainer import check_vllm_server_host

    def args(**kwargs):
        defaults = {"use_vllm": True, "vllm_mode": "server", "vllm_server_base_url": None}
        return SimpleNamespace(
            **{**defaults, "vllm_server_host": "0.0.0.0", "vllm_server_port": 8000, **kwargs}
        )

    two_machines = ["node-a", "node-a", "node-b", "node-b"]
    with pytest.raises(
        RunError, match=r"runs on 2 machines \(node-a, node-b\) but the vLLM server is at http://0"
    ):
        check_vllm_server_host(args(), two_machines)
    with pytest.raises(RunError, match="vllm_server_host"):
        check_vllm_server_host(args(vllm_server_base_url="http://127.0.0.1:8000"), two_machines)
    check_vllm_server_host(args(vllm_server_host="gen-node"), two_machines)  # another node: fine
    check_vllm_server_host(args(), ["node-a", "node-a"])  # one machine: loopback is that machine
    check_vllm_server_host(args(vllm_mode="colocate"), two_machines)  # no server


def test_a_taken_group_port_is_refused():
    import socket

    from autorefine.training.arguments import RunError
    from autorefine.training.grpo.trainer import check_group_port

    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        from types import SimpleNamespace

        with pytest.raises(RunError, match=f"trainer.vllm_group_port={port} is taken on"):
            check_group_port(SimpleNamespace(vllm_group_port=port))
    check_group_port(SimpleNamespace(vllm_group_port=_port()))


def test_a_too_small_colocated_vllm_max_model_length_is_refused_before_the_model_loads(
    tokenizer, tmp_path, no_model_loading
):
    from autorefine.training.arguments import RunError
    from autorefine.training.grpo.trainer import build_trainer

    prompt = longest_synthetic_prompt(tokenizer)
    config = vllm_config(tmp_path, "trainer.vllm_mode=colocate", "trainer.vllm_max_model_length=256")
    with pytest.raises(RunError, match=r"context window of 256 tokens \(trainer.vllm_max_model_length\)"):
        build_trainer(config)
    fits = vllm_config(tmp_path, "trainer.vllm_max_model_length=" + str(prompt + 320))
    with pytest.raises(RetrieverUnavailableError):  # past the check, on to the retriever
        build_trainer(fits)


def test_a_colocated_vllm_sized_by_the_model_config_is_checked_once_built(
    vllm_installed, tmp_path, synthetic_bm25_server
):
    from autorefine.training.arguments import RunError
    from autorefine.training.grpo.trainer import build_trainer

    # the warm start's config allows 512 positions: 320 completion tokens fit after the prompt, 500 do not
    config = vllm_config(
        tmp_path,
        "trainer.vllm_mode=colocate",
        "rollout.max_completion_tokens=500",
        retriever=synthetic_bm25_server,
    )
    with pytest.raises(RunError, match=r"context window of 512 tokens \(the colocated vLLM's"):
        build_trainer(config)
