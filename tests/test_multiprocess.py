"""`accelerate launch` with 2 CPU processes: the tiny-cpu preset trains, groups stay whole, metrics are global."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections import Counter, defaultdict

import pytest

from tests.paths import REPO_ROOT


@pytest.mark.slow
def test_two_cpu_processes_train_with_whole_groups(synthetic_bm25_server, tmp_path, free_port):
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO_ROOT / "configs/accelerate/cpu_2proc.yaml"),
        "--main_process_port", str(free_port()),
        "-m", "autorefine.cli", "train-grpo",
        "--config", str(REPO_ROOT / "configs/grpo/tiny-cpu.yaml"),
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
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=900)
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


@pytest.mark.slow
def test_two_processes_average_health_and_take_the_same_guard_decisions(
    synthetic_bm25_server, tmp_path, free_port
):
    """Health signals are means over both ranks; a rollback and then a stop happen on both, without deadlock."""
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO_ROOT / "configs/accelerate/cpu_2proc.yaml"),
        "--main_process_port", str(free_port()),
        "-m", "autorefine.cli", "train-grpo",
        "--config", str(REPO_ROOT / "configs/grpo/tiny-cpu.yaml"),
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
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=900)
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
