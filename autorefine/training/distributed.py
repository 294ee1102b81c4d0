"""Run-wide agreement between the processes of a job: every process learns of a failure anywhere, and
every node sees the one output folder that checkpoints, `best/` and IP-DPO's round files are written to."""

from __future__ import annotations

import logging
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from autorefine.training.arguments import RunError
from autorefine.training.checkpoints import latest_checkpoint

if TYPE_CHECKING:
    from accelerate import PartialState

T = TypeVar("T")
logger = logging.getLogger(__name__)
# How long a process waits for a file the main process wrote: a network filesystem may show it late.
SHARED_FILE_WAIT_S = 15.0


def gathered(state: PartialState, items: list[Any]) -> list[Any]:
    """Every process's `items`, concatenated in process order (on one process, `items` itself)."""
    if state.num_processes == 1:
        return items
    from accelerate.utils import gather_object

    return gather_object(items)


def all_succeeded(state: PartialState, error: str | None) -> None:
    """Every process reports how its share went; if any failed, every process raises the same RunError."""
    failed = [e for e in gathered(state, [error]) if e]
    if failed:
        raise RunError("\n".join(failed))


def on_main(state: PartialState, fn: Callable[[], T]) -> T:
    """Run `fn` on the main process and hand its result (or its failure) to every process."""
    from accelerate.utils import broadcast_object_list

    payload: list[Any] = [(None, None)]
    failure: BaseException | None = None
    if state.is_main_process:
        try:
            payload = [(fn(), None)]
        except Exception as err:  # the other processes must hear of it, or they wait forever
            failure = err
            payload = [(None, str(err))]
    if state.num_processes > 1:
        broadcast_object_list(payload, from_process=0)
    result, error = payload[0]
    if failure is not None:
        raise failure
    if error is not None:
        raise RunError(error)
    return result


def on_every_process(state: PartialState, fn: Callable[[], T]) -> T:
    """Run `fn` on every process; when it fails on any (a node that cannot reach a server), every process raises,
    naming each process that failed and its host, instead of the others waiting for it in the next collective."""
    if state.num_processes == 1:
        return fn()
    from accelerate.utils import gather_object

    result: Any = None
    error = None
    try:
        result = fn()
    except Exception as err:  # any failure: the other processes must hear of it
        error = f"process {state.process_index} on {socket.gethostname()}: {err}"
    failed = [e for e in gather_object([error]) if e]
    if failed:
        raise RunError("\n".join(failed))
    return result


def start_processes(args: Any) -> PartialState:
    """The job's processes, set up from trainer arguments (backend, device, timeout) as the trainer will use them."""
    from accelerate import PartialState

    args.device  # noqa: B018  # sets up the process group from the arguments
    return PartialState()


def free_accelerator_memory() -> None:
    """Release what a finished stage held (its model, its engine) before the next one loads another."""
    from accelerate.utils.memory import clear_device_cache

    clear_device_cache(garbage_collection=True)


def process_hosts(state: PartialState) -> list[str]:
    """The host name of every process, by process index (logged once: which node runs which ranks)."""
    hosts = gathered(state, [socket.gethostname()])
    if state.is_main_process and len(set(hosts)) > 1:
        ranks = {h: [i for i, x in enumerate(hosts) if x == h] for h in dict.fromkeys(hosts)}
        layout = "; ".join(
            f"{h}: processes {r[0]}-{r[-1]}" if len(r) > 1 else f"{h}: process {r[0]}"
            for h, r in ranks.items()
        )
        logger.info("this job runs on %d machines (%s)", len(ranks), layout)
    return hosts


def _seen(path: Path, wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    while not path.exists():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.25)
    return True


def check_shared_folder(
    state: PartialState,
    folder: str | Path,
    setting: str = "trainer.output_dir",
    wait_s: float = SHARED_FILE_WAIT_S,
) -> None:
    """Refuse a run whose processes do not all see `folder`: what the main process writes there alone
    (checkpoints, `best/`, IP-DPO's pairs and round files) every process reads, and resumes from."""
    if state.num_processes == 1:
        return
    folder = Path(folder)

    def mark() -> tuple[str, str, str]:
        folder.mkdir(parents=True, exist_ok=True)
        marker = folder / f".shared-check-{uuid.uuid4().hex}"
        marker.write_text(socket.gethostname(), encoding="utf-8")
        return marker.name, socket.gethostname(), str(folder.resolve())

    name, host, where = on_main(state, mark)
    marker = folder / name
    error = None
    if not _seen(marker, wait_s):
        error = (
            f"process {state.process_index} on {socket.gethostname()} does not see {marker}, which the main "
            f"process wrote on {host} into {where}"
        )
    try:
        all_succeeded(state, error)
    except RunError as err:
        raise RunError(
            f"{setting} must be one folder that every node sees at the same path (a shared filesystem: NFS, "
            "Lustre, ...): the main process alone writes checkpoints, best/ and IP-DPO's round files into it, "
            f"and every process reads them and resumes from them.\n{err}"
        ) from None
    finally:
        on_main(state, lambda: marker.unlink(missing_ok=True))


def agreed_resume(state: PartialState, output_dir: str | Path, resume: str | None) -> str | None:
    """The checkpoint every process resumes from: `latest` resolved once, by the main process, so no node picks
    an older one its view of a network filesystem still shows; each process must see it."""
    if resume is None:
        return None

    def resolve() -> str:
        path = latest_checkpoint(output_dir) if resume == "latest" else resume
        if path is None:
            raise RunError(f"--resume latest: no checkpoint-* directory in {output_dir}")
        return str(path)

    path = on_main(state, resolve)
    error = None
    if not _seen(Path(path), SHARED_FILE_WAIT_S if state.num_processes > 1 else 0.0):
        error = f"process {state.process_index} on {socket.gethostname()}: checkpoint {path} not found"
    all_succeeded(state, error)
    return path
