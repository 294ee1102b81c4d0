"""`accelerate launch` with 2 CPU processes: the tiny-cpu preset trains, groups stay whole, metrics are global."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections import Counter, defaultdict

import pytest

from tests.helpers import REPO_ROOT, launch_grpo_2proc


def train_grpo_on_two_processes(port: int, *overrides: str) -> subprocess.CompletedProcess[str]:
    """`autorefine train-grpo` on the tiny-cpu preset over 2 gloo processes (cpu_2proc.yaml)."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO_ROOT / "configs/accelerate/cpu_2proc.yaml"),
        "--main_process_port", str(port),
        "-m", "autorefine.cli", "train-grpo",
        "--config", str(REPO_ROOT / "configs/grpo/tiny-cpu.yaml"),
        *overrides,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=900)


@pytest.mark.slow
def test_two_cpu_processes_train_with_whole_groups(synthetic_bm25_server, tmp_path, free_port):
    out = tmp_path / "run"
    result = train_grpo_on_two_processes(
        free_port(),
        f"retriever.url={synthetic_bm25_server}",
        f"trainer.output_dir={out}",
        "trainer.max_steps=2",
        "trainer.per_device_train_batch_size=16",  # 2 × 16 = 32 trajectories = 4 questions × 8 per step
        "trainer.save_strategy=steps",
        "trainer.save_steps=2",
        "trainer.report_to=[]",
        "heldout.every=0",
        "logging.sample_table_every=0",
        "logging.save_rollouts=true",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]

    rows = [
        json.loads(line)
        for rank in (0, 1)
        for line in (out / "rollouts" / f"rank-{rank}.jsonl").read_text().splitlines()
    ]
    assert {r["rank"] for r in rows} == {0, 1}, "both processes ran rollouts"
    by_step: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        by_step[r["step"]].append(r)
    assert sorted(by_step) == [1, 2]

    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    logged = {h["step"]: h for h in state["log_history"] if "reward" in h}
    for step, step_rows in by_step.items():
        # every question of the step has its whole group of 8 samples, across the two ranks
        assert set(Counter(r["id"] for r in step_rows).values()) == {8}
        assert len(step_rows) == 32
        # the logged reward is the mean over both ranks, not one rank's own
        assert logged[step]["reward"] == pytest.approx(
            statistics.mean(r["reward"] for r in step_rows), abs=1e-4
        )
    assert (out / "final" / "model.safetensors").is_file()


# --- lockstep generation, shared failures and vLLM modes over 2 gloo processes (tests/launch_grpo.py) ---------


@pytest.mark.slow
def test_heldout_evaluation_with_uneven_shards_gives_both_ranks_the_same_metrics(
    synthetic_bm25_server, tmp_path, free_port
):
    # 3 questions in batches of 1: rank 0 evaluates 2, rank 1 evaluates 1 and then an empty batch, whose turns
    # it takes without prompts while rank 0 is still generating
    status, reports, stderr = launch_grpo_2proc(
        tmp_path, free_port(), f"retriever.url={synthetic_bm25_server}", "trainer.max_steps=2",
        "heldout.every=1", "heldout.limit=3", "heldout.batch_size=1", "heldout.save_best=true",
    )  # fmt: skip
    assert status == 0, stderr[-4000:]
    assert [r["rank"] for r in reports] == [0, 1]
    assert reports[0]["heldout"] == reports[1]["heldout"]
    assert [h["step"] for h in reports[0]["heldout"]] == [0, 1, 2]
    assert all(h["count"] == 3 for h in reports[0]["heldout"])
    assert reports[1]["calls_without_prompts"] > 0 and reports[0]["calls_without_prompts"] == 0
    assert (tmp_path / "run" / "best" / "heldout_best.json").is_file()


@pytest.mark.slow
def test_a_retriever_lost_on_one_rank_stops_both_with_a_checkpoint(
    synthetic_bm25_server, tmp_path, free_port
):
    status, reports, stderr = launch_grpo_2proc(
        tmp_path, free_port(), f"retriever.url={synthetic_bm25_server}", "trainer.max_steps=3",
        "heldout.every=0", flags=("--fail-search-on-rank", "1", "--fail-at-search", "2"),
    )  # fmt: skip
    assert status != 0
    assert stderr.count("Restart the retriever, then resume with:") == 2  # one line per rank, no hang
    checkpoint = tmp_path / "run" / "checkpoint-1"
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "trainer_state.json").is_file()
    for report in reports:  # both ranks stopped at the same step, with the same instructions
        assert report["global_step"] == 1
        assert f"resume with: autorefine train-grpo --resume {checkpoint}" in report["error"]
        assert "unreachable" in report["error"]


@pytest.mark.slow
def test_a_retriever_refusing_the_key_mid_run_stops_both_with_a_checkpoint(
    synthetic_bm25_server, tmp_path, free_port
):
    from tests.helpers import RefusingProxy

    # from the 5th search on (each step, each rank searches once or twice) the retriever answers 401
    with RefusingProxy(synthetic_bm25_server, allow=4) as proxy:
        status, reports, stderr = launch_grpo_2proc(
            tmp_path, free_port(), f"retriever.url={proxy.url}", "trainer.max_steps=3", "heldout.every=0"
        )
    assert status != 0
    assert proxy.refused >= 1
    assert stderr.count("then resume with:") == 2, stderr[-4000:]  # one line per rank, no hang
    [step] = {r["global_step"] for r in reports}  # both ranks stopped at the same step
    checkpoint = tmp_path / "run" / f"checkpoint-{step}"
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "trainer_state.json").is_file()
    for report in reports:  # with the same reason and instructions
        assert f"{proxy.url}/retrieve rejected the request (401)" in report["error"]
        assert "The retriever refused access (HTTP 401)" in report["error"]
        assert f"resume with: autorefine train-grpo --resume {checkpoint}" in report["error"]


@pytest.mark.slow
def test_an_engine_failure_on_one_rank_stops_both_with_a_checkpoint(
    synthetic_bm25_server, tmp_path, free_port
):
    status, reports, stderr = launch_grpo_2proc(
        tmp_path, free_port(), f"retriever.url={synthetic_bm25_server}", "trainer.max_steps=3",
        "heldout.every=0", flags=("--fail-generate-on-rank", "1", "--fail-generate-after-step", "1"),
    )  # fmt: skip
    assert status != 0
    assert stderr.count("then resume with:") == 2, stderr[-4000:]  # one line per rank, no hang
    checkpoint = tmp_path / "run" / "checkpoint-1"
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "trainer_state.json").is_file()
    for report in reports:  # both ranks stopped at the same step, with the same reason and instructions
        assert report["global_step"] == 1
        assert (
            "the generation engine failed: RuntimeError: Request failed: 400, injected engine failure on rank 1"
            in (report["error"])
        )
        assert f"resume with: autorefine train-grpo --resume {checkpoint}" in report["error"]


@pytest.mark.slow
def test_colocated_vllm_with_tensor_parallel_2_generates_in_lockstep(
    synthetic_bm25_server, tmp_path, free_port
):
    # the fake vllm.LLM checks, with a collective over its TP group, that both ranks send the same requests
    status, reports, stderr = launch_grpo_2proc(
        tmp_path, free_port(), f"retriever.url={synthetic_bm25_server}", "trainer.max_steps=1",
        "trainer.use_vllm=true", "trainer.vllm_mode=colocate", "trainer.vllm_tensor_parallel_size=2",
        "heldout.every=1", "heldout.limit=3", "heldout.batch_size=1",
        flags=("--fake-vllm",),
    )  # fmt: skip
    assert status == 0, stderr[-4000:]
    assert reports[0]["vllm_calls"] == reports[1]["vllm_calls"]
    assert 16 in reports[0]["vllm_calls"]  # a training turn: both ranks' 8 trajectories in one call
    assert reports[0]["heldout"] == reports[1]["heldout"] and len(reports[0]["heldout"]) == 2


@pytest.mark.slow
def test_vllm_server_mode_waits_for_the_weight_push_on_every_rank(synthetic_bm25_server, tmp_path, free_port):
    from tests.fake_vllm import FakeVLLMServer

    # a slow push: a rank that does not wait for rank 0 sends its first requests mid-update or to old weights
    with FakeVLLMServer(str(REPO_ROOT / "data/synthetic/warmstart"), free_port(), push_delay_s=1.5) as server:
        status, reports, stderr = launch_grpo_2proc(
            tmp_path, free_port(), f"retriever.url={synthetic_bm25_server}", "trainer.max_steps=2",
            "heldout.every=0", "trainer.use_vllm=true", "trainer.vllm_mode=server",
            f"trainer.vllm_server_base_url={server.url}", flags=("--fake-vllm",),
        )  # fmt: skip
    assert status == 0, stderr[-4000:]
    assert len(reports) == 2 and server.updates == 2
    assert {r["rank"] for r in server.requests} == {"0", "1"}
    assert not [r for r in server.requests if r["updating"]], "a request reached the server mid-update"
    # requests of step N come after push N: versions only grow, and none saw the initial weights
    versions = [r["version"] for r in server.requests]
    assert versions == sorted(versions) and min(versions) == 1


@pytest.mark.slow
def test_two_processes_average_health_and_take_the_same_guard_decisions(
    synthetic_bm25_server, tmp_path, free_port
):
    """Health signals are means over both ranks; a rollback and then a stop happen on both, without deadlock."""
    out = tmp_path / "run"
    result = train_grpo_on_two_processes(
        free_port(),
        f"retriever.url={synthetic_bm25_server}",
        f"trainer.output_dir={out}",
        "trainer.max_steps=3",
        "trainer.per_device_train_batch_size=16",
        "trainer.save_strategy=no",
        "trainer.report_to=[]",
        "heldout.every=1",
        "heldout.limit=16",
        "heldout.save_best=true",
        "guard.heldout_drop.action=off",
        "logging.sample_table_every=0",
        "logging.save_rollouts=true",
        # fires at every step: step 1 rolls back, step 2 has no rollback left and stops the run
        "guard.entropy_floor.signal=rollout/turns", "guard.entropy_floor.test=above",
        "guard.entropy_floor.threshold=0", "guard.entropy_floor.patience=1",
        "guard.entropy_floor.action=rollback", "guard.max_rollbacks=1",
    )  # fmt: skip
    # each rank exits with the CLI's error status 2; the launcher reports the failure as its own status
    assert result.returncode != 0 and "(exitcode: 2)" in result.stderr, result.stderr[-4000:]
    assert "the guard stopped training: step 2: rollout/turns" in result.stderr
    assert (out / "checkpoint-2" / "model.safetensors").is_file()

    events = [json.loads(line) for line in (out / "guard.jsonl").read_text().splitlines()]
    assert [(e["step"], "rule" in e, e.get("rollback")) for e in events] == [
        (1, True, None), (1, False, 1), (2, True, None),
    ]  # fmt: skip
    rows = [
        json.loads(line)
        for rank in (0, 1)
        for line in (out / "rollouts" / f"rank-{rank}.jsonl").read_text().splitlines()
    ]
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    logged = {h["step"]: h for h in state["log_history"] if "loss" in h}
    for step in (1, 2):
        step_rows = [r for r in rows if r["step"] == step]
        assert {r["rank"] for r in step_rows} == {0, 1} and len(step_rows) == 32
        model_tokens = statistics.mean(sum(r["env_mask"]) for r in step_rows)
        assert logged[step]["rollout/model_tokens"] == pytest.approx(model_tokens, abs=1e-3)
        searches = statistics.mean(r["searches"] for r in step_rows)
        assert logged[step]["health/searches/synthetic"] == pytest.approx(searches, abs=1e-4)
