"""Evaluation: hand-computed metrics and tables, dataset files, training defaults, and real end-to-end runs.

End-to-end runs use the warm-start synthetic policy (it searches and answers, greedy EM ≈ 50%) with a real
BM25 server over the synthetic corpus, and a tiny random Qwen2 on the seven demo benchmarks.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from autorefine.cli import main
from autorefine.data import DataError, Question
from autorefine.evaluation.benchmark import (
    PREDICTIONS_FILE,
    PredictionsFile,
    evaluate_benchmarks,
)
from autorefine.evaluation.datasets import BENCHMARKS, parse_dataset_specs, resolve_question_file
from autorefine.evaluation.esc import ESCSettings, normalized, run_esc
from autorefine.evaluation.policy import EvaluationError, find_run_config, resolve_rollout, training_defaults
from autorefine.evaluation.predictions import Prediction, aggregate
from autorefine.evaluation.report import group_averages, markdown_table, write_csv
from autorefine.evaluation.runner import GREEDY_DECODING, Decoding, voted_prediction
from autorefine.modeling import load_policy, load_tokenizer, tiny_qwen2
from autorefine.protocol import PromptTemplate
from autorefine.retrieval import RetrieverClient
from autorefine.rollout import AgentLoop, RolloutSettings
from autorefine.rollout.hf_engine import TransformersEngine
from autorefine.rollout.trajectory import FinishReason, Segment, Trajectory
from autorefine.scoring.reward import RewardSettings
from autorefine.scoring.trajectory import score_trajectory
from tests.helpers import DEMO_DIR, QWEN_TOKENIZER, SYNTHETIC_DIR

WARMSTART = SYNTHETIC_DIR / "warmstart"
HELDOUT = SYNTHETIC_DIR / "heldout.jsonl"
TEMPLATE = SYNTHETIC_DIR / "template.txt"
# The limits the warm start was trained with (configs/sft/synthetic-warmstart.yaml).
SYNTHETIC_ROLLOUT = RolloutSettings(
    max_turns=2, max_new_tokens=48, max_obs_tokens=160, max_completion_tokens=320, topk=3
)
ROLLOUT_FLAGS = [
    "--template", str(TEMPLATE), "--max-turns", "2", "--max-new-tokens", "48",
    "--max-obs-tokens", "160", "--max-completion-tokens", "320", "--topk", "3",
]  # fmt: skip


# --- hand-built trajectories ----------------------------------------------------------------------------


def trajectory(*parts: tuple[str, str, int], queries: tuple[str, ...] = (), finish=FinishReason.ANSWER):
    """A trajectory from (kind, text, number of tokens) parts."""
    t = Trajectory(prompt_ids=[0])
    for kind, text, n in parts:
        start = len(t.completion_ids)
        t.segments.append(Segment(kind, text, start, start + n))
        t.completion_ids += [1] * n
        t.env_mask += [1 if kind == "model" else 0] * n
    t.queries = list(queries)
    t.finish_reason = finish
    return t


PARIS = trajectory(
    ("model", "<think> capital </think><search> capital of France </search>", 10),
    ("documents", "<documents> Doc 1(Title: France) Paris is the capital of France. </documents>", 20),
    ("model", "<refine> Paris is the capital </refine><answer> Paris </answer>", 12),
    queries=("capital of France",),
)
CURIE = trajectory(("model", "<think> hmm </think><answer> Curie </answer>", 8))
NEW_YORK = trajectory(
    ("model", "<search> big apple </search>", 6),
    ("documents", "<documents> Doc 1(Title: NYC) New York City is big. </documents>", 15),
    ("model", "<refine> New York City </refine>", 6),
    queries=("big apple",),
    finish=FinishReason.MAX_TURNS,
)


def scored(t: Trajectory, golds: list[str]) -> dict[str, float]:
    return score_trajectory(t, Question("q", "?", golds)).as_dict()


def prediction(t: Trajectory, golds: list[str], qid: str = "q") -> Prediction:
    return Prediction(qid, "?", golds, t.answer, scored(t, golds), t.to_dict(), searches=t.num_searches)


def test_metrics_match_hand_computation():
    preds = [
        prediction(PARIS, ["Paris"]),  # right, evidence retrieved and refined
        prediction(CURIE, ["Marie Curie"]),  # half the gold tokens: F1 = 2·1·0.5 / 1.5 = 2/3
        prediction(NEW_YORK, ["New York"]),  # no answer, but the documents and the refine hold it
    ]
    m = aggregate(preds)
    expected = {
        "count": 3,
        "em": 1 / 3,
        "f1": (1 + 2 / 3 + 0) / 3,
        "cover_em": 1 / 3,
        "retrieval_success": 2 / 3,
        "refine_hit": 2 / 3,
        "format": 2 / 3,  # think … answer in order; NEW_YORK neither thinks first nor answers
        "searches": 2 / 3,
        "samples": 1,
        "model_tokens": (22 + 8 + 12) / 3,
        "document_tokens": (20 + 0 + 15) / 3,
        # document words (11 + 10, tags included) over refine words (4 + 3)
        "compression": 21 / 7,
        "finish_answer": 2 / 3,
        "finish_max_turns": 1 / 3,
        "finish_length": 0,
        "finish_no_action": 0,
    }
    for key, value in expected.items():
        assert m[key] == pytest.approx(value), key
    assert "saving" not in m  # greedy predictions have no sample budget


def test_cover_em_counts_a_gold_inside_a_longer_answer():
    t = trajectory(("model", "<answer> new york city </answer>", 6))
    scores = scored(t, ["New York"])
    assert (scores["em"], scores["cover_em"]) == (0.0, 1.0)
    assert scores["f1"] == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))  # precision 2/3, recall 1


def test_voted_prediction_scores_the_winner_and_sums_the_costs():
    lyon = trajectory(
        ("model", "<search> x </search>", 3), ("model", "<answer> Lyon </answer>", 5), queries=("x",)
    )
    # Window 1 (Paris, Lyon) disagrees; window 2 (Paris, Paris) agrees: 4 of 6 samples.
    samples = [CURIE, lyon, PARIS, PARIS]
    served = iter(samples)
    config = ESCSettings(window=2, max_samples=6)
    [result] = run_esc(1, lambda idx: [next(served) for _ in idx], config)
    p = voted_prediction(Question("q1", "Capital?", ["Paris"]), result, config, RewardSettings())
    assert p.prediction == "Paris" and p.scores["em"] == 1.0
    assert p.trajectory["answer"] == "Paris" and p.scores["refine_hit"] == 1.0  # the winning trajectory's
    assert p.samples == 4 and p.searches == 0 + 1 + 1 + 1
    assert p.scores["model_tokens"] == 8 + 8 + 22 + 22
    assert p.scores["document_tokens"] == 20 + 20
    assert p.extra["stopped_early"] is True and p.extra["windows"] == 2
    assert p.extra["votes"] == {"curie": 1, "lyon": 1, "paris": 2}
    assert p.extra["answers"] == ["Curie", "Lyon", "Paris", "Paris"]
    # First window (Curie, Lyon): each p = 1/2, q = 2·(1/2)^2 = 1/2, windows of 2 up to 6 samples:
    # E = 2·(1·q + 2·q(1-q)) + 2·3·(1-q)^2 = 2·(0.5 + 0.5) + 1.5 = 3.5
    assert p.extra["expected_samples_first_window"] == pytest.approx(3.5)
    assert aggregate([p])["saving"] == pytest.approx(1 - 4 / 6)


def test_group_averages_and_tables(tmp_path):
    per_dataset = {
        "nq": {"count": 10, "em": 0.5, "f1": 0.6},
        "hotpotqa": {"count": 20, "em": 0.2, "f1": 0.3},
        "musique": {"count": 30, "em": 0.4, "f1": 0.5},
    }
    averages = group_averages(per_dataset)
    assert averages["single_hop"]["em"] == pytest.approx(0.5)
    assert averages["multi_hop"]["em"] == pytest.approx(0.3)  # (0.2 + 0.4) / 2: datasets weigh the same
    assert averages["overall"]["f1"] == pytest.approx((0.6 + 0.3 + 0.5) / 3)
    assert averages["overall"]["count"] == 60 and averages["multi_hop"]["datasets"] == ["hotpotqa", "musique"]

    metrics = {"datasets": per_dataset, "averages": averages}
    lines = markdown_table(metrics).splitlines()
    labels = [line.split("|")[1].strip() for line in lines[2:]]
    assert labels == ["nq", "hotpotqa", "musique", "single-hop avg", "multi-hop avg", "overall avg"]
    header = [c.strip() for c in lines[0].split("|")[1:-1]]
    assert lines[-1].split("|")[header.index("EM") + 1].strip() == f"{100 * 1.1 / 3:.1f}"
    assert "samples/q" not in header  # greedy: no self-consistency columns
    write_csv(metrics, tmp_path / "t.csv")
    rows = (tmp_path / "t.csv").read_text().splitlines()
    assert rows[0].startswith("dataset,count,em,f1") and rows[2].startswith("hotpotqa,20,0.2,0.3")


# --- datasets and run settings --------------------------------------------------------------------------


def question_file(path: Path, ids: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"id": i, "question": f"q {i}?", "golden_answers": ["a"]} for i in ids]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_dataset_files_prefer_test_then_dev_then_flat(tmp_path):
    dev = question_file(tmp_path / "nq" / "dev.jsonl", ["d"])
    assert resolve_question_file("nq", tmp_path, tmp_path) == dev
    test = question_file(tmp_path / "nq" / "test.jsonl", ["t"])
    assert resolve_question_file("nq", tmp_path, tmp_path) == test
    assert resolve_question_file("musique", DEMO_DIR / "benchmarks", tmp_path).name == "musique.jsonl"
    with pytest.raises(DataError, match=r"no question file for popqa .*popqa/test.jsonl.*popqa.jsonl"):
        resolve_question_file("popqa", tmp_path, tmp_path)


def test_dataset_specs():
    assert [n for n, _ in parse_dataset_specs("all")] == list(BENCHMARKS)
    assert parse_dataset_specs("nq, mine=x/y.jsonl") == [("nq", None), ("mine", Path("x/y.jsonl"))]
    with pytest.raises(DataError, match="nq more than once"):
        parse_dataset_specs("nq,all")


def test_training_run_config_gives_the_defaults(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoint-5").mkdir(parents=True)
    (run / "checkpoint-20").mkdir()
    (run / "final").mkdir()
    config = {
        "rollout": {"max_turns": 2, "topk": 4},
        "template": str(TEMPLATE),
        "reward": {"refine_bonus": 0.3},
    }
    (run / "checkpoint-20" / "autorefine_config.yaml").write_text(yaml.safe_dump(config))
    (run / "checkpoint-5" / "autorefine_config.yaml").write_text(
        yaml.safe_dump({"rollout": {"max_turns": 9}})
    )
    # `final/` has no config of its own: the newest checkpoint of its run says how it was trained.
    assert find_run_config(run / "final") == run / "checkpoint-20" / "autorefine_config.yaml"
    defaults = training_defaults(run / "final")
    assert defaults.rollout == RolloutSettings(max_turns=2, topk=4) and defaults.reward.refine_bonus == 0.3
    rollout, template = resolve_rollout(defaults, {"max_turns": None, "max_new_tokens": 64}, None)
    assert rollout == RolloutSettings(max_turns=2, topk=4, max_new_tokens=64)
    assert template.source == str(TEMPLATE)
    assert training_defaults(tmp_path / "elsewhere").source is None


def test_bad_question_lines_fail_with_file_line_and_id(tmp_path, capsys):
    good = question_file(tmp_path / "good.jsonl", ["a"])
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(good.read_text() + "{not json\n")
    no_golds = tmp_path / "nogold.jsonl"
    no_golds.write_text(good.read_text() + json.dumps({"id": "b7", "question": "Who?"}) + "\n")
    for path, fragment in ((bad_json, f"{bad_json}:2: not valid JSON"), (no_golds, f"{no_golds}:2 (id b7)")):
        # No model and no retriever exist here: the files are checked before either is touched.
        code = main(
            ["evaluate", "--model", str(tmp_path / "none"), "--retriever-url", "http://127.0.0.1:9",
             "--datasets", f"good={good},bad={path}", "--out", str(tmp_path / "out")]
        )  # fmt: skip
        assert code == 2
        assert fragment in capsys.readouterr().err


# --- end to end with the warm-start policy and a real retriever -----------------------------------------


class CountingEngine:
    """The real engine, counting calls and prompts; optionally stopped like Ctrl-C at one call."""

    def __init__(self, engine: TransformersEngine, interrupt_at: int | None = None) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.eos_ids = engine.eos_ids
        self.interrupt_at = interrupt_at
        self.calls: list[int] = []
        self.contexts: list[tuple[int, ...]] = []

    def generate(self, prompts, max_new_tokens, params, stop):
        self.calls.append(len(prompts))
        self.contexts += [tuple(p) for p in prompts]
        if len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        return self.engine.generate(prompts, max_new_tokens, params, stop)


@pytest.fixture(scope="module")
def warmstart_engine():
    model = load_policy(WARMSTART, dtype="float32").eval()
    return TransformersEngine(model, load_tokenizer(WARMSTART))


@pytest.fixture(scope="module")
def synthetic_client(synthetic_bm25_server):
    with RetrieverClient(synthetic_bm25_server) as client:
        yield client


def loop_of(engine, client) -> AgentLoop:
    return AgentLoop(engine, client, SYNTHETIC_ROLLOUT, PromptTemplate.load(TEMPLATE))


def evaluate(engine, client, out: Path, decoding=GREEDY_DECODING, limit=12, batch_size=4):
    return evaluate_benchmarks(
        loop_of(engine, client),
        {"synthetic": HELDOUT},
        out,
        decoding,
        limit=limit,
        batch_size=batch_size,
        record={"model": "warmstart"},
        progress=False,
    )


def rows_by_id(out: Path) -> dict[str, dict]:
    return {key[1]: row for key, row in PredictionsFile(out / PREDICTIONS_FILE).rows.items()}


def test_greedy_evaluation_resumed_after_an_interruption_is_identical(
    tmp_path, warmstart_engine, synthetic_client
):
    full = evaluate(warmstart_engine, synthetic_client, tmp_path / "full")
    m = full["datasets"]["synthetic"]
    assert m["count"] == 12  # 3 whole batches of 4: nothing dropped
    assert 0 < m["em"] < 1 and m["searches"] > 0 and m["retrieval_success"] > 0
    rows = [json.loads(line) for line in (tmp_path / "full" / PREDICTIONS_FILE).read_text().splitlines()]
    golds = [json.loads(line) for line in HELDOUT.read_text().splitlines()[:12]]
    assert [r["id"] for r in rows] == [g["id"] for g in golds]  # input order
    assert all(r["trajectory"]["segments"] and r["golden_answers"] for r in rows)

    out = tmp_path / "resumed"
    interrupted = CountingEngine(warmstart_engine, interrupt_at=4)  # during the second batch
    with pytest.raises(KeyboardInterrupt):
        evaluate(interrupted, synthetic_client, out)
    kept = rows_by_id(out)
    assert 0 < len(kept) < 12 and len(kept) % 4 == 0  # whole batches only
    with (out / PREDICTIONS_FILE).open("a") as f:
        f.write('{"dataset": "synthetic", "id": "synth')  # a row cut by the interruption

    resumed_engine = CountingEngine(warmstart_engine)
    resumed = evaluate(resumed_engine, synthetic_client, out)
    assert resumed == full
    assert rows_by_id(out) == rows_by_id(tmp_path / "full")
    # Only the questions not kept were started again (a first turn's context is exactly the prompt).
    loop = loop_of(warmstart_engine, synthetic_client)
    started = {g["id"] for g in golds if tuple(loop.prompt_ids(g["question"])) in resumed_engine.contexts}
    assert started == {g["id"] for g in golds} - set(kept)

    again = CountingEngine(warmstart_engine)
    assert evaluate(again, synthetic_client, out) == full
    assert again.calls == []  # everything was there: no model call
    log = (out / "invocations.jsonl").read_text().splitlines()
    assert [json.loads(line)["new_questions"] for line in log] == [12 - len(kept), 0]

    with pytest.raises(EvaluationError, match="different decoding"):
        evaluate(warmstart_engine, synthetic_client, out, Decoding(mode="sc"))


def test_esc_and_sc_end_to_end(tmp_path, warmstart_engine, synthetic_client):
    config = ESCSettings(window=3, max_samples=6, temperature=0.7)
    engine = CountingEngine(warmstart_engine)
    esc = evaluate(
        engine, synthetic_client, tmp_path / "esc", Decoding("esc", config, seed=1), limit=5, batch_size=5
    )
    # One generate call per turn carries the first window of every question: 5 × 3 trajectories.
    assert engine.calls[0] == 15
    rows = list(rows_by_id(tmp_path / "esc").values())
    for r in rows:
        answers = [normalized(a) for a in r["extra"]["answers"]]
        assert r["samples"] == len(answers) in (3, 6)
        stopped = r["samples"] == 3
        assert r["extra"]["stopped_early"] == stopped
        if stopped:
            assert None not in answers[:3] and len(set(answers[:3])) == 1
        valid = [a for a in answers if a is not None]
        if valid:
            top = max(valid.count(a) for a in valid)
            assert valid.count(normalized(r["prediction"])) == top  # the majority answer
        assert r["searches"] == sum(r["extra"]["sample_searches"])
    m = esc["datasets"]["synthetic"]
    assert m["samples"] == pytest.approx(sum(r["samples"] for r in rows) / 5)
    assert m["saving"] == pytest.approx(sum(1 - r["samples"] / 6 for r in rows) / 5)
    assert esc["settings"]["decoding"]["esc"] == {"window": 3, "max_samples": 6, "temperature": 0.7}

    sc = evaluate(warmstart_engine, synthetic_client, tmp_path / "sc", Decoding("sc", config), limit=3)
    assert sc["datasets"]["synthetic"]["samples"] == 6 and sc["datasets"]["synthetic"]["saving"] == 0
    assert "samples/q" in (tmp_path / "sc" / "results.md").read_text()


def test_esc_resumed_after_an_interruption_is_identical(tmp_path, warmstart_engine, synthetic_client):
    decoding = Decoding("esc", ESCSettings(window=2, max_samples=4), seed=3)
    engine = CountingEngine(warmstart_engine)
    full = evaluate(engine, synthetic_client, tmp_path / "full", decoding, limit=6, batch_size=2)
    # Stopped at its very last model call, the run has written the first two of its three batches.
    cut = CountingEngine(warmstart_engine, interrupt_at=len(engine.calls))
    with pytest.raises(KeyboardInterrupt):
        evaluate(cut, synthetic_client, tmp_path / "cut", decoding, limit=6, batch_size=2)
    assert len(rows_by_id(tmp_path / "cut")) == 4
    # Each batch is seeded from (seed, dataset, batch index), so the redone batches draw the same samples.
    resumed = evaluate(warmstart_engine, synthetic_client, tmp_path / "cut", decoding, limit=6, batch_size=2)
    assert resumed == full
    assert rows_by_id(tmp_path / "cut") == rows_by_id(tmp_path / "full")  # every sample, not only the means


def test_cli_uses_and_records_the_checkpoints_training_limits(tmp_path, synthetic_bm25_server):
    model = tmp_path / "run" / "final"
    shutil.copytree(WARMSTART, model)
    trained = {"rollout": {**dataclasses.asdict(SYNTHETIC_ROLLOUT)}, "template": str(TEMPLATE)}
    (model / "autorefine_config.yaml").write_text(yaml.safe_dump(trained))
    out = tmp_path / "out"
    code = main(
        ["evaluate", "--model", str(model), "--retriever-url", synthetic_bm25_server,
         "--datasets", f"synthetic={HELDOUT}", "--limit", "4", "--out", str(out), "--no-progress",
         "--max-new-tokens", "40"]
    )  # fmt: skip
    assert code == 0
    settings = json.loads((out / "metrics.json").read_text())["settings"]
    assert settings["defaults_from"] == str(model / "autorefine_config.yaml")
    assert settings["rollout"] == {**dataclasses.asdict(SYNTHETIC_ROLLOUT), "max_new_tokens": 40}
    assert settings["overrides"] == {"max_new_tokens": 40} and settings["template"] == str(TEMPLATE)


def test_no_retrieval_answers_without_a_retriever(tmp_path, capsys):
    out = tmp_path / "closed"
    code = main(
        ["evaluate", "--model", str(WARMSTART), "--no-retrieval", "--datasets", f"synthetic={HELDOUT}",
         "--limit", "3", "--out", str(out), "--no-progress", "--max-new-tokens", "24"]
    )  # fmt: skip
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    settings, m = metrics["settings"], metrics["datasets"]["synthetic"]
    assert settings["retrieval"] is False and settings["rollout"]["max_turns"] == 0
    assert settings["template"] == "autorefine/templates/no_retrieval.txt"
    assert m["searches"] == 0 and m["document_tokens"] == 0 and m["count"] == 3
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    # The warm start was trained to search first: with no search allowed it ends at its turn budget.
    assert all(r["trajectory"]["num_turns"] == 1 and not r["trajectory"]["queries"] for r in rows)
    assert "| valid format |" in (out / "results.md").read_text()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--no-retrieval", "--max-turns", "2"],
            "--no-retrieval runs no search; --max-turns 2 contradicts it",
        ),
        ([], "a retriever URL is needed (--retriever-url), or --no-retrieval"),
    ],
)
def test_retrieval_flags_that_cannot_work_are_refused(tmp_path, capsys, flags, message):
    args = [
        "evaluate",
        "--model",
        str(WARMSTART),
        "--datasets",
        f"synthetic={HELDOUT}",
        "--out",
        str(tmp_path),
    ]
    assert main([*args, *flags]) == 2
    assert message in capsys.readouterr().err


def test_retriever_url_and_no_retrieval_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        main(["infer", "--model", "m", "--retriever-url", "http://127.0.0.1:9", "--no-retrieval", "q?"])
    assert "not allowed with argument" in capsys.readouterr().err


# --- the seven benchmarks with a tiny random model ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    tokenizer = load_tokenizer(QWEN_TOKENIZER)
    model = tiny_qwen2(
        tokenizer, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, vocab_size=151936
    )
    out = tmp_path_factory.mktemp("tiny-qwen2")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_cli_evaluates_the_seven_benchmarks_with_wandb_offline(
    tmp_path, tiny_model_dir, demo_bm25_server, monkeypatch, capsys
):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "eval"
    args = [
        "evaluate", "--model", str(tiny_model_dir), "--retriever-url", demo_bm25_server,
        "--data-dir", str(DEMO_DIR / "benchmarks"), "--out", str(out), "--limit", "2",
        "--max-turns", "1", "--max-new-tokens", "4", "--max-obs-tokens", "32",
        "--max-completion-tokens", "96", "--batch-size", "2", "--no-progress", "--wandb",
    ]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["datasets"]) == list(BENCHMARKS)
    assert all(m["count"] == 2 for m in metrics["datasets"].values())
    assert metrics["averages"]["single_hop"]["datasets"] == ["nq", "triviaqa", "popqa"]
    assert metrics["averages"]["overall"]["count"] == 14
    assert metrics["settings"]["rollout"]["max_new_tokens"] == 4
    assert metrics["settings"]["defaults_from"].startswith("package defaults")
    table = (out / "results.md").read_text()
    assert table.strip() in printed
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:]] == [
        *BENCHMARKS,
        "single-hop avg",
        "multi-hop avg",
        "overall avg",
    ]
    assert len((out / "results.csv").read_text().splitlines()) == 1 + 7 + 3
    for m in metrics["datasets"].values():  # a random model answers nothing, in some way
        assert math.isclose(sum(m[f"finish_{r.value}"] for r in FinishReason), 1.0)
    tables = list((out / "wandb").glob("offline-run-*/files/media/table/predictions_*.table.json"))
    assert len(tables) == 1 and len(json.loads(tables[0].read_text())["data"]) == 14


def test_vllm_engine_without_vllm_is_a_one_line_error(tmp_path, tiny_model_dir, demo_bm25_server, capsys):
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("vLLM is installed here")
    args = ["evaluate", "--model", str(tiny_model_dir), "--retriever-url", demo_bm25_server, "--engine", "vllm",
            "--datasets", f"nq={DEMO_DIR / 'benchmarks' / 'nq.jsonl'}", "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --engine vllm: vLLM is not installed") and len(err.splitlines()) == 1


def test_a_resumed_evaluation_refuses_another_engine_or_dtype(tmp_path, warmstart_engine, synthetic_client):
    def run(**record):
        return evaluate_benchmarks(
            loop_of(warmstart_engine, synthetic_client),
            {"synthetic": HELDOUT},
            tmp_path / "out",
            limit=2,
            batch_size=2,
            record={"model": "warmstart", **record},
            progress=False,
        )

    run(engine="transformers", dtype="float32")
    # bf16 or vLLM's kernels give other greedy trajectories: mixing them into one table is refused
    with pytest.raises(EvaluationError, match=r"different dtype \(was dtype=float32\)"):
        run(engine="transformers", dtype="bfloat16")
    with pytest.raises(EvaluationError, match="different engine"):
        run(engine="vllm", dtype="float32")
    run(engine="transformers", dtype="float32")  # the same identity resumes


def test_sampled_decoding_shows_progress_in_samples_drawn(
    tmp_path, warmstart_engine, synthetic_client, capsys
):
    decoding = Decoding("esc", ESCSettings(window=2, max_samples=4), seed=3)
    evaluate_benchmarks(
        loop_of(warmstart_engine, synthetic_client),
        {"synthetic": HELDOUT},
        tmp_path / "out",
        decoding,
        limit=3,
        batch_size=3,
        progress=True,
    )
    err = capsys.readouterr().err
    # the bar moves as each window of 3 questions × 2 samples returns, against a budget of 3 × 4 samples
    assert "6/12" in err and "12/12" in err and "sample" in err
