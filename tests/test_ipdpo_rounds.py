"""`train-ipdpo` rounds end to end on the synthetic task (real BM25 server, real agent loop, real TRL
DPOTrainer): the files of every stage, resume at each stage, a lost retriever, too few pairs, given pairs,
LoRA, two processes, and a round that learns."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from autorefine.evaluation.policy import training_defaults
from autorefine.modeling import load_policy, load_tokenizer
from autorefine.retrieval import RetrieverClient
from autorefine.settings import ConfigError
from autorefine.training.arguments import RunError
from autorefine.training.ipdpo.pairs import PairError, read_pairs
from autorefine.training.ipdpo.rounds import train_ipdpo
from testbed.retriever import stop
from tests.helpers import REPO_ROOT, SYNTHETIC_DIR, tiny_ipdpo_config

TINY_CPU = REPO_ROOT / "configs" / "ipdpo" / "tiny-cpu.yaml"


tiny = tiny_ipdpo_config


class CountingSearcher:
    """A real retriever client that counts its calls (and can act before each one)."""

    def __init__(self, client: RetrieverClient, before=None) -> None:
        self.client = client
        self.before = before
        self.calls = 0

    def search(self, queries, topk=3):
        self.calls += 1
        if self.before is not None:
            self.before()
        return self.client.search(queries, topk)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mtimes(folder: Path, *names: str) -> dict[str, int]:
    return {n: (folder / n).stat().st_mtime_ns for n in names}


@pytest.fixture(scope="module")
def finished_round(synthetic_bm25_server, tmp_path_factory) -> Path:
    """One round from the warm start, logged to W&B in offline mode."""
    out = tmp_path_factory.mktemp("ipdpo") / "run"
    # held-out questions labelled with a hop count, as multi-hop data is: metrics are also reported per count
    heldout = out.parent / "heldout.jsonl"
    rows_ = [json.loads(line) for line in (SYNTHETIC_DIR / "heldout.jsonl").read_text().splitlines()[:16]]
    heldout.write_text(
        "".join(json.dumps({**r, "metadata": {"hops": 1 + i % 2}}) + "\n" for i, r in enumerate(rows_))
    )
    saved = {k: os.environ.get(k) for k in ("WANDB_MODE", "WANDB_SILENT")}
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true")
    try:
        train_ipdpo(tiny(synthetic_bm25_server, out, "trainer.report_to=[wandb]", f"heldout.file={heldout}"))
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.update({key: value})
    return out


def test_a_round_writes_every_stage_and_a_loadable_policy(finished_round):
    run = finished_round
    round_dir = run / "round-1"
    samples = rows(round_dir / "samples.jsonl")
    assert len(samples) == 8 * 4
    assert [len({r["id"] for r in samples[i : i + 4]}) for i in range(0, 32, 4)] == [1] * 8, (
        "grouped by question"
    )
    assert {r["sample"] for r in samples} == {0, 1, 2, 3}
    assert all({"format", "outcome", "process", "steps", "model_tokens"} <= set(r["scores"]) for r in samples)
    assert not (round_dir / "samples.parts").exists(), "parts are merged once sampling finished"

    pairs = list(read_pairs(round_dir / "pairs.jsonl"))
    stats = json.loads((round_dir / "pair_stats.json").read_text())["stats"]
    assert stats["pairs"] == len(pairs) >= 1 and stats["questions"] == 8 and stats["samples"] == 32
    by_sample = {(r["id"], r["sample"]): r for r in samples}
    for pair in pairs:  # each side is a sampled trajectory, token for token
        for side in ("chosen", "rejected"):
            sampled = by_sample[(pair["id"], pair[side]["sample"])]
            assert pair[side]["completion_ids"] == sampled["completion_ids"]
            assert pair[side]["env_mask"] == sampled["env_mask"]

    training = json.loads((round_dir / "training.json").read_text())
    assert training["pairs"] == len(pairs) and training["dropped_for_length"] == 0
    assert 0.0 <= training["pairs_reward_accuracy"] <= 1.0 and training["pairs_evaluated"] == min(
        8, len(pairs)
    )

    # round-1 is a plain HF model folder with its tokenizer and the run config evaluation reads
    assert load_policy(round_dir, dtype="float32") is not None and load_tokenizer(round_dir) is not None
    assert training_defaults(round_dir).rollout.max_turns == 2

    summaries = rows(run / "rounds.jsonl")
    assert [s["round"] for s in summaries] == [0, 1]
    assert summaries[0]["heldout"]["count"] == 16 and summaries[1]["heldout"]["count"] == 16
    assert summaries[1]["started_from"] == str(SYNTHETIC_DIR.relative_to(REPO_ROOT) / "warmstart")
    assert len(rows(round_dir / "heldout_predictions.jsonl")) == 16
    heldout = summaries[1]["heldout"]
    assert heldout["searches"] == pytest.approx((heldout["searches_1hop"] + heldout["searches_2hop"]) / 2)
    assert heldout["em"] == pytest.approx((heldout["em_1hop"] + heldout["em_2hop"]) / 2)
    assert "## " in (round_dir / "pair_examples.md").read_text()


def test_rounds_log_to_wandb_offline(finished_round):
    [offline] = (finished_round / "wandb").glob("offline-run-*")
    [records] = offline.glob("run-*.wandb")
    logged = records.read_bytes()
    # per-round metrics (round 0 and 1), the pair counts by type, and TRL's own DPO metrics in the same run
    for key in (b"heldout/em", b"heldout/searches", b"pairs/skip_rate", b"pairs/wrong", b"dpo/pairs_reward_accuracy",
                b"pairs/chosen_model_tokens", b"train/rewards/accuracies"):  # fmt: skip
        assert key in logged, key
    assert list(offline.glob("files/media/table/pairs/examples_round_1_*.table.json")), (
        "the example-pairs table"
    )


def test_resume_picks_up_at_the_last_finished_stage(finished_round, synthetic_bm25_server, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_round, run)
    round_dir = run / "round-1"
    client = RetrieverClient(synthetic_bm25_server)
    no_heldout = ("heldout.file=null",)

    with pytest.raises(RunError, match="already holds round-1 of a run: add --resume"):
        train_ipdpo(tiny(synthetic_bm25_server, run))

    # finished round: nothing is redone
    before = mtimes(round_dir, "samples.jsonl", "pairs.jsonl", "model.safetensors", "summary.json")
    searcher = CountingSearcher(client)
    train_ipdpo(tiny(synthetic_bm25_server, run, *no_heldout), resume=True, searcher=searcher)
    assert searcher.calls == 0 and mtimes(round_dir, *before) == before

    # trained but not summarized: the model is kept, only the round is finished
    (round_dir / "summary.json").unlink()
    before = mtimes(round_dir, "samples.jsonl", "pairs.jsonl", "model.safetensors")
    train_ipdpo(tiny(synthetic_bm25_server, run, *no_heldout), resume=True, searcher=searcher)
    assert searcher.calls == 0 and mtimes(round_dir, *before) == before
    assert (round_dir / "summary.json").is_file()

    # pairs built but not trained: train again on the same pairs, no sampling
    for name in ("summary.json", "training.json", "model.safetensors"):
        (round_dir / name).unlink()
    before = mtimes(round_dir, "samples.jsonl", "pairs.jsonl")
    train_ipdpo(tiny(synthetic_bm25_server, run, *no_heldout), resume=True, searcher=searcher)
    assert searcher.calls == 0 and mtimes(round_dir, *before) == before
    assert (round_dir / "model.safetensors").is_file()

    # sampled, pair settings changed: pairs rebuilt from the same samples
    for name in ("summary.json", "training.json", "model.safetensors"):
        (round_dir / name).unlink()
    before = mtimes(round_dir, "samples.jsonl")
    overrides = (*no_heldout, "pairs.max_pairs_per_question=1")
    train_ipdpo(tiny(synthetic_bm25_server, run, *overrides), resume=True, searcher=searcher)
    assert searcher.calls == 0 and mtimes(round_dir, *before) == before
    assert json.loads((round_dir / "pair_stats.json").read_text())["settings"]["max_pairs_per_question"] == 1
    assert len({p["id"] for p in read_pairs(round_dir / "pairs.jsonl")}) == len(
        list(read_pairs(round_dir / "pairs.jsonl"))
    )

    # one more round: round 1 untouched, round 2 starts from its policy
    before = mtimes(round_dir, "samples.jsonl", "pairs.jsonl", "model.safetensors")
    train_ipdpo(tiny(synthetic_bm25_server, run, *no_heldout, "rounds=2"), resume=True, searcher=searcher)
    assert searcher.calls > 0 and mtimes(round_dir, *before) == before
    summary = json.loads((run / "round-2" / "summary.json").read_text())
    assert summary["started_from"] == str(round_dir)
    assert summary["samples"]["count"] == 32
    assert [r["round"] for r in rows(run / "rounds.jsonl")] == [0, 1, 2], "each finished round once"


def test_resume_inside_the_dpo_epoch_matches_an_uninterrupted_round(synthetic_bm25_server, tmp_path):
    from safetensors.torch import load_file

    checkpoints = (
        "heldout.file=null",
        "trainer.save_strategy=steps",
        "trainer.save_steps=1",
        "trainer.seed=3",
    )
    full = tmp_path / "full"
    train_ipdpo(tiny(synthetic_bm25_server, full, *checkpoints))
    steps = sorted(int(p.name.split("-")[1]) for p in (full / "round-1" / "dpo").glob("checkpoint-*"))
    assert len(steps) >= 2, "the round must take several optimizer steps"

    # the same run, stopped after its first optimizer step
    part = tmp_path / "part"
    shutil.copytree(full, part)
    round_dir = part / "round-1"
    for name in ("summary.json", "training.json", "model.safetensors"):
        (round_dir / name).unlink()
    for step in steps[1:]:
        shutil.rmtree(round_dir / "dpo" / f"checkpoint-{step}")
    first = mtimes(round_dir / "dpo" / f"checkpoint-{steps[0]}", "model.safetensors")
    train_ipdpo(tiny(synthetic_bm25_server, part, *checkpoints), resume=True)
    assert mtimes(round_dir / "dpo" / f"checkpoint-{steps[0]}", *first) == first, "continued, not redone"

    resumed, uninterrupted = (
        load_file(round_dir / "model.safetensors"),
        load_file(full / "round-1" / "model.safetensors"),
    )
    for name, tensor in uninterrupted.items():
        assert resumed[name].allclose(tensor, atol=1e-6), name
    assert json.loads((round_dir / "training.json").read_text())["steps"] == steps[-1]


def test_a_lost_retriever_keeps_the_samples_and_resume_samples_only_the_rest(tmp_path, start_retriever):
    out = tmp_path / "run"
    parts = out / "round-1" / "samples.parts"
    index = _synthetic_index(tmp_path)
    config = tiny("http://127.0.0.1:9", out, "heldout.file=null")  # a searcher is passed in
    with start_retriever(index) as (url, process):

        def stop_after_the_first_batch():
            if parts.is_dir() and any(p.stat().st_size for p in parts.glob("*.jsonl")):
                stop(process)

        client = RetrieverClient(url, max_retries=1, backoff=0.01, timeout=2)
        with pytest.raises(RunError) as err:
            train_ipdpo(config, searcher=CountingSearcher(client, stop_after_the_first_batch), command="CMD")
    message = str(err.value)
    assert "retriever stayed down while sampling round 1" in message
    assert str(parts) in message and "CMD --resume" in message
    kept = rows(parts / "rank-0.jsonl")
    assert len(kept) == 4 * 4, "the first batch (4 questions × 4 samples) is kept"

    with start_retriever(index) as (url, _):
        train_ipdpo(config, resume=True, searcher=RetrieverClient(url))
    samples = rows(out / "round-1" / "samples.jsonl")
    assert len(samples) == 8 * 4
    by_key = {(r["id"], r["sample"]): r for r in samples}
    for row in kept:  # what was sampled before the failure is what the round uses
        assert by_key[(row["id"], row["sample"])]["completion_ids"] == row["completion_ids"]


def _synthetic_index(tmp_path: Path) -> Path:
    from retriever_server.build import build_index

    out = tmp_path / "index"
    if not out.is_dir():
        build_index(SYNTHETIC_DIR / "corpus.jsonl", out, index_type="bm25", progress=False)
    return out


def test_too_few_pairs_stop_with_the_reason_and_resume_rebuilds_them(synthetic_bm25_server, tmp_path):
    out = tmp_path / "run"
    base = ("heldout.file=null", "sampling.questions_per_round=4")
    with pytest.raises(RunError) as err:
        train_ipdpo(tiny(synthetic_bm25_server, out, *base, "pairs.min_pairs=1000"))
    message = str(err.value)
    assert "round 1:" in message and "(pairs.min_pairs = 1000); not training on so little" in message
    assert (out / "round-1" / "pair_stats.json").is_file() and not (out / "round-1" / "pairs.jsonl").exists()

    samples = mtimes(out / "round-1", "samples.jsonl")
    train_ipdpo(tiny(synthetic_bm25_server, out, *base, "pairs.min_pairs=1"), resume=True)
    assert mtimes(out / "round-1", "samples.jsonl") == samples, "the samples are reused, not drawn again"
    assert (out / "round-1" / "summary.json").is_file()


def test_given_pairs_train_round_one_without_a_retriever_and_lora_saves_a_plain_folder(
    finished_round, tmp_path, free_port
):
    given = finished_round / "round-1" / "pairs.jsonl"
    out = tmp_path / "run"
    config = tiny(
        f"http://127.0.0.1:{free_port()}",  # nothing listens: rounds=1 on given pairs needs no retriever
        out,
        f"pairs.file={given}",
        "heldout.file=null",
        "lora.enabled=true",
        "lora.r=4",
    )
    final = train_ipdpo(config)
    assert final == out / "round-1"
    assert (out / "round-1" / "pairs.jsonl").read_text() == given.read_text()
    assert not (out / "round-1" / "samples.jsonl").exists()
    assert (final / "model.safetensors").is_file() and not (final / "adapter").exists()
    assert "lora" not in json.dumps(json.loads((final / "config.json").read_text())).lower()
    load_policy(final, dtype="float32")


@pytest.mark.parametrize(
    ("text", "message"),
    [("", "holds no pairs"), ('{"id": "q1"}\n', ":1 (id q1): missing 'chosen'")],
)
def test_a_bad_pairs_file_stops_the_run_before_anything_loads(
    tmp_path, free_port, monkeypatch, text, message
):
    import autorefine.modeling as modeling

    monkeypatch.setattr(modeling, "load_policy", lambda *a, **k: pytest.fail("loaded a model"))
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(text)
    config = tiny(
        f"http://127.0.0.1:{free_port()}", tmp_path / "run", f"pairs.file={bad}", "heldout.file=null"
    )
    with pytest.raises(PairError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train_ipdpo(config)


def test_combinations_that_cannot_work_are_refused_at_start(tmp_path):
    with pytest.raises(ConfigError, match="loss_type is derived from nll_weight"):
        train_ipdpo(tiny("http://x", tmp_path, "trainer.loss_type=[ipo]"))
    with pytest.raises(RunError, match="sync_ref_model"):
        train_ipdpo(tiny("http://x", tmp_path, "trainer.sync_ref_model=true"))
    with pytest.raises(RunError, match=r"leave model\.tokenizer unset"):
        train_ipdpo(tiny("http://x", tmp_path, "model.tokenizer=data/synthetic/tokenizer"))


# --- several processes, and learning ------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_run_a_round_with_uneven_shares(synthetic_bm25_server, tmp_path, free_port):
    """cpu_2proc.yaml: 7 questions and 9 held-out questions split 4/3 and 5/4; nothing hangs, nothing is lost."""
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO_ROOT / "configs/accelerate/cpu_2proc.yaml"),
        "--main_process_port", str(free_port()),
        "-m", "autorefine.cli", "train-ipdpo",
        "--config", str(TINY_CPU),
        f"retriever.url={synthetic_bm25_server}",
        f"trainer.output_dir={out}",
        "rounds=1",
        "sampling.questions_per_round=7",
        "sampling.samples_per_question=4",
        "sampling.batch_questions=2",
        "heldout.limit=9",
        "pairs.min_pairs=1",
        "logging.pair_accuracy_pairs=4",
        "trainer.per_device_train_batch_size=2",
        "trainer.logging_steps=1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    samples = rows(out / "round-1" / "samples.jsonl")
    assert len(samples) == 7 * 4
    assert {r["rank"] for r in samples} == {0, 1}, "both processes sampled"
    assert sorted(sum(r["rank"] == rank for r in samples) for rank in (0, 1)) == [12, 16]
    summary = json.loads((out / "round-1" / "summary.json").read_text())
    assert summary["heldout"]["count"] == 9, "held-out predictions gathered from both processes"
    assert (out / "round-1" / "model.safetensors").is_file()


@pytest.mark.slow
def test_two_processes_train_a_round_on_precomputed_reference_log_probs(tmp_path, free_port):
    """cpu_2proc.yaml with trainer.precompute_ref_log_probs: the round's pairs are a dataset on disk, so TRL's
    cache of reference log-probs (written by process 0) is a file process 1 reads; the values are the
    warm start's masked log-probs, pair by pair."""
    from datasets import Dataset

    from tests.helpers import DOCS, RIGHT, SEARCH, WRONG, masked_logp, side, write_pairs

    hedges = [("model", " I am not sure." * i) for i in range(8)]  # pairs of different lengths
    pairs = [(side(SEARCH, DOCS, RIGHT), side(SEARCH, DOCS, WRONG, hedge)) for hedge in hedges]
    given = write_pairs(tmp_path / "given.jsonl", pairs)
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO_ROOT / "configs/accelerate/cpu_2proc.yaml"),
        "--main_process_port", str(free_port()),
        "-m", "autorefine.cli", "train-ipdpo",
        "--config", str(TINY_CPU),
        f"retriever.url=http://127.0.0.1:{free_port()}",  # given pairs, no held-out set: no retriever
        f"trainer.output_dir={out}",
        "rounds=1",
        f"pairs.file={given}",
        "pairs.min_pairs=1",
        "heldout.file=null",
        "logging.pair_accuracy_pairs=4",
        "trainer.precompute_ref_log_probs=true",
        "trainer.per_device_train_batch_size=2",
        "trainer.logging_steps=1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    round_dir = out / "round-1"
    training = json.loads((round_dir / "training.json").read_text())
    assert training["pairs"] == 8 and training["steps"] == 2 and training["pairs_evaluated"] == 4
    assert (round_dir / "model.safetensors").is_file()

    cache_files = sorted((round_dir / "pairs.arrow").glob("cache-*.arrow"))
    caches = {len(d): d for d in (Dataset.from_file(str(path)) for path in cache_files)}
    assert sorted(caches) == [4, 8], "one cache for the training pairs, one for the evaluated ones"
    warmstart = load_policy(SYNTHETIC_DIR / "warmstart", dtype="float32").eval()
    for index, column in enumerate(("ref_chosen_logps", "ref_rejected_logps")):
        expected = [masked_logp(warmstart, pair[index]) for pair in pairs]
        assert caches[8][column] == pytest.approx(expected, abs=1e-3), column


@pytest.mark.slow
def test_one_round_from_the_warm_start_learns_from_its_pairs(synthetic_bm25_server, tmp_path):
    """CI proof: pairs are built, DPO prefers the chosen side of its training pairs, held-out EM holds."""
    out = tmp_path / "run"
    config = tiny(
        synthetic_bm25_server,
        out,
        "sampling.questions_per_round=96",
        "sampling.batch_questions=48",
        "sampling.samples_per_question=8",
        "heldout.limit=150",
        "heldout.batch_size=150",
        "logging.pair_accuracy_pairs=128",
        "trainer.per_device_train_batch_size=8",
        "trainer.logging_steps=5",
    )
    train_ipdpo(config)
    start, after = rows(out / "rounds.jsonl")
    assert after["pairs"]["pairs"] >= 30, after["pairs"]
    assert after["dpo"]["pairs_reward_accuracy"] > 0.6, after["dpo"]
    assert after["heldout"]["em"] >= start["heldout"]["em"] - 0.02, (start["heldout"], after["heldout"])


@pytest.mark.slow
def test_one_round_from_the_over_searching_warm_start_cuts_searches(multihop_bm25_server, tmp_path):
    """IP-DPO's promise where it applies (benchmarks/ipdpo_efficiency.py): from a policy that searches about
    twice where once suffices, one round's process-ranked pairs lower held-out searches per question."""
    from autorefine.config import IPDPORunConfig
    from autorefine.settings import load_config

    out = tmp_path / "run"
    config = load_config(
        IPDPORunConfig,
        REPO_ROOT / "configs" / "ipdpo" / "tiny-cpu-oversearch.yaml",
        [
            f"retriever.url={multihop_bm25_server}",
            f"trainer.output_dir={out}",
            "rounds=1",
            "sampling.questions_per_round=64",
            "logging.pair_accuracy_pairs=64",
        ],
    )
    train_ipdpo(config)
    start, after = rows(out / "rounds.jsonl")
    stats = json.loads((out / "round-1" / "pair_stats.json").read_text())["stats"]
    assert after["pairs"]["pairs"] >= 16, after["pairs"]
    assert start["heldout"]["searches"] >= 2.0  # the warm start over-searches
    # Measured: 2.49 -> 2.12 searches (one round of 64 questions); 0.2 is one search saved on every 5th question.
    assert after["heldout"]["searches"] <= start["heldout"]["searches"] - 0.2, (
        start["heldout"],
        after["heldout"],
    )
    # Measured: EM 0.326 -> 0.267; the first round costs some EM that round 2 wins back in the benchmark
    # (BENCHMARKS "IP-DPO where it applies"), so this only guards against a collapse.
    assert after["heldout"]["em"] >= start["heldout"]["em"] - 0.1, (start["heldout"], after["heldout"])
    assert stats["chosen"]["steps"] < stats["rejected"]["steps"], stats  # what the pairs taught
