"""Model-token throughput of the multi-turn agent loop against one batched `generate()` of as many tokens.

    python benchmarks/rollout.py [--rounds 7] [--batch 16] [--threads 1] [--retrain]

A tiny policy (the synthetic warm start, fine-tuned here to imitate scripted three-turn traces played through
the real agent loop and the real BM25 retriever: think + search the name, refine + search name and city,
refine + answer; cached under runs/bench/rollout-policy) is measured in alternating rounds:

  (a)  `AgentLoop.run` on `--batch` held-out questions, sampling at temperature 1.0: model tokens are the
       sum of env_mask; the wall time covers everything (generation, retrieval, documents, parsing);
  (a0) the same with `TransformersEngine(reuse_cache=False)`: transformers' own cache, every turn prefills its
       whole context again (the engine before cross-turn cache reuse);
  (b)  one `model.generate()` from the same prompts with exactly N new tokens per row (N = mean model tokens
       per trajectory of (a); min_new_tokens = max_new_tokens, no stop strings, KV cache): the limit of this
       machine for that many tokens;
  (d)  only the documents (a) inserted, prefilled in batches with no context: work no engine can skip.

Prints per-round lines, then medians of tokens/s, the ratio (a)/(b) and where (a)'s time goes.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from synthetic_setup import REPO, SYNTHETIC, ensure_index, load_average, median, parse_with_threads, settings

from autorefine.data import Question, read_questions
from autorefine.modeling import load_policy, load_tokenizer
from autorefine.protocol import PromptTemplate
from autorefine.retrieval import RetrieverClient
from autorefine.rollout import AgentLoop, Generation, RolloutSettings, SamplingParams, Trajectory
from autorefine.rollout.hf_engine import TransformersEngine, left_padded
from autorefine.training.sft.traces import TeacherEngine
from testbed.retriever import running_retriever

CONFIG = RolloutSettings(
    max_turns=2, max_new_tokens=96, max_obs_tokens=160, max_completion_tokens=480, topk=3
)
POLICY = REPO / "runs" / "bench" / "rollout-policy"
TRAINING = {"traces": 1024, "steps": 300, "batch_size": 16, "lr": 1e-3}
_NAME = re.compile(r"home city of (?P<name>.+?)\?")
_DOC_PREFIX = re.compile(r"^Doc \d+\(Title: [^)]*\) ", re.MULTILINE)
_SENTENCE = re.compile(r"[^.\n]*\.")


def three_turn_writer(question: Question, completion_text: str) -> str:
    """Scripted turns: think + search the name; refine + search name and city; refine + answer."""
    match = _NAME.search(question.question)
    name = match["name"] if match else question.question
    turn = completion_text.count("<documents>")
    if turn == 0:
        return (
            f"<think> The question asks for the home city of {name}. I will search for {name} first, "
            f"then search again for the city, and answer. </think>\n<search> {name} </search>"
        )
    documents = _DOC_PREFIX.sub("", completion_text.rsplit("<documents>", 1)[1])
    about = [s.strip() for s in _SENTENCE.findall(documents) if name in s]
    if turn == 1:
        refine = about[0] if about else f"No passage names {name}."
        return f"<refine> {refine} </refine>\n<search> {name} home city </search>"
    city = question.golden_answers[0]
    evidence = next((s for s in about if city in s), f"The home city of {name} is {city}.")
    return f"<refine> {evidence} </refine>\n<answer> {city} </answer>"


def scripted_traces(
    questions: Sequence[Question], tokenizer, client: RetrieverClient, template: PromptTemplate
) -> list[Trajectory]:
    """Three-turn traces played through the real agent loop, with real retrieval."""
    engine = TeacherEngine(tokenizer, {}, three_turn_writer)
    loop = AgentLoop(engine, client, CONFIG, template)
    prompts = [loop.prompt_ids(q.question) for q in questions]
    engine.set_prompts({tuple(p): q for p, q in zip(prompts, questions, strict=True)})
    return loop.run_prompt_ids(prompts, SamplingParams())


def imitate(model, traces: Sequence[Trajectory], steps: int, batch_size: int, lr: float) -> float:
    """Fine-tune on the model tokens of `traces` (prompt and inserted tokens masked out); returns the last loss."""
    rows = []
    for t in traces:
        masked = [c if m else -100 for c, m in zip(t.completion_ids, t.env_mask, strict=True)]
        rows.append((t.prompt_ids + t.completion_ids, [-100] * len(t.prompt_ids) + masked))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = random.Random(0)
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        batch = rng.sample(rows, batch_size)
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.zeros((batch_size, width), dtype=torch.long)
        labels = torch.full((batch_size, width), -100, dtype=torch.long)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for i, (ids, lab) in enumerate(batch):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(lab)] = torch.tensor(lab)
            mask[i, : len(ids)] = 1
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return loss.item()


def three_turn_policy(tokenizer, client: RetrieverClient, template: PromptTemplate, retrain: bool):
    """The imitating policy: loaded from POLICY when it was trained with TRAINING, else trained and saved."""
    recipe = POLICY / "recipe.json"
    if not retrain and recipe.is_file() and json.loads(recipe.read_text()) == TRAINING:
        return load_policy(POLICY, dtype="float32").eval()
    started = time.perf_counter()
    model = load_policy(SYNTHETIC / "warmstart", dtype="float32")
    train = read_questions(str(SYNTHETIC / "train.jsonl"), limit=TRAINING["traces"])
    traces = scripted_traces(train, tokenizer, client, template)
    loss = imitate(model, traces, TRAINING["steps"], TRAINING["batch_size"], TRAINING["lr"])
    model.save_pretrained(POLICY)
    recipe.write_text(json.dumps(TRAINING))
    print(
        f"imitation: {len(traces)} scripted traces, {TRAINING['steps']} steps of {TRAINING['batch_size']}, "
        f"last loss {loss:.3f}, {time.perf_counter() - started:.0f} s (saved to {POLICY})"
    )
    return model


@dataclass
class ForwardCounter:
    """Counts and times the model's forward passes: prefills (padded tokens) and one-token decode steps."""

    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_steps: int = 0
    decode_s: float = 0.0
    _started: float = 0.0
    _width: int = 0

    def attach(self, model) -> None:
        """Hook into every forward of `model`."""
        model.register_forward_pre_hook(self._before, with_kwargs=True)
        model.register_forward_hook(self._after, with_kwargs=True)

    def reset(self) -> None:
        """Zero every counter."""
        self.prefill_tokens = self.decode_steps = 0
        self.prefill_s = self.decode_s = 0.0

    def _before(self, module, args, kwargs) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self._width = input_ids.shape[1] if input_ids is not None else 0
        if self._width > 1:
            self.prefill_tokens += input_ids.numel()
        self._started = time.perf_counter()

    def _after(self, module, args, kwargs, output) -> None:
        elapsed = time.perf_counter() - self._started
        if self._width > 1:
            self.prefill_s += elapsed
        elif self._width == 1:
            self.decode_steps += 1
            self.decode_s += elapsed


@dataclass
class TimedEngine:
    """Wraps a `TransformersEngine`; records rows, context width and time of every `generate` call."""

    inner: TransformersEngine
    calls: list[tuple[int, int, float, int]] = field(default_factory=list)  # rows, width, s, longest

    @property
    def tokenizer(self):
        """The wrapped engine's tokenizer."""
        return self.inner.tokenizer

    @property
    def eos_ids(self) -> set[int]:
        """The wrapped engine's EOS ids."""
        return self.inner.eos_ids

    def release_cache(self) -> None:
        """Forwarded to the wrapped engine."""
        self.inner.release_cache()

    def generate(self, prompts, max_new_tokens, params, stop) -> list[Generation]:
        """Delegate and time."""
        started = time.perf_counter()
        out = self.inner.generate(prompts, max_new_tokens, params, stop)
        seconds = time.perf_counter() - started
        self.calls.append((len(prompts), max(map(len, prompts)), seconds, max(len(g.token_ids) for g in out)))
        return out


def run_loop(loop: AgentLoop, counter: ForwardCounter, questions: list[str], seed: int) -> dict:
    """(a) or (a0): one multi-turn batch; tokens, time, its split, and the shape of the work."""
    engine: TimedEngine = loop.engine  # type: ignore[assignment]
    engine.calls.clear()
    counter.reset()
    torch.manual_seed(seed)
    started = time.perf_counter()
    trajectories = loop.run(questions, SamplingParams(temperature=1.0))
    seconds = time.perf_counter() - started
    timings = loop.last_timings
    tokens = sum(t.num_model_tokens for t in trajectories)
    finish: dict[str, int] = {}
    for t in trajectories:
        finish[str(t.finish_reason)] = finish.get(str(t.finish_reason), 0) + 1
    return {
        "seconds": seconds,
        "tokens": tokens,
        "tps": tokens / seconds,
        "generation_s": timings.generation_s,
        "retrieval_s": timings.retrieval_s,
        "other_s": seconds - timings.generation_s - timings.retrieval_s,
        "turns": sum(t.num_turns for t in trajectories) / len(trajectories),
        "searches": sum(t.num_searches for t in trajectories) / len(trajectories),
        "finish": finish,
        "completion": sum(len(t.completion_ids) for t in trajectories) / len(trajectories),
        "decode_steps": counter.decode_steps,
        "decode_s": counter.decode_s,
        "prefill_tokens": counter.prefill_tokens,
        "prefill_s": counter.prefill_s,
        "documents": [
            t.completion_ids[seg.start : seg.end]
            for t in trajectories
            for seg in t.segments
            if seg.kind == "documents"
        ],
        # What the prefills would be if every turn re-read its whole context (rows × widest context).
        "full_prefill_tokens": sum(rows * width for rows, width, *_ in engine.calls),
        "calls": [(round(s, 3), longest) for _, _, s, longest in engine.calls],
        # No engine can finish in fewer decode steps than the longest trajectory has model tokens.
        "longest_row": max(t.num_model_tokens for t in trajectories),
        "lockstep_steps": sum(longest for *_, longest in engine.calls),
    }


def run_generate(
    model, counter: ForwardCounter, prompts: list[list[int]], new_tokens: int, seed: int
) -> dict:
    """(b): one batched generate with exactly `new_tokens` new tokens per row."""
    from transformers import GenerationConfig

    counter.reset()
    pad = model.generation_config.pad_token_id
    input_ids, mask = left_padded(prompts, pad)
    width = input_ids.shape[1]
    config = GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=None,
        pad_token_id=pad,
        eos_token_id=model.generation_config.eos_token_id,
        use_cache=True,
    )
    torch.manual_seed(seed)
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
    seconds = time.perf_counter() - started
    if out.shape[1] - width != new_tokens:
        raise RuntimeError(f"generate produced {out.shape[1] - width} tokens per row, not {new_tokens}")
    tokens = new_tokens * len(prompts)
    return {
        "seconds": seconds,
        "tokens": tokens,
        "tps": tokens / seconds,
        "decode_steps": counter.decode_steps,
        "decode_s": counter.decode_s,
        "prefill_tokens": counter.prefill_tokens,
        "prefill_s": counter.prefill_s,
    }


def prefill_documents(model, counter: ForwardCounter, blocks: list[list[int]], batch: int) -> dict:
    """(d): only the documents (a) inserted, prefilled `batch` blocks at a time with no context before them."""
    counter.reset()
    pad = model.generation_config.pad_token_id
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(blocks), batch):
            input_ids, mask = left_padded(blocks[start : start + batch], pad)
            model(input_ids=input_ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
    return {"seconds": time.perf_counter() - started, "prefill_tokens": counter.prefill_tokens}


def report(rounds: list[dict], batch: int) -> None:
    """Medians table, ratios and the split of (a)'s time."""
    a, a0, b = ([r[k] for r in rounds] for k in ("a", "a0", "b"))

    def med(runs: list[dict], key: str) -> float:
        return median([r[key] for r in runs])

    print(
        "\n| | model tokens / row | wall s | tokens/s | decode steps | decode s | prefill tokens (padded) "
        "| prefill s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, runs in (
        ("(a) `AgentLoop.run`, 3 turns", a),
        ("(a0) same, `reuse_cache=False`", a0),
        ("(b) one `generate()`, same tokens", b),
    ):
        print(
            f"| {label} | {med(runs, 'tokens') / batch:.1f} | {med(runs, 'seconds'):.3f} | "
            f"{med(runs, 'tps'):.0f} | {med(runs, 'decode_steps'):.0f} | {med(runs, 'decode_s'):.3f} | "
            f"{med(runs, 'prefill_tokens'):.0f} | {med(runs, 'prefill_s'):.3f} |"
        )
    d = [r["d"] for r in rounds]
    print(
        f"| (d) (a)'s documents alone, prefilled | | {med(d, 'seconds'):.3f} | | | | {med(d, 'prefill_tokens'):.0f} | |"
    )
    for label, runs in (("(a)/(b)", a), ("(a0)/(b)", a0)):
        ratios = [x["tps"] / y["tps"] for x, y in zip(runs, b, strict=True)]
        print(f"ratio {label}: median {median(ratios):.2f} (rounds: {', '.join(f'{x:.2f}' for x in ratios)})")
    ceiling = [y["seconds"] / (y["seconds"] + z["seconds"]) for y, z in zip(b, d, strict=True)]
    print(
        f"ceiling (b)/((b)+(d)), any engine that must also prefill the documents: median {median(ceiling):.2f}"
    )
    # ... and decode as many steps as the longest trajectory has model tokens, at (b)'s cost per step.
    bound = [
        y["seconds"] / (y["seconds"] * x["longest_row"] / (y["decode_steps"] + 1) + z["seconds"])
        for x, y, z in zip(a, b, d, strict=True)
    ]
    print(f"ceiling with (a)'s longest trajectory as the critical path: median {median(bound):.2f}")
    print(
        f"(a): turns {med(a, 'turns'):.2f}, searches {med(a, 'searches'):.2f}, completion tokens with "
        f"documents {med(a, 'completion'):.1f}, re-prefill avoided: {med(a, 'full_prefill_tokens'):.0f} "
        f"padded context tokens → {med(a, 'prefill_tokens'):.0f}"
    )
    print(f"(a) finish reasons per round: {[r['finish'] for r in a]}")
    for run in a:
        run["engine_other_s"] = run["generation_s"] - run["prefill_s"] - run["decode_s"]
    for key in ("generation_s", "prefill_s", "decode_s", "engine_other_s", "retrieval_s", "other_s"):
        share = median([r[key] / r["seconds"] for r in a])
        print(f"(a) {key}: median {med(a, key):.3f} s ({100 * share:.1f}% of the loop)")
    print(
        f"(a) decode steps: {med(a, 'lockstep_steps'):.0f} (sum over turns of the turn's longest generation); "
        f"the longest trajectory alone has {med(a, 'longest_row'):.0f} model tokens, (b) {med(b, 'decode_steps') + 1:.0f}"
    )
    print(
        f"(a) per generate call (turn 1, 2, 3), per round: (seconds, longest generation) {[r['calls'] for r in a]}"
    )


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--retrain", action="store_true", help="train the imitating policy even if cached")
    args = parse_with_threads(parser)

    tokenizer = load_tokenizer(SYNTHETIC / "tokenizer")
    template = PromptTemplate.load(SYNTHETIC / "template.txt")
    questions = [q.question for q in read_questions(str(SYNTHETIC / "heldout.jsonl"), limit=args.batch)]
    print(f"load average before: {load_average()}; {settings()}")
    with running_retriever(ensure_index()) as url, RetrieverClient(url) as client:
        model = three_turn_policy(tokenizer, client, template, args.retrain)
        counter = ForwardCounter()
        counter.attach(model)
        loops = {
            "a": AgentLoop(TimedEngine(TransformersEngine(model, tokenizer)), client, CONFIG, template),
            "a0": AgentLoop(
                TimedEngine(TransformersEngine(model, tokenizer, reuse_cache=False)), client, CONFIG, template
            ),
        }
        prompts = [loops["a"].prompt_ids(q) for q in questions]
        for loop in loops.values():  # warm-up: allocator, thread pools, HTTP connection
            run_loop(loop, counter, questions, seed=-1)
        rounds = []
        for r in range(args.rounds):
            # Same seed for (a) and (a0): the same samples up to float rounding, so the same work.
            order = ["a", "a0"] if r % 2 == 0 else ["a0", "a"]
            result = {key: run_loop(loops[key], counter, questions, seed=r) for key in order}
            new_tokens = round(result["a"]["tokens"] / len(questions))
            result["b"] = run_generate(model, counter, prompts, new_tokens, seed=r)
            result["d"] = prefill_documents(model, counter, result["a"]["documents"], len(questions))
            rounds.append(result)
            a, a0, b = result["a"], result["a0"], result["b"]
            print(
                f"round {r}: (a) {a['tokens']} tok {a['seconds']:.3f} s, turns {a['turns']:.2f}, searches "
                f"{a['searches']:.2f} | (a0) {a0['seconds']:.3f} s | (b) {b['tokens']} tok {b['seconds']:.3f} s"
                f" | (a)/(b) {a['tps'] / b['tps']:.2f}, (a0)/(b) {a0['tps'] / b['tps']:.2f}"
            )
    report(rounds, len(questions))
    print(f"load average after: {load_average()}; {settings()}")


if __name__ == "__main__":
    main()
