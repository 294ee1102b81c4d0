"""scripts/train_{grpo,sft,ipdpo}.sh (one implementation: launch_training.sh) and the SLURM examples: the
`accelerate launch` command of every node, from flags or from SLURM's environment. The real launch of two
machines is in tests/test_multinode.py."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT

BARE_PATH = "/usr/bin:/bin"  # no accelerate, no scontrol
GRPO = "configs/grpo/tiny-cpu.yaml"
IPDPO = "configs/ipdpo/tiny-cpu.yaml"
SFT = "configs/sft/synthetic-warmstart.yaml"
SLURM_VARIABLES = (
    "SLURM_NNODES",
    "SLURM_JOB_NUM_NODES",
    "SLURM_NODEID",
    "SLURM_JOB_NODELIST",
    "SLURM_GPUS_ON_NODE",
)


def run(script: str, *args: str, path: str = BARE_PATH, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k not in SLURM_VARIABLES}
    return subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / script), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        env={**environment, "PATH": path, **env},
    )


def node_commands(stdout: str) -> dict[int, list[str]]:
    """The dry run's command of each node, as words."""
    lines = stdout.strip().splitlines()
    return {
        int(label.split()[2]): command.split()
        for label, command in zip(lines[::2], lines[1::2], strict=True)
        if label.startswith("# node ")
    }


@pytest.mark.parametrize("method", ["grpo", "sft", "ipdpo"])
def test_each_method_has_a_launcher_with_help(method):
    done = run(f"train_{method}.sh", "--help")
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout.startswith(f"usage: scripts/train_{method}.sh")
    for word in (
        "--nodes",
        "--node-rank",
        "--main-address",
        "--main-port",
        "$SLURM_JOB_NODELIST",
        "--dry-run",
    ):
        assert word in done.stdout


def test_one_node_is_the_command_it_always_was():
    done = run("train_grpo.sh", "--dry-run", "--gpus", "4", GRPO, "trainer.max_steps=2")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [
        "accelerate", "launch", "--config_file", "configs/accelerate/multi_gpu_ddp.yaml", "--num_processes", "4",
        "-m", "autorefine.cli", "train-grpo", "--config", GRPO, "trainer.max_steps=2",
    ]  # fmt: skip


def test_several_nodes_get_one_command_each_with_the_total_process_count():
    done = run(
        "train_grpo.sh", "--dry-run", "--accelerate-config", "configs/accelerate/fsdp2.yaml", "--nodes", "2",
        "--node-rank", "1", "--main-address", "10.0.0.7", "--main-port", "29600", "--resume", "latest", GRPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    commands = node_commands(done.stdout)
    assert sorted(commands) == [0, 1]
    for rank, words in commands.items():
        assert words == [
            "accelerate", "launch", "--config_file", "configs/accelerate/fsdp2.yaml", "--num_machines", "2",
            "--machine_rank", str(rank), "--main_process_ip", "10.0.0.7", "--main_process_port", "29600",
            "--num_processes", "16",  # 8 per node (the config's), in all
            "-m", "autorefine.cli", "train-grpo", "--config", GRPO, "--resume", "latest",
        ]  # fmt: skip
    assert "# node 0 of 2 (main: 10.0.0.7:29600)" in done.stdout
    assert "# node 1 of 2 <- this node" in done.stdout


def test_slurm_gives_the_node_count_rank_and_main_host():
    slurm = {
        "SLURM_NNODES": "2",
        "SLURM_NODEID": "1",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_GPUS_ON_NODE": "4",
    }
    done = run("train_ipdpo.sh", "--dry-run", "--resume", IPDPO, "rounds=1", **slurm)
    assert done.returncode == 0, done.stderr
    commands = node_commands(done.stdout)
    assert commands[1][4:14] == [
        "--num_machines", "2", "--machine_rank", "1", "--main_process_ip", "gpu07", "--main_process_port", "29500",
        "--num_processes", "8",
    ]  # fmt: skip
    assert commands[1][-5:] == ["train-ipdpo", "--config", IPDPO, "--resume", "rounds=1"]  # a flag for IP-DPO
    assert "<- this node" in done.stdout.splitlines()[2]
    # flags win over the environment
    flagged = run("train_ipdpo.sh", "--dry-run", "--node-rank", "0", "--main-address", "head", IPDPO, **slurm)
    assert node_commands(flagged.stdout)[0][
        9
    ] == "head" and "# node 0 of 2 (main: head:29500) <- this node" in (flagged.stdout)


def test_scontrol_names_the_main_host_where_slurm_is_installed(tmp_path: Path):
    fake = tmp_path / "scontrol"  # prints what `scontrol show hostnames` would for the list it is given
    fake.write_text(
        '#!/bin/bash\n[[ "$1 $2 $3" == "show hostnames n[3-4]" ]] && printf "n3.cluster\\nn4.cluster\\n"\n'
    )
    fake.chmod(0o755)
    slurm = {"SLURM_NNODES": "2", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "n[3-4]"}
    done = run("train_sft.sh", "--dry-run", SFT, path=f"{tmp_path}:{BARE_PATH}", **slurm)
    assert done.returncode == 0, done.stderr
    assert node_commands(done.stdout)[0][9] == "n3.cluster"
    assert node_commands(done.stdout)[0][-3:] == ["train-sft", "--config", SFT]


def test_the_processes_of_a_node_default_to_the_config_per_machine():
    done = run(
        "train_grpo.sh", "--dry-run", "--accelerate-config", "configs/accelerate/cpu_2machines.yaml",
        "--nodes", "2", "--main-address", "127.0.0.1", GRPO,
    )  # fmt: skip
    commands = node_commands(done.stdout)
    assert commands[0][commands[0].index("--num_processes") + 1] == "2"  # one per machine, two in all
    assert commands[0][commands[0].index("--main_process_port") + 1] == "29512"  # the config's port


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--nodes", "2", GRPO), "--nodes 2 needs --main-address"),
        (
            ("--nodes", "2", "--node-rank", "2", "--main-address", "h", GRPO),
            "--node-rank 2 is not one of the 2 nodes",
        ),
        (("--nodes", "two", GRPO), "not a number: two"),
        (("--dry-run", "missing.yaml"), "preset not found: missing.yaml"),
    ],
)
def test_bad_launches_are_refused_with_the_reason(args, message):
    done = run("train_grpo.sh", *args)
    assert done.returncode == 2 and message in done.stderr


def test_the_slurm_example_where_every_node_trains_with_a_retriever_of_its_own():
    slurm = {"SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NNODES": "2", "SLURM_SUBMIT_DIR": str(REPO_ROOT)}
    done = run(
        "slurm/train-all-nodes.sbatch", "--dry-run", "--index", "idx", "ipdpo", IPDPO, "rounds=1", **slurm
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "# 2 nodes: gpu07 gpu08"
    assert lines[1].startswith(
        "srun --overlap --ntasks-per-node=1 env CUDA_VISIBLE_DEVICES= scripts/serve_retriever.sh"
    )
    assert "retriever.url=http://gpu07:8001\\,http://gpu08:8001 retriever.prefer_local=true" in lines[2]
    commands = node_commands("\n".join(lines[4:]))
    assert [c[c.index("--machine_rank") + 1] for c in commands.values()] == ["0", "1"]
    assert run("slurm/train-all-nodes.sbatch", "--help").stdout.startswith("usage: sbatch scripts/slurm/")


def test_the_slurm_example_with_a_generation_node_serves_the_trained_model_there():
    slurm = {"SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_SUBMIT_DIR": str(REPO_ROOT)}
    preset = "configs/grpo/autorefine-qwen2.5-7b-base.yaml"
    done = run("slurm/grpo-train-plus-generation.sbatch", "--dry-run", "--index", "idx", preset, **slurm)
    assert done.returncode == 0, done.stderr
    generate, train = done.stdout.splitlines()[1], done.stdout.splitlines()[3]
    assert (
        "-w gpu08" in generate
        and "trl vllm-serve --model Qwen/Qwen2.5-7B --tensor-parallel-size 4" in generate
    )
    assert "scripts/serve_retriever.sh --gpus 4,5 --port 8001 idx" in generate
    assert train.startswith("srun --nodes=1 --ntasks=1 -w gpu07 scripts/train_grpo.sh")
    assert "trainer.vllm_server_host=gpu08" in train and "retriever.url=http://gpu08:8001" in train
    # the server serves what the trainer trains, overrides included
    other = run("slurm/grpo-train-plus-generation.sbatch", "--dry-run", "--index", "idx", preset,
                "model.name_or_path=/shared/sft-7b/final", **slurm)  # fmt: skip
    assert "trl vllm-serve --model /shared/sft-7b/final " in other.stdout
