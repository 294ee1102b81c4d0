"""Every command against the retrievers users already run: a Search-R1-API-only server, replicas, a token.

`evaluate`, `infer` and `train-grpo` run for real (warm-start synthetic policy, real BM25 servers): against
tests/searchr1_server.py (`POST /retrieve` only, bare documents, unquoted titles) they give what they give
against ours; against two replicas of which one dies mid-evaluation they lose no question and give what
one replica gives; and a retriever's API key never reaches logs, the saved run config or W&B files.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from autorefine.api_key import API_KEY_ENV
from autorefine.cli import main
from autorefine.evaluation.benchmark import PREDICTIONS_FILE, PredictionsFile
from autorefine.retrieval import RetrieverClient
from tests.helpers import REPO_ROOT, SYNTHETIC_DIR

WARMSTART = SYNTHETIC_DIR / "warmstart"
HELDOUT = SYNTHETIC_DIR / "heldout.jsonl"
TINY_CPU = REPO_ROOT / "configs" / "grpo" / "tiny-cpu.yaml"
POLICY_ARGS = [
    "--model", str(WARMSTART), "--template", str(SYNTHETIC_DIR / "template.txt"), "--max-turns", "2",
    "--max-new-tokens", "48", "--max-obs-tokens", "160", "--max-completion-tokens", "320", "--topk", "3",
]  # fmt: skip
QUESTIONS = 12


def evaluate(url: str, out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """`autorefine evaluate` of the first held-out questions: (rows by question id, metrics)."""
    args = ["evaluate", *POLICY_ARGS, "--retriever-url", url, "--datasets", f"synthetic={HELDOUT}",
            "--limit", str(QUESTIONS), "--batch-size", "2", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    rows = {key[1]: row for key, row in PredictionsFile(out / PREDICTIONS_FILE).rows.items()}
    return rows, json.loads((out / "metrics.json").read_text())["datasets"]


@pytest.fixture(scope="module")
def one_replica_run(synthetic_bm25_server: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The evaluation against one of our servers: what every other set-up must reproduce."""
    rows, metrics = evaluate(synthetic_bm25_server, tmp_path_factory.mktemp("eval-ours"))
    assert len(rows) == QUESTIONS and any(row["trajectory"]["queries"] for row in rows.values())
    return rows, metrics


def test_evaluate_against_a_searchr1_server_gives_what_ours_gives(
    one_replica_run: Any, synthetic_searchr1_server: str, tmp_path: Path
) -> None:
    rows, metrics = evaluate(synthetic_searchr1_server, tmp_path)
    assert rows == one_replica_run[0]  # same documents blocks, so same tokens, answers and scores
    assert metrics == one_replica_run[1]
    assert any("Doc 1(Title: " in json.dumps(row["trajectory"]) for row in rows.values())


def test_infer_against_a_searchr1_server(
    synthetic_searchr1_server: str, capsys: pytest.CaptureFixture
) -> None:
    question = "What is the home city of Drarbim Brourso?"
    assert main(["infer", *POLICY_ARGS, "--retriever-url", synthetic_searchr1_server, question]) == 0
    out = capsys.readouterr().out
    assert "Doc 1(Title: Drarbim Brourso) Drarbim Brourso is a baker." in out


def _train_grpo(url: str, out: Path, *overrides: str) -> int:
    return main(
        ["train-grpo", "--config", str(TINY_CPU), f"retriever.url={url}", f"trainer.output_dir={out}",
         "trainer.report_to=[]", "trainer.save_strategy=no", "trainer.per_device_train_batch_size=16",
         "trainer.max_steps=2", "heldout.every=0", "logging.sample_table_every=0", *overrides]
    )  # fmt: skip


@pytest.mark.slow
def test_train_grpo_two_steps_against_a_searchr1_server(
    synthetic_searchr1_server: str, tmp_path: Path
) -> None:
    assert _train_grpo(synthetic_searchr1_server, tmp_path) == 0
    steps = [
        log
        for log in json.loads((tmp_path / "trainer_state.json").read_text())["log_history"]
        if "loss" in log
    ]
    assert len(steps) == 2
    assert all(step["rollout/searches"] > 0 for step in steps)  # rollouts searched the Search-R1 server
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_evaluation_that_loses_one_of_two_replicas_loses_no_question(
    one_replica_run: Any,
    start_retriever: Any,
    synthetic_bm25_index: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="autorefine.retrieval")
    clients: list[RetrieverClient] = []
    search = RetrieverClient.search

    with (
        start_retriever(synthetic_bm25_index) as (a, _),
        start_retriever(synthetic_bm25_index) as (b, process),
    ):

        def search_then_kill(self: RetrieverClient, queries: list[str], topk: int = 3) -> Any:
            clients.append(self)
            if len(clients) == 3:  # in the middle of the evaluation: the second replica dies
                process.kill()
                process.wait(timeout=10)
            return search(self, queries, topk)

        monkeypatch.setattr(RetrieverClient, "search", search_then_kill)
        rows, metrics = evaluate(f"{a},{b}", tmp_path)
    assert len(clients) >= 5 and process.returncode is not None
    assert rows == one_replica_run[0] and metrics == one_replica_run[1]
    stats = clients[0].stats()
    assert stats["retried"] >= 1 and [r["healthy"] for r in stats["replicas"]] == [True, False]
    assert all(r["requests"] > 0 for r in stats["replicas"])  # both served before b died
    assert f"retriever replica {b} is down" in caplog.text


@pytest.mark.slow
def test_api_key_never_reaches_logs_run_config_or_wandb(
    start_retriever: Any,
    synthetic_bm25_index: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:
    token = "grpo-run-token-5d1e8b20c7"
    key_file = tmp_path / "retriever.key"
    key_file.write_text(token + "\n")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    (tmp_path / "wandb").mkdir()
    import wandb

    wandb.teardown()  # wandb reads WANDB_DIR once per process: an earlier test may have set it up already
    caplog.set_level(logging.DEBUG)
    with start_retriever(synthetic_bm25_index, api_key_file=key_file) as (url, process):
        run = tmp_path / "run"
        assert _train_grpo(url, run, f"retriever.api_key_file={key_file}", "trainer.report_to=[wandb]") == 0
        monkeypatch.setenv(API_KEY_ENV, token)  # the other way to give it: evaluate and infer use this
        rows, _ = evaluate(url, tmp_path / "eval")
        server_log = process.log_path.read_text("utf-8")
    assert len(rows) == QUESTIONS
    saved = (run / "autorefine_config.yaml").read_text()
    assert f"api_key_file: {key_file}" in saved  # where the token is, not the token
    written = [
        p for p in [*run.rglob("*"), *(tmp_path / "wandb").rglob("*"), *(tmp_path / "eval").rglob("*")]
    ]
    wandb_files = [p for p in (tmp_path / "wandb").rglob("*") if p.is_file()]
    assert any(str(run).encode() in p.read_bytes() for p in wandb_files)  # the run's config is in there
    for path in written:
        if path.is_file() and path != key_file:
            assert token.encode() not in path.read_bytes(), path
    printed = capfd.readouterr()
    assert token not in printed.out + printed.err + caplog.text + server_log
    assert os.environ[API_KEY_ENV] == token
