"""Lockstep generation across processes (2 real gloo processes): no hang with uneven work, failures shared.

The FSDP2 test shards the warm-start policy with torch's `fully_shard`, so every forward pass all-gathers
weights across the two processes: a process that skipped a turn, or a batch, would leave the other waiting.
(accelerate cannot run FSDP on CPU processes: with `use_cpu` it silently falls back to DDP over gloo, and
without it no distributed type is chosen at all; so this test shards the model itself.)
"""

from __future__ import annotations

import datetime
import json
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from autorefine.data import read_questions
from autorefine.rollout import AgentLoop, RolloutSettings
from tests.helpers import QWEN_TOKENIZER, SYNTHETIC_DIR, ScriptedEngine, Turn

WORLD = 2


def _spawn(target, tmp_path: Path, *args) -> list[dict]:
    """Run `target(rank, port, out_dir, *args)` in 2 gloo processes; each writes rank-R.json."""
    from testbed.retriever import free_port

    mp.spawn(target, args=(free_port(), str(tmp_path), *args), nprocs=WORLD, join=True)
    return [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(WORLD)]


def _init(rank: int, port: int, timeout_s: float = 120) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=timeout_s),  # a hang fails the test instead of blocking CI
    )


class RankSearcher:
    """Documents for every query, except on `fail_rank`, where the server is gone."""

    def __init__(self, rank: int, fail_rank: int) -> None:
        self.rank, self.fail_rank = rank, fail_rank

    def search(self, queries, topk=3):
        from autorefine.protocol import Document
        from autorefine.retrieval import RetrieverUnavailableError

        if self.rank == self.fail_rank:
            raise RetrieverUnavailableError("retriever at http://127.0.0.1:1 unreachable (rank-local outage)")
        return [[Document("d1", "Title\nsome text")] for _ in queries]


def _failure_worker(rank: int, port: int, out: str) -> None:
    from autorefine.modeling import load_tokenizer
    from autorefine.retrieval import RetrieverUnavailableError
    from autorefine.rollout import SamplingParams
    from autorefine.rollout.lockstep import Lockstep

    _init(rank, port)
    tokenizer = load_tokenizer(QWEN_TOKENIZER)
    config = RolloutSettings(max_turns=2, max_new_tokens=16, max_completion_tokens=300)
    prompt = tuple(AgentLoop(ScriptedEngine(tokenizer, {}), None, config).prompt_ids("q"))
    # rank 0 answers at once, rank 1 searches first (and its retriever is down): uneven turns, one failure
    turns = [Turn("<answer> a </answer>")] if rank == 0 else [Turn("<search> q </search>"), Turn("x")]
    engine = ScriptedEngine(tokenizer, {prompt: turns})
    engine.lockstep = Lockstep()
    loop = AgentLoop(engine, RankSearcher(rank, fail_rank=1), config)
    result: dict = {"rank": rank}
    try:
        loop.run_prompt_ids([list(prompt)], SamplingParams())
    except RetrieverUnavailableError as err:
        result["error"] = type(err).__name__
        result["message"] = str(err)
        result["notes"] = getattr(err, "__notes__", [])
    except Exception:  # anything else is a test failure, reported by the parent
        result["unexpected"] = traceback.format_exc()
    result["calls"] = engine.calls[prompt]
    Path(out, f"rank-{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def test_a_retriever_failure_on_one_rank_is_raised_on_every_rank(tmp_path):
    reports = _spawn(_failure_worker, tmp_path)
    for report in reports:
        assert "unexpected" not in report, report.get("unexpected")
        assert report["error"] == "RetrieverUnavailableError"
        assert "rank-local outage" in report["message"]
    assert reports[0]["notes"] == ["(raised on rank 1; rank 0 stopped with it)"]
    assert reports[1]["notes"] == []  # the failing rank raises its own exception


def _engine_failure_worker(rank: int, port: int, out: str) -> None:
    from autorefine.modeling import load_tokenizer
    from autorefine.rollout import GenerationError, SamplingParams
    from autorefine.rollout.lockstep import Lockstep

    _init(rank, port, timeout_s=30)  # a rank left waiting fails within 30 s instead of hanging
    tokenizer = load_tokenizer(QWEN_TOKENIZER)
    config = RolloutSettings(max_turns=2, max_new_tokens=16, max_completion_tokens=300)
    prompt = tuple(AgentLoop(ScriptedEngine(tokenizer, {}), None, config).prompt_ids("q"))
    # rank 0 searches, then answers; rank 1's engine raises in its first turn (a vLLM server's HTTP 400)
    turns = [Turn("<search> q </search>"), Turn("<answer> a </answer>")]
    engine = ScriptedEngine(tokenizer, {prompt: turns})
    engine.lockstep = Lockstep()
    if rank == 1:

        def broken(*args):
            raise RuntimeError("Request failed: 400, rank-local engine error")

        engine.generate = broken
    loop = AgentLoop(engine, RankSearcher(rank, fail_rank=-1), config)
    result: dict = {"rank": rank}
    try:
        loop.run_prompt_ids([list(prompt)], SamplingParams())
    except GenerationError as err:
        result["error"] = type(err).__name__
        result["message"] = str(err)
        result["notes"] = getattr(err, "__notes__", [])
        result["cause"] = type(err.__cause__).__name__ if err.__cause__ else None
    except Exception:  # anything else (a peer gone, a collective timed out) is a test failure
        result["unexpected"] = traceback.format_exc()
    Path(out, f"rank-{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_an_engine_failure_on_one_rank_is_raised_on_every_rank(tmp_path):
    reports = _spawn(_engine_failure_worker, tmp_path)
    for report in reports:
        assert "unexpected" not in report, report.get("unexpected")
        assert report["error"] == "GenerationError"
    message = "the generation engine failed: RuntimeError: Request failed: 400, rank-local engine error"
    assert reports[0]["message"] == reports[1]["message"] == message
    assert reports[0]["notes"] == ["(raised on rank 1; rank 0 stopped with it)"]
    assert reports[1]["cause"] == "RuntimeError"  # the failing rank keeps the engine's own exception


def _fsdp_worker(rank: int, port: int, out: str, url: str, limit: int, batch_size: int) -> None:
    from torch.distributed.fsdp import fully_shard

    from autorefine.evaluation.runner import predict_shard
    from autorefine.modeling import load_policy, load_tokenizer
    from autorefine.protocol import PromptTemplate
    from autorefine.retrieval import RetrieverClient
    from autorefine.rollout.hf_engine import TransformersEngine
    from autorefine.rollout.lockstep import Lockstep

    _init(rank, port)
    result: dict = {"rank": rank}
    try:
        model = load_policy(SYNTHETIC_DIR / "warmstart", dtype="float32").eval()
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        engine = TransformersEngine(
            model, load_tokenizer(SYNTHETIC_DIR / "warmstart"), synced_gpus=True, lockstep=Lockstep()
        )
        calls = {"with_prompts": 0, "without": 0}
        generate = engine.generate

        def counting(prompts, *rest):
            calls["with_prompts" if prompts else "without"] += 1
            return generate(prompts, *rest)

        engine.generate = counting
        config = RolloutSettings(
            max_turns=2, max_new_tokens=48, max_obs_tokens=160, max_completion_tokens=320
        )
        questions = read_questions(SYNTHETIC_DIR / "heldout.jsonl", limit=limit)
        with RetrieverClient(url) as client:
            loop = AgentLoop(engine, client, config, PromptTemplate.load(SYNTHETIC_DIR / "template.txt"))
            predictions = predict_shard(loop, questions, rank=rank, world_size=WORLD, batch_size=batch_size)
        result["answers"] = {p.id: p.prediction for p in predictions}
        result["turns"] = {p.id: p.trajectory["num_turns"] for p in predictions}
        result["calls"] = calls
    except Exception:
        result["unexpected"] = traceback.format_exc()
    Path(out, f"rank-{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_sharded_policy_generates_in_lockstep_with_uneven_shards(synthetic_bm25_server, tmp_path):
    """3 held-out questions over 2 processes in batches of 1: rank 1 runs an empty batch while rank 0 works."""
    from autorefine.evaluation.runner import predict
    from autorefine.modeling import load_policy, load_tokenizer
    from autorefine.protocol import PromptTemplate
    from autorefine.retrieval import RetrieverClient
    from autorefine.rollout.hf_engine import TransformersEngine

    reports = _spawn(_fsdp_worker, tmp_path, synthetic_bm25_server, 3, 1)
    for report in reports:
        assert "unexpected" not in report, report.get("unexpected")
    assert len(reports[0]["answers"]) == 2 and len(reports[1]["answers"]) == 1
    # rank 1's padded empty batch: it called the engine without prompts while rank 0 still had turns
    assert reports[1]["calls"]["without"] >= 2
    assert reports[0]["calls"]["without"] == 0

    # the sharded, lockstep answers are those of one unsharded process
    config = RolloutSettings(max_turns=2, max_new_tokens=48, max_obs_tokens=160, max_completion_tokens=320)
    model = load_policy(SYNTHETIC_DIR / "warmstart", dtype="float32").eval()
    engine = TransformersEngine(model, load_tokenizer(SYNTHETIC_DIR / "warmstart"))
    with RetrieverClient(synthetic_bm25_server) as client:
        loop = AgentLoop(engine, client, config, PromptTemplate.load(SYNTHETIC_DIR / "template.txt"))
        alone = {
            p.id: p.prediction
            for p in predict(loop, read_questions(SYNTHETIC_DIR / "heldout.jsonl", limit=3), batch_size=1)
        }
    assert {**reports[0]["answers"], **reports[1]["answers"]} == alone
