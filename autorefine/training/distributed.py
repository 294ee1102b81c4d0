"""Run-wide agreement between the processes of a job: every process learns of a failure anywhere."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from autorefine.training.arguments import RunError

if TYPE_CHECKING:
    from accelerate import PartialState

T = TypeVar("T")


def all_succeeded(state: PartialState, error: str | None) -> None:
    """Every process reports how its share went; if any failed, every process raises the same RunError."""
    from accelerate.utils import gather_object

    errors = gather_object([error]) if state.num_processes > 1 else [error]
    failed = [e for e in errors if e]
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


def free_accelerator_memory() -> None:
    """Release what a finished stage held (its model, its engine) before the next one loads another."""
    from accelerate.utils.memory import clear_device_cache

    clear_device_cache(garbage_collection=True)
