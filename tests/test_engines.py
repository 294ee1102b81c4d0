"""The generation engines: stop logic, left padding, greedy/seeded sampling, and recorded log-probs."""

from __future__ import annotations

import warnings

import pytest
import torch

from autorefine.modeling import load_tokenizer, tiny_qwen2
from autorefine.rollout.engine import SamplingParams, eos_token_ids, finish_generation
from autorefine.rollout.hf_engine import TransformersEngine
from tests.helpers import QWEN_TOKENIZER


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(QWEN_TOKENIZER)


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_qwen2(
        tokenizer, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=151936
    ).eval()


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


# --- finish_generation: the one rule every engine uses to end a turn -------------------------------------


def test_cut_right_after_stop_string(tokenizer):
    eos = eos_token_ids(tokenizer)
    tokens = ids(tokenizer, "<search> capital of France </search> and then more text")
    gen = finish_generation(tokens, [-1.0] * len(tokens), 100, ["</search>"], eos, tokenizer)
    assert gen.finish == "stop"
    assert tokenizer.decode(gen.token_ids).endswith("</search>")
    assert gen.token_ids == tokens[: len(gen.token_ids)]
    assert len(gen.logprobs) == len(gen.token_ids)


def test_stop_string_spanning_tokens_keeps_the_whole_last_token(tokenizer):
    eos = eos_token_ids(tokenizer)
    # "</answer>\n\n" may end inside a token: the cut keeps that sampled token whole (never re-tokenizes).
    tokens = ids(tokenizer, "<answer> Paris </answer>\n\nMore")
    gen = finish_generation(tokens, [0.0] * len(tokens), 100, ["</answer>"], eos, tokenizer)
    text = tokenizer.decode(gen.token_ids)
    assert "</answer>" in text
    assert "</answer>" not in tokenizer.decode(gen.token_ids[:-1])


def test_eos_ends_a_turn_and_is_kept(tokenizer):
    eos = eos_token_ids(tokenizer)
    tokens = [*ids(tokenizer, "I give up"), tokenizer.eos_token_id, *ids(tokenizer, "<answer> x </answer>")]
    gen = finish_generation(tokens, [0.0] * len(tokens), 100, ["</answer>"], eos, tokenizer)
    assert gen.finish == "eos"
    assert gen.token_ids[-1] == tokenizer.eos_token_id
    assert len(gen.token_ids) == len(ids(tokenizer, "I give up")) + 1


def test_stop_before_eos_wins(tokenizer):
    eos = eos_token_ids(tokenizer)
    tokens = [*ids(tokenizer, "<search> q </search>"), tokenizer.eos_token_id]
    gen = finish_generation(tokens, [0.0] * len(tokens), 100, ["</search>"], eos, tokenizer)
    assert gen.finish == "stop"
    assert tokenizer.eos_token_id not in gen.token_ids


def test_budget_cuts_and_reports_length(tokenizer):
    eos = eos_token_ids(tokenizer)
    tokens = ids(tokenizer, "a long thought that goes on and on and never stops")
    gen = finish_generation(tokens, list(range(len(tokens))), 4, ["</search>"], eos, tokenizer)
    assert gen.finish == "length"
    assert gen.token_ids == tokens[:4]
    assert gen.logprobs == [0.0, 1.0, 2.0, 3.0]


def test_stop_string_beyond_the_budget_does_not_count(tokenizer):
    eos = eos_token_ids(tokenizer)
    tokens = ids(tokenizer, "thinking thinking thinking <search> q </search>")
    gen = finish_generation(tokens, [0.0] * len(tokens), 3, ["</search>"], eos, tokenizer)
    assert gen.finish == "length"
    assert len(gen.token_ids) == 3


def test_sampling_params_validation():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    assert SamplingParams(temperature=0).greedy


# --- TransformersEngine ----------------------------------------------------------------------------------


def recomputed_logprobs(
    model, prompt: list[int], completion: list[int], temperature: float = 1.0
) -> torch.Tensor:
    """log p(completion token | prefix) from one forward pass, as TRL computes it."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0].float() / temperature
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(completion) - 1)
    return torch.log_softmax(logits[positions], -1).gather(1, torch.tensor(completion)[:, None]).squeeze(1)


def test_greedy_batch_equals_one_by_one_despite_left_padding(model, tokenizer):
    engine = TransformersEngine(model, tokenizer)
    prompts = [
        ids(tokenizer, "Who wrote Hamlet?"),
        ids(tokenizer, "A much longer prompt about the history of Rome and its"),
    ]
    greedy = SamplingParams(temperature=0)
    batched = engine.generate(prompts, [12, 12], greedy, [])
    alone = [engine.generate([p], [12], greedy, [])[0] for p in prompts]
    for b, a in zip(batched, alone, strict=True):
        assert b.token_ids == a.token_ids
        assert b.logprobs == pytest.approx(a.logprobs, abs=1e-4)


def test_recorded_logprobs_are_those_of_the_sampled_tokens(model, tokenizer):
    engine = TransformersEngine(model, tokenizer)
    prompts = [ids(tokenizer, "Question: who?"), ids(tokenizer, "Another, longer question: where and when?")]
    torch.manual_seed(0)
    gens = engine.generate(prompts, [10, 7], SamplingParams(temperature=0.8), [])
    for prompt, gen, budget in zip(prompts, gens, [10, 7], strict=True):
        assert 0 < len(gen.token_ids) <= budget
        expected = recomputed_logprobs(model, prompt, gen.token_ids, temperature=0.8)
        assert torch.allclose(torch.tensor(gen.logprobs), expected, atol=1e-4)


def recomputed_entropies(model, prompt: list[int], completion: list[int], temperature: float) -> torch.Tensor:
    """Entropy of the whole next-token distribution before each completion token, from one forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0].float() / temperature
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(completion) - 1)
    logp = torch.log_softmax(logits[positions], -1)
    return -(logp.exp() * logp).sum(-1)


def test_recorded_entropies_are_those_of_the_whole_distribution(model, tokenizer):
    engine = TransformersEngine(model, tokenizer)
    prompts = [ids(tokenizer, "Question: who?"), ids(tokenizer, "Another, longer question: where and when?")]
    torch.manual_seed(1)
    # top_p/top_k cut what is sampled from, not the distribution the entropy describes (TRL's, temperature only)
    gens = engine.generate(prompts, [9, 6], SamplingParams(temperature=0.7, top_p=0.9, top_k=50), [])
    for prompt, gen in zip(prompts, gens, strict=True):
        assert gen.entropies is not None and len(gen.entropies) == len(gen.token_ids)
        expected = recomputed_entropies(model, prompt, gen.token_ids, temperature=0.7)
        assert torch.allclose(torch.tensor(gen.entropies), expected, atol=1e-3)
        assert (expected > 0.1).all()  # a tiny random model is far from deterministic: the check has teeth


def test_seeded_sampling_is_reproducible_and_varies_without_seed(model, tokenizer):
    engine = TransformersEngine(model, tokenizer)
    prompt = [ids(tokenizer, "Tell me something")]
    params = SamplingParams(temperature=1.0)
    torch.manual_seed(123)
    first = engine.generate(prompt * 3, [8] * 3, params, [])
    torch.manual_seed(123)
    second = engine.generate(prompt * 3, [8] * 3, params, [])
    assert [g.token_ids for g in first] == [g.token_ids for g in second]
    # three samples of the same prompt from a random 152k-vocab model are (overwhelmingly) different
    assert len({tuple(g.token_ids) for g in first}) > 1


def test_per_row_budgets_and_chunking(model, tokenizer):
    engine = TransformersEngine(model, tokenizer, max_batch_size=2)
    prompts = [ids(tokenizer, f"prompt number {i}") for i in range(5)]
    gens = engine.generate(prompts, [1, 2, 3, 4, 5], SamplingParams(temperature=0), [])
    assert [len(g.token_ids) for g in gens] == [1, 2, 3, 4, 5]
    assert all(g.finish == "length" for g in gens)
    with pytest.raises(ValueError, match="budgets"):
        engine.generate(prompts, [1], SamplingParams(), [])


@pytest.fixture
def prefill_widths(model):
    """Width of every multi-token forward pass (the prefills) the model runs while the test does."""
    widths: list[int] = []

    def hook(module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is not None and input_ids.shape[1] > 1:
            widths.append(input_ids.shape[1])

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    yield widths
    handle.remove()


def next_turn(tokenizer, prompts, gens) -> list[list[int]]:
    """Each context extended by its generation and inserted text of a different length per row."""
    return [
        [*p, *g.token_ids, *ids(tokenizer, " documents" * (row + 2))]
        for row, (p, g) in enumerate(zip(prompts, gens, strict=True))
    ]


def test_next_turn_prefills_only_new_tokens_and_matches_a_fresh_engine(model, tokenizer, prefill_widths):
    engine = TransformersEngine(model, tokenizer)
    greedy = SamplingParams(temperature=0)
    prompts = [ids(tokenizer, "Who wrote Hamlet?"), ids(tokenizer, "A much longer prompt about Rome and its")]
    first = engine.generate(prompts * 2, [5, 9, 7, 3], greedy, [])
    contexts = next_turn(tokenizer, prompts * 2, first)[1:]  # a finished row drops out, as in the agent loop
    prefill_widths.clear()
    continued = engine.generate(contexts, [6, 6, 6], greedy, [])
    cached = [len(p) + len(g.token_ids) for p, g in zip(prompts * 2, first, strict=True)][1:]
    assert prefill_widths == [max(len(c) - n for c, n in zip(contexts, cached, strict=True))]
    fresh = TransformersEngine(model, tokenizer, reuse_cache=False).generate(contexts, [6, 6, 6], greedy, [])
    assert prefill_widths[-1] == max(map(len, contexts))
    for c, f, context in zip(continued, fresh, contexts, strict=True):
        assert c.token_ids == f.token_ids
        assert c.logprobs == pytest.approx(f.logprobs, abs=1e-4)
        assert c.entropies == pytest.approx(f.entropies, abs=1e-4)
        assert torch.allclose(
            torch.tensor(c.logprobs), recomputed_logprobs(model, context, c.token_ids), atol=1e-4
        )


def test_reserved_cache_layer_returns_what_concatenation_would():
    from transformers.cache_utils import DynamicLayer

    from autorefine.rollout.hf_engine import _ReservedLayer

    torch.manual_seed(0)
    ours, plain = _ReservedLayer(), DynamicLayer()
    ours.reserve = 2
    selections = {4: [2, 0, 1], 6: [1]}  # rows reordered within the reserve, then one row kept
    rows = 3
    # a prefill, decode steps past the reserve, selections from outside, then a second prefill
    for step, width in enumerate([5, 1, 1, 1, 1, 1, 3, 1]):
        if step in selections:
            for layer in (ours, plain):
                layer.batch_select_indices(torch.tensor(selections[step]))
            rows = len(selections[step])
        keys, values = torch.randn(rows, 2, width, 4), torch.randn(rows, 2, width, 4)
        got, expected = ours.update(keys, values), plain.update(keys, values)
        assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))
        assert ours.get_seq_length() == plain.get_seq_length()


def test_kept_cache_is_not_reused_after_a_weight_update_or_release(model, tokenizer, prefill_widths):
    engine = TransformersEngine(model, tokenizer)
    greedy = SamplingParams(temperature=0)
    prompts = [ids(tokenizer, "Who wrote Hamlet?")]
    contexts = next_turn(tokenizer, prompts, engine.generate(prompts, [4], greedy, []))
    with torch.no_grad():
        model.model.norm.weight.mul_(1.0)  # in place, as an optimizer step: same values, new version
    prefill_widths.clear()
    engine.generate(contexts, [4], greedy, [])
    assert prefill_widths == [len(contexts[0])]
    engine.release_cache()
    prefill_widths.clear()
    engine.generate(
        next_turn(tokenizer, contexts, engine.generate(contexts, [4], greedy, [])), [4], greedy, []
    )
    assert prefill_widths[-1] < len(contexts[0])  # kept again after the release, and reused
    engine.release_cache()
    prefill_widths.clear()
    engine.generate(contexts, [4], greedy, [])
    assert prefill_widths == [len(contexts[0])]


def test_vllm_engine_without_vllm_is_a_clear_error():
    from autorefine.rollout.engines import engine_from_checkpoint

    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="vLLM is not installed"):
            engine_from_checkpoint(str(QWEN_TOKENIZER), engine="vllm")
    else:  # pragma: no cover - only on GPU machines with vLLM
        pytest.skip("vLLM is installed here")


def test_generate_raises_no_deprecation_warning(model, tokenizer, capfd):
    engine = TransformersEngine(model, tokenizer)
    greedy = SamplingParams(temperature=0)
    prompts = [ids(tokenizer, "Who wrote Hamlet?")]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        first = engine.generate(prompts, [4], greedy, ["</search>"])
        engine.generate(next_turn(tokenizer, prompts, first), [4], greedy, ["</search>"])  # the kept cache
    assert "deprecated" not in capfd.readouterr().err  # nor transformers' own logged notice


def test_synced_engine_without_prompts_still_runs_the_forward_passes(model, tokenizer, free_port):
    import torch.distributed as dist

    # a sharded model all-gathers its weights in every forward: a process with nothing to do must take part
    forwards = []
    handle = model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        engine = TransformersEngine(model, tokenizer)
        assert engine.generate([], [], SamplingParams(), []) == [] and forwards == []
        engine.synced_gpus = True
        assert engine.generate([], [], SamplingParams(), []) == [] and len(forwards) == 1
    finally:
        dist.destroy_process_group()
        handle.remove()
    with pytest.raises(ValueError, match="max_batch_size"):
        TransformersEngine(model, tokenizer, max_batch_size=2, synced_gpus=True)


# --- shared group prefixes: G samples of a prompt prefill it once -----------------------------------------


@pytest.fixture
def forward_shapes(model):
    """(rows, width) of every multi-token forward pass the model runs while the test does."""
    shapes: list[tuple[int, int]] = []

    def hook(module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is not None and input_ids.shape[1] > 1:
            shapes.append(tuple(input_ids.shape))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    yield shapes
    handle.remove()


def group_prompts(tokenizer) -> list[list[int]]:
    """Two questions of different lengths × 4 samples each, interleaved as a trainer may order them."""
    short, long = (
        ids(tokenizer, "Who wrote Hamlet?"),
        ids(tokenizer, "A much longer prompt about Rome and its"),
    )
    return [short, long, short, short, long, long, short, long]


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0)])
def test_shared_prefix_samples_what_separate_prefills_sample(model, tokenizer, forward_shapes, params):
    prompts = group_prompts(tokenizer)
    runs = {}
    for share in (False, True):
        forward_shapes.clear()
        torch.manual_seed(7)
        engine = TransformersEngine(model, tokenizer, share_prefixes=share)
        runs[share] = (engine.generate(prompts, [12] * len(prompts), params, []), list(forward_shapes))
    (separate, separate_shapes), (shared, shared_shapes) = runs[False], runs[True]
    longest = max(map(len, prompts))
    assert separate_shapes == [(8, longest)]
    assert shared_shapes == [(2, longest - 1)]  # each distinct prompt once; its last token is the 1st step
    if not params.greedy:
        assert len({tuple(g.token_ids) for g in shared}) > 2  # real samples, not one copied row
    for s, o, prompt in zip(shared, separate, prompts, strict=True):
        assert s.token_ids == o.token_ids
        assert s.logprobs == pytest.approx(o.logprobs, abs=1e-4)
        assert s.entropies == pytest.approx(o.entropies, abs=1e-4)
        assert torch.allclose(
            torch.tensor(s.logprobs),
            recomputed_logprobs(model, prompt, s.token_ids, params.temperature or 1.0),
            atol=1e-4,
        )


def test_shared_prefix_next_turn_continues_the_expanded_cache(model, tokenizer, prefill_widths):
    engine = TransformersEngine(model, tokenizer)
    greedy = SamplingParams(temperature=0)
    prompts = group_prompts(tokenizer)
    contexts = next_turn(tokenizer, prompts, engine.generate(prompts, [5] * 8, greedy, []))
    prefill_widths.clear()
    continued = engine.generate(contexts, [6] * 8, greedy, [])
    assert max(prefill_widths) < min(map(len, contexts))  # only the new tokens of each row
    fresh = TransformersEngine(model, tokenizer, reuse_cache=False).generate(contexts, [6] * 8, greedy, [])
    assert [c.token_ids for c in continued] == [f.token_ids for f in fresh]


def test_distinct_or_one_token_prompts_are_not_shared(model, tokenizer, forward_shapes):
    engine = TransformersEngine(model, tokenizer)
    greedy = SamplingParams(temperature=0)
    prompts = [ids(tokenizer, "Who wrote Hamlet?"), ids(tokenizer, "Rome")]
    engine.generate(prompts, [3, 3], greedy, [])
    assert forward_shapes == [(2, max(map(len, prompts)))]
    forward_shapes.clear()
    engine.generate([[prompts[1][0]]] * 3, [3] * 3, greedy, [])
    assert forward_shapes == []  # one-token prompts: nothing to prefill before the first step
