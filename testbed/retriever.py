"""Run `retriever-server serve` as a child process for local jobs (demo, scripts, tests) and always stop it.

Real deployments start the server themselves, often on another node; the trainer only ever needs its URL.
This talks to the server over HTTP like everything else and imports nothing from `retriever_server`.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from autorefine.retrieval import RetrieverClient, RetrieverUnavailableError


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_command(index_dir: str | Path, port: int, extra_args: tuple[str, ...] = ()) -> list[str]:
    """The command line that serves `index_dir` on 127.0.0.1:`port`."""
    return [
        sys.executable,
        "-m",
        "retriever_server.cli",
        "serve",
        "--index",
        str(index_dir),
        "--port",
        str(port),
        *extra_args,
    ]


def ensure_bm25_index(corpus: str | Path, index_dir: str | Path) -> Path:
    """Build a BM25 index of `corpus` into `index_dir` with `retriever-server build`, unless one is there."""
    index_dir = Path(index_dir)
    if not (index_dir / "manifest.json").is_file():
        command = [sys.executable, "-m", "retriever_server.cli", "build", "--corpus", str(corpus),
                   "--encoder", "bm25", "--out", str(index_dir)]  # fmt: skip
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return index_dir


def stop(process: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `grace_s`."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=grace_s)


@contextlib.contextmanager
def running_retriever(
    index_dir: str | Path,
    *,
    port: int | None = None,
    extra_args: tuple[str, ...] = (),
    log: IO[bytes] | None = None,
    startup_timeout_s: float = 300.0,
) -> Iterator[str]:
    """Yield the URL of a ready retriever serving `index_dir`; stopped on exit, error, Ctrl-C or SIGTERM."""
    port = port or free_port()
    # Python's default SIGTERM ends the process without running `finally`, which would orphan the server
    # (a scheduler's time limit, `kill`); as an exception it unwinds through the stop below.
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        serve_command(index_dir, port, extra_args),
        stdout=log or subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        with RetrieverClient(url, max_retries=0) as client:
            try:
                client.wait_until_ready(timeout=startup_timeout_s, interval=0.2)
            except RetrieverUnavailableError:
                if process.poll() is not None:
                    raise RetrieverUnavailableError(
                        f"retriever-server exited with code {process.returncode} while starting on {url}"
                        + (f" (see {log.name})" if log is not None and hasattr(log, "name") else "")
                    ) from None
                raise
        yield url
    finally:
        stop(process)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)
