"""autorefine.training.distributed in one process: `--resume latest` resolution, failures passed on as they are.

Their multi-process behaviour (every node agreeing, a node that cannot see the output folder) runs in
tests/test_multinode.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from autorefine.retrieval import RetrieverUnavailableError
from autorefine.training.arguments import RunError
from autorefine.training.distributed import agreed_resume, check_shared_folder, on_every_process

ALONE = SimpleNamespace(num_processes=1, process_index=0, is_main_process=True)


def test_resume_latest_is_the_newest_checkpoint_and_a_missing_one_is_named(tmp_path):
    assert agreed_resume(ALONE, tmp_path, None) is None
    with pytest.raises(RunError, match=f"--resume latest: no checkpoint-\\* directory in {tmp_path}"):
        agreed_resume(ALONE, tmp_path, "latest")
    for step in (2, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
    assert agreed_resume(ALONE, tmp_path, "latest") == str(tmp_path / "checkpoint-10")
    assert agreed_resume(ALONE, tmp_path, str(tmp_path / "checkpoint-2")) == str(tmp_path / "checkpoint-2")
    with pytest.raises(RunError, match=r"checkpoint .*checkpoint-7 not found"):
        agreed_resume(ALONE, tmp_path, str(tmp_path / "checkpoint-7"))


def test_one_process_keeps_its_own_errors_and_needs_no_shared_folder(tmp_path):
    def unreachable():
        raise RetrieverUnavailableError("retriever at http://x:1 not ready")

    with pytest.raises(RetrieverUnavailableError):  # the error a single-process start always raised
        on_every_process(ALONE, unreachable)
    assert on_every_process(ALONE, lambda: 7) == 7
    check_shared_folder(ALONE, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing written, nothing to check
