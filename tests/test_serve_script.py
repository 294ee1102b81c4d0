"""scripts/serve_retriever.sh: --help, --dry-run, and one real replica per (pretend) GPU on this machine."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from autorefine.retrieval import RetrieverClient
from tests.helpers import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "serve_retriever.sh"
BARE_PATH = "/usr/bin:/bin"  # no retriever-server, no nvidia-smi


def _script(*args: str, path: str = BARE_PATH, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        env={**environment, "PATH": path, **env},
    )


def test_help_documents_replicas() -> None:
    done = _script("--help")
    assert done.returncode == 0 and done.stderr == ""
    for word in ("--replica-per-gpu", "--gpus", "--dry-run", "retriever.url: [", "--api-key-file"):
        assert word in done.stdout


def test_dry_run_prints_one_server_per_gpu_on_consecutive_ports() -> None:
    done = _script("--dry-run", "--replica-per-gpu", "--gpus", "2,5", "--host", "10.0.0.7", "--port", "8100",
                   "idx", "--topk", "3")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "CUDA_VISIBLE_DEVICES=2 retriever-server serve --index idx --host 10.0.0.7 --port 8100 --topk 3 &",
        "CUDA_VISIBLE_DEVICES=5 retriever-server serve --index idx --host 10.0.0.7 --port 8101 --topk 3 &",
        "# 2 replicas: retriever.url=[http://10.0.0.7:8100, http://10.0.0.7:8101] "
        "(or --retriever-url http://10.0.0.7:8100,http://10.0.0.7:8101)",
    ]
    # CUDA_VISIBLE_DEVICES names the GPUs when --gpus does not
    assert (
        "CUDA_VISIBLE_DEVICES=3 "
        in _script("--dry-run", "--replica-per-gpu", "i", CUDA_VISIBLE_DEVICES="1,3").stdout
    )
    # the single-server form is unchanged
    single = _script("--dry-run", "--gpus", "0,1", "idx")
    assert (
        single.stdout.strip()
        == "CUDA_VISIBLE_DEVICES=0,1 retriever-server serve --index idx --host 0.0.0.0 --port 8000"
    )


def test_replicas_without_any_gpu_is_refused() -> None:
    done = _script("--dry-run", "--replica-per-gpu", "idx")
    assert done.returncode == 2 and "found no GPU" in done.stderr and "--gpus LIST" in done.stderr


def _two_free_ports() -> int:
    """A port P such that P and P + 1 are both free on 127.0.0.1 right now."""
    for _ in range(50):
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            try:
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("no two consecutive free ports")


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.fixture()
def server_on_path(tmp_path: Path) -> str:
    """A PATH whose `retriever-server` runs this checkout's `python -m retriever_server.cli`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "retriever-server"
    wrapper.write_text(
        f'#!/bin/sh\nPYTHONPATH={REPO_ROOT} exec {sys.executable} -m retriever_server.cli "$@"\n'
    )
    wrapper.chmod(0o755)
    return f"{bin_dir}:{BARE_PATH}"


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc (Linux)")
@pytest.mark.parametrize("ending", ["script stopped", "replica died"])
def test_one_replica_per_gpu_serves_and_stops_together(
    ending: str, server_on_path: str, synthetic_bm25_index: Path
) -> None:
    port = _two_free_ports()
    urls = [f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}"]
    environment = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    command = ["bash", str(SCRIPT), "--replica-per-gpu", "--gpus", "0,1", "--host", "127.0.0.1",
               "--port", str(port), str(synthetic_bm25_index)]  # fmt: skip
    script = subprocess.Popen(
        command, env={**environment, "PATH": server_on_path}, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        for url in urls:
            while True:
                assert script.poll() is None and time.monotonic() < deadline
                try:
                    if httpx.get(f"{url}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
        with RetrieverClient(urls) as client:
            for _ in range(4):
                assert client.search(["home city of Drarbim Brourso"], topk=1)[0][0].id == "0"
            assert [r["requests"] for r in client.stats()["replicas"]] == [2, 2]
        replicas = _children(script.pid)
        assert len(replicas) == 2
        if ending == "script stopped":
            script.send_signal(signal.SIGTERM)
            assert script.wait(timeout=60) == 143
        else:
            os.kill(replicas[1], signal.SIGKILL)
            assert script.wait(timeout=60) == 128 + signal.SIGKILL
            assert "a replica exited with status 137; stopping the others" in script.stderr.read()
        for pid in replicas:  # both replicas are gone: nothing left listening
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
        for url in urls:
            with pytest.raises(httpx.TransportError):
                httpx.get(f"{url}/health", timeout=2)
    finally:
        if script.poll() is None:
            script.kill()
            script.wait(timeout=30)
