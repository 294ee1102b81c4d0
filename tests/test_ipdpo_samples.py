"""The IP-DPO sample store: compacting the part files survives a crash at any step without losing a sample
or reading one twice."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest

from autorefine.training.ipdpo.sampling import SampleStore

SIZE = 2  # samples per question
KEPT = "kept.jsonl"  # the compacted file inside samples.parts/
LEGACY_KEPT = "kept.partial-compact"  # what an interrupted compaction of earlier versions left


def group(qid: str, rank: int) -> list[dict]:
    """The SIZE sample rows of one question, as a process appends them."""
    return [
        {"id": qid, "sample": s, "rank": rank, "completion_ids": [s], "env_mask": [1], "scores": {}}
        for s in range(SIZE)
    ]


def append(path: Path, rows: list[dict], torn: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows) + torn)


def store_after_a_resume(root: Path) -> tuple[SampleStore, set[str]]:
    """A round compacted once (q0, q1), then sampled further by two processes, one cut short mid-question."""
    store = SampleStore(root, SIZE)
    append(store.part(0), group("q0", 0) + group("q1", 0))
    assert store.compact() == 2
    append(store.part(0), group("q2", 0) + group("q3", 0) + group("q4", 0)[:1], torn='{"id": "q4", "sam')
    append(store.part(1), group("q5", 1))
    return store, {"q0", "q1", "q2", "q3", "q5"}


class Crash(Exception):
    """The injected failure."""


def crash_at(monkeypatch: pytest.MonkeyPatch, step: int) -> list[str]:
    """Make the `step`-th file-system call among fsync/replace/rename/unlink raise; returns the calls made."""
    calls: list[str] = []
    for name in ("fsync", "replace", "rename", "unlink"):
        real = getattr(os, name)

        def wrapped(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            if len(calls) == step:
                raise Crash(f"{_name} (step {step})")
            return _real(*args, **kwargs)

        monkeypatch.setattr(os, name, wrapped)
    return calls


def kept_counts(store: SampleStore) -> Counter[str]:
    rows = [json.loads(line) for line in (store.parts / KEPT).read_text().splitlines()]
    return Counter(r["id"] for r in rows)


def test_a_crash_at_any_step_of_compaction_loses_no_sample_and_duplicates_none(tmp_path, monkeypatch):
    step = 0
    while True:
        step += 1
        root = tmp_path / f"crash-{step}"
        store, sampled = store_after_a_resume(root)
        with monkeypatch.context() as patch:
            calls = crash_at(patch, step)
            try:
                store.compact()
                crashed = False
            except Crash:
                crashed = True
        if not crashed:
            break
        # What a resumed run reads right after the crash: every finished question, the torn one not.
        assert store.done_ids() == sampled, (step, calls)
        # The next compaction (the resumed run's) ends with every question exactly once.
        assert store.compact() == len(sampled), (step, calls)
        assert kept_counts(store) == dict.fromkeys(sampled, SIZE), (step, calls)
        assert sorted(p.name for p in store.parts.iterdir()) == [KEPT]
        store.finish(sorted(sampled))
        merged = Counter(r["id"] for r in store.rows())
        assert merged == dict.fromkeys(sampled, SIZE), (step, calls)
        shutil.rmtree(root)
    # steps: sync the new file, rename it into place, sync the folder, delete the two part files
    assert step - 1 >= 5, calls
    assert kept_counts(store) == dict.fromkeys(sampled, SIZE)
    assert store.done_ids() == sampled


def test_a_partial_compaction_left_by_a_kill_is_ignored(tmp_path):
    store, sampled = store_after_a_resume(tmp_path)
    (store.parts / (KEPT + ".partial")).write_text('{"id": "q9", "sample": 0, "comp')
    assert store.done_ids() == sampled
    assert store.compact() == len(sampled)
    assert kept_counts(store) == dict.fromkeys(sampled, SIZE)


def test_what_an_older_interrupted_compaction_left_is_recovered(tmp_path):
    """Earlier versions deleted the parts before renaming their compacted file: its samples are read back."""
    store = SampleStore(tmp_path, SIZE)
    append(store.parts / LEGACY_KEPT, group("q0", 0) + group("q1", 1))
    append(store.part(0), group("q1", 1) + group("q2", 0))  # q1 both there and in a part not yet deleted
    assert store.done_ids() == {"q0", "q1", "q2"}
    assert store.compact() == 3
    assert kept_counts(store) == {"q0": SIZE, "q1": SIZE, "q2": SIZE}
    assert not (store.parts / LEGACY_KEPT).exists()
