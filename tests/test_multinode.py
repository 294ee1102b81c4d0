"""Two machines on this host: accelerate's multi-node launch (configs/accelerate/cpu_2machines.yaml, machine_rank
0 and 1, main address 127.0.0.1, one gloo process each), started as a cluster starts it, once per node.

GRPO with held-out evaluation and a resume, through scripts/train_grpo.sh, gives what two processes on one
machine give on the same seed; a node that loses its own retriever replica goes on with the other's, losing no
question; an IP-DPO round runs through scripts/train_ipdpo.sh; a node that does not see the output folder, or
cannot reach the retriever, stops both nodes at start with the reason. What only a real cluster shows (GPUs,
NCCL between hosts, a network filesystem, vLLM) is listed in the README ("More than one node").
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import REPO_ROOT

MACHINES = "configs/accelerate/cpu_2machines.yaml"
ONE_MACHINE = "configs/accelerate/cpu_2proc.yaml"
GRPO = "configs/grpo/tiny-cpu.yaml"
IPDPO = "configs/ipdpo/tiny-cpu.yaml"
NODE_TIMEOUT_S = 600


def grpo_overrides(url: str, out: Path, steps: int) -> list[str]:
    """The tiny preset at test size: 4 questions × 8 samples per step, held-out evaluation every step."""
    return [
        f"retriever.url={url}",
        f"trainer.output_dir={out}",
        f"trainer.max_steps={steps}",
        "trainer.per_device_train_batch_size=16",  # 2 processes × 16 = 4 questions × 8 samples
        "trainer.save_strategy=steps",
        "trainer.save_steps=2",
        "trainer.seed=3",
        "trainer.report_to=[]",
        "heldout.every=1",
        "heldout.limit=4",
        "heldout.batch_size=2",
        "logging.sample_table_every=0",
        "logging.save_rollouts=true",
    ]


def environment() -> dict[str, str]:
    """This interpreter's `accelerate` first on PATH; one thread per process (two cores, two processes)."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return {**os.environ, "PATH": path, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}


def run_nodes(commands: list[list[str]], logs: Path) -> list[tuple[int, str]]:
    """Start one command per node at once; wait for all (each killed with its children past the timeout);
    each node's exit status and output."""
    logs.mkdir(parents=True, exist_ok=True)
    processes = []
    for rank, command in enumerate(commands):
        with (logs / f"node-{rank}.log").open("wb") as log:
            processes.append(
                subprocess.Popen(
                    command, cwd=REPO_ROOT, env=environment(), stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group: a timeout kills the launcher's children too
                )
            )  # fmt: skip
    deadline = time.monotonic() + NODE_TIMEOUT_S
    try:
        for process in processes:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    return [
        (p.returncode, (logs / f"node-{r}.log").read_text("utf-8", "replace"))
        for r, p in enumerate(processes)
    ]


def launcher(method: str, port: int, preset: str, *args: str, rank: int) -> list[str]:
    """scripts/train_<method>.sh on node `rank` of two, the main node at 127.0.0.1:`port`."""
    return [
        "bash", str(REPO_ROOT / "scripts" / f"train_{method}.sh"), "--accelerate-config", MACHINES,
        "--nodes", "2", "--node-rank", str(rank), "--main-address", "127.0.0.1", "--main-port", str(port),
        preset, *args,
    ]  # fmt: skip


def assert_succeeded(results: list[tuple[int, str]]) -> None:
    for rank, (status, output) in enumerate(results):
        assert status == 0, f"node {rank} exited with {status}:\n{output[-4000:]}"


# --- what the runs leave behind, to compare ------------------------------------------------------------------


def rewards(run: Path) -> dict[int, float]:
    state = json.loads((run / "trainer_state.json").read_text())
    return {h["step"]: h["reward"] for h in state["log_history"] if "reward" in h}


def heldout(run: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run / "heldout.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def rollouts(run: Path) -> dict[tuple[int, int], list[tuple[str, list[int]]]]:
    """Each (step, rank)'s trajectories: question id and the exact sampled ids."""
    out: dict[tuple[int, int], list[tuple[str, list[int]]]] = {}
    for rank in (0, 1):
        for line in (run / "rollouts" / f"rank-{rank}.jsonl").read_text().splitlines():
            row = json.loads(line)
            out.setdefault((row["step"], row["rank"]), []).append((row["id"], row["completion_ids"]))
    return out


def final_weights(run: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(run / "final" / "model.safetensors"))


def assert_same_training(run: Path, reference: Path) -> None:
    """Same rollouts, rewards, held-out evaluations, best policy and final weights."""
    import torch

    assert rollouts(run) == rollouts(reference)
    assert rewards(run) == pytest.approx(rewards(reference), abs=1e-6) and sorted(rewards(run)) == [1, 2, 3]
    assert len(heldout(run)) == 4 and all(
        a == pytest.approx(b) for a, b in zip(heldout(run), heldout(reference), strict=True)
    )
    assert (run / "best" / "heldout_best.json").read_text() == (
        reference / "best" / "heldout_best.json"
    ).read_text()
    ours, theirs = final_weights(run), final_weights(reference)
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert torch.allclose(tensor, theirs[name], atol=1e-6), name


@pytest.fixture(scope="module")
def one_machine_run(synthetic_bm25_server, tmp_path_factory, free_port) -> Path:
    """The reference: 3 uninterrupted GRPO steps on two processes of one machine (cpu_2proc.yaml)."""
    out = tmp_path_factory.mktemp("one-machine") / "run"
    command = [
        "bash", str(REPO_ROOT / "scripts/train_grpo.sh"), "--accelerate-config", ONE_MACHINE,
        "--main-port", str(free_port()), GRPO, *grpo_overrides(synthetic_bm25_server, out, 3),
    ]  # fmt: skip
    assert_succeeded(run_nodes([command], out.parent / "logs"))
    return out


# --- the tests ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_machines_train_resume_and_match_two_processes_on_one_machine(
    synthetic_bm25_server, one_machine_run, tmp_path, free_port
):
    out = tmp_path / "run"
    port = free_port()
    first = run_nodes(
        [
            launcher("grpo", port, GRPO, *grpo_overrides(synthetic_bm25_server, out, 2), rank=r)
            for r in (0, 1)
        ],
        tmp_path / "logs-1",
    )
    assert_succeeded(first)
    assert f"launch_training.sh: node 1 of 2, 1 processes here, main 127.0.0.1:{port}" in first[1][1]
    # one checkpoint, written once into the shared folder, with each process' RNG state for the resume
    checkpoint = out / "checkpoint-2"
    assert (checkpoint / "model.safetensors").is_file()
    assert (checkpoint / "rng_state_0.pth").is_file() and (checkpoint / "rng_state_1.pth").is_file()
    # stopped after step 2; both nodes resume from the checkpoint the main node names, to step 3
    port = free_port()
    resumed = run_nodes(
        [launcher("grpo", port, GRPO, "--resume", "latest", *grpo_overrides(synthetic_bm25_server, out, 3), rank=r)
         for r in (0, 1)],
        tmp_path / "logs-2",
    )  # fmt: skip
    assert_succeeded(resumed)
    assert_same_training(out, one_machine_run)


@pytest.mark.slow
def test_a_node_that_loses_its_retriever_goes_on_with_the_other_nodes_without_losing_a_question(
    start_retriever, synthetic_bm25_index, one_machine_run, tmp_path, free_port
):
    out, report = tmp_path / "run", tmp_path / "report"
    port = free_port()
    with (
        start_retriever(synthetic_bm25_index) as (a, _),
        start_retriever(synthetic_bm25_index) as (b, server_b),
    ):
        # each node's own replica first: node 0's is a, node 1's is b; b dies once it has served a few requests
        killer = threading.Thread(target=kill_after_requests, args=(b, server_b, 4), daemon=True)
        killer.start()
        commands = [
            [
                sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO_ROOT / MACHINES),
                "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
                str(REPO_ROOT / "tests/launch_grpo.py"), "--report", str(report), "--",
                *grpo_overrides(f"{a},{b}", out, 3), f"retriever.local_url={local}", "retriever.probe_interval_s=0.5",
            ]
            for rank, local in enumerate([a, b])
        ]  # fmt: skip
        results = run_nodes(commands, tmp_path / "logs")
        killer.join(timeout=5)
        assert server_b.poll() is not None, "replica b was not lost during the run"
    assert_succeeded(results)
    stats = {r: json.loads((report / f"rank-{r}.json").read_text())["retriever"] for r in (0, 1)}
    replicas = {r: {x["url"]: x for x in stats[r]["replicas"]} for r in (0, 1)}
    assert replicas[0][a]["local"] and replicas[0][b]["requests"] == 0, (
        "node 0 only ever asked its own replica"
    )
    assert replicas[1][b]["local"] and replicas[1][b]["requests"] >= 1 and not replicas[1][b]["healthy"]
    assert replicas[1][a]["requests"] >= 1 and stats[1]["retried"] >= 1, (
        "node 1 went on with node 0's replica"
    )
    # no question lost: the same trajectories, rewards, evaluations and weights as the run that lost nothing
    assert_same_training(out, one_machine_run)


def kill_after_requests(url: str, process: subprocess.Popen[bytes], requests: int) -> None:
    """Kill the retriever at `url` once it has answered `requests` searches (polls its /stats)."""
    deadline = time.monotonic() + NODE_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/stats", timeout=2.0).json()["retrieve_requests"] >= requests:
                process.kill()
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)


@pytest.mark.slow
def test_two_machines_run_an_ipdpo_round(synthetic_bm25_server, tmp_path, free_port):
    out = tmp_path / "run"
    overrides = [
        f"retriever.url={synthetic_bm25_server}", f"trainer.output_dir={out}", "rounds=1",
        "sampling.questions_per_round=7", "sampling.samples_per_question=4", "sampling.batch_questions=2",
        "heldout.limit=9", "pairs.min_pairs=1", "logging.pair_accuracy_pairs=4",
        "trainer.per_device_train_batch_size=2", "trainer.logging_steps=1",
    ]  # fmt: skip
    port = free_port()
    assert_succeeded(
        run_nodes([launcher("ipdpo", port, IPDPO, *overrides, rank=r) for r in (0, 1)], tmp_path / "logs")
    )
    samples = [json.loads(line) for line in (out / "round-1" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 7 * 4 and sorted(sum(r["rank"] == rank for r in samples) for rank in (0, 1)) == [
        12,
        16,
    ]
    summary = json.loads((out / "round-1" / "summary.json").read_text())
    assert summary["heldout"]["count"] == 9, "held-out predictions gathered from both nodes"
    assert summary["pairs"]["pairs"] >= 1 and (out / "round-1" / "pairs.jsonl").is_file()
    assert (out / "round-1" / "model.safetensors").is_file() and (out / "rounds.jsonl").is_file()
    assert not list(out.glob(".shared-check-*")), "the shared-folder check leaves nothing behind"


@pytest.mark.slow
def test_a_node_that_cannot_see_the_output_folder_or_reach_the_retriever_stops_both_at_start(
    synthetic_bm25_server, tmp_path, free_port
):
    out = tmp_path / "run"
    base = grpo_overrides(synthetic_bm25_server, out, 1)
    # node 1 sees another folder at that path (no shared filesystem): a run that would lose its checkpoints
    port = free_port()
    results = run_nodes(
        [launcher("grpo", port, GRPO, *base, rank=0),
         launcher("grpo", port, GRPO, *base, f"trainer.output_dir={tmp_path / 'elsewhere'}", rank=1)],
        tmp_path / "logs-folder",
    )  # fmt: skip
    for status, output in results:
        assert status != 0
        assert "trainer.output_dir must be one folder that every node sees at the same path" in output
        assert (
            f"process 1 on {socket.gethostname()} does not see {tmp_path / 'elsewhere'}/.shared-check-"
            in output
        )
    # node 1 cannot reach the retriever: both stop at once, naming it, instead of node 0 waiting for it
    port = free_port()
    dead = f"http://127.0.0.1:{free_port()}"
    results = run_nodes(
        [launcher("grpo", port, GRPO, *base, rank=0),
         launcher("grpo", port, GRPO, *base, f"retriever.url={dead}", "retriever.startup_wait_s=1", rank=1)],
        tmp_path / "logs-retriever",
    )  # fmt: skip
    for status, output in results:
        assert status != 0 and f"process 1 on {socket.gethostname()}: retriever at {dead} not ready" in output
    assert not list(out.glob("checkpoint-*")) and not (out / "final").exists()
