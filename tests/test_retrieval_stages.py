"""Hybrid fusion, chunked search, reranking, result cache and bf16 query encoding, through real servers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from autorefine.modeling import load_tokenizer, tiny_qwen2
from retriever_server.app import Retriever, ServeConfig, plan_serving
from retriever_server.build import build_index
from retriever_server.cli import main as cli_main
from retriever_server.composite import chunk_text
from retriever_server.search import RRF_K, Fusion, rrf
from tests.helpers import DEMO_CORPUS, QWEN_TOKENIZER

QUERIES = ["Shirley Temple diplomat", "Corliss Archer radio program", "Kiss and Tell 1945 film"]


def _retrieve(url: str, queries: list[str], topk: int, **extra: Any) -> dict[str, Any]:
    response = httpx.post(
        f"{url}/retrieve", json={"queries": queries, "topk": topk, "return_scores": True, **extra}, timeout=60
    )
    assert response.status_code == 200, response.text
    return response.json()


def _ids(payload: dict[str, Any]) -> list[list[str]]:
    return [[hit["document"]["id"] for hit in hits] for hits in payload["result"]]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 60 demo passages (HotpotQA paragraphs)."""
    path = tmp_path_factory.mktemp("small") / "corpus.jsonl"
    with DEMO_CORPUS.open("rb") as src:
        path.write_bytes(b"".join(line for _, line in zip(range(60), src, strict=False)))
    return path


@pytest.fixture(scope="module")
def hybrid_index(tmp_path_factory: pytest.TempPathFactory, small_corpus: Path) -> Path:
    out = tmp_path_factory.mktemp("hybrid")
    build_index(small_corpus, out, encoder="hybrid", progress=False)
    return out


# ---- hybrid --------------------------------------------------------------------------------------------


def test_rrf_weights_and_constant() -> None:
    scores, rows = rrf([(0.4, np.array([1, 2, -1])), (0.6, np.array([2, 3, 1]))], 3, 60)
    assert rows == [2, 1, 3]  # 2: 0.4/62 + 0.6/61 beats 1: 0.4/61 + 0.6/63
    assert scores[0] == pytest.approx(0.4 / 62 + 0.6 / 61)
    assert scores[2] == pytest.approx(0.6 / 62)
    assert RRF_K == 60


def test_hybrid_folder_holds_both_members_and_serves_fused_scores(
    hybrid_index: Path, start_retriever: Any
) -> None:
    manifest = json.loads((hybrid_index / "manifest.json").read_text())
    assert manifest["index"]["type"] == "hybrid"
    assert (hybrid_index / "member-bm25" / "manifest.json").is_file()
    assert (hybrid_index / "member-dense" / "manifest.json").is_file()
    bm25 = Retriever.load(plan_serving(ServeConfig(index_dir=hybrid_index / "member-bm25")))
    dense = Retriever.load(plan_serving(ServeConfig(index_dir=hybrid_index / "member-dense")))
    with start_retriever(hybrid_index, max_topk=60) as (url, _):
        health = httpx.get(f"{url}/health").json()
        assert (health["index_type"], health["score_kind"]) == ("hybrid", "rrf")
        fused = _retrieve(url, QUERIES, 5)
    assert fused["score_kind"] == "rrf"
    # Expected: weighted RRF of each member's ranking over all 60 rows, default weights.
    weights = Fusion()
    for query, hits in zip(QUERIES, fused["result"], strict=True):
        b = bm25.search([query], 50)[1][0]
        d = dense.search([query], 50)[1][0]
        scores, rows = rrf([(weights.bm25_weight, b), (weights.dense_weight, d)], 5, RRF_K)
        assert [hit["document"]["id"] for hit in hits] == [bm25.store.get(r)["id"] for r in rows]
        assert [hit["score"] for hit in hits] == pytest.approx(scores)


def test_hybrid_weight_one_member_reproduces_that_member(hybrid_index: Path, start_retriever: Any) -> None:
    bm25 = Retriever.load(plan_serving(ServeConfig(index_dir=hybrid_index / "member-bm25")))
    with start_retriever(hybrid_index, bm25_weight=1, dense_weight=0) as (url, _):
        only_bm25 = _ids(_retrieve(url, QUERIES, 4))
    expected = [[bm25.store.get(int(r))["id"] for r in rows] for rows in bm25.search(QUERIES, 4)[1]]
    assert only_bm25 == expected


def test_fusion_options_on_a_plain_index_are_refused(small_corpus: Path, tmp_path: Path) -> None:
    build_index(small_corpus, tmp_path, encoder="bm25", index_type="bm25", progress=False)
    with pytest.raises(ValueError, match="fusion options apply to hybrid indexes"):
        plan_serving(ServeConfig(index_dir=tmp_path, fusion=Fusion(bm25_weight=0.5)))
    with pytest.raises(ValueError, match="both 0"):
        Fusion(bm25_weight=0, dense_weight=0)


def test_dense_encoder_without_hybrid_is_refused(small_corpus: Path, tmp_path: Path, capsys: Any) -> None:
    code = cli_main(
        [
            "build",
            "--corpus",
            str(small_corpus),
            "--out",
            str(tmp_path),
            "--dense-encoder",
            "x",
            "--no-progress",
        ]
    )
    assert code == 1
    assert "--dense-encoder goes with --encoder hybrid" in capsys.readouterr().err


# ---- chunked -------------------------------------------------------------------------------------------


def test_chunk_text_keeps_sentences_whole_within_the_budget() -> None:
    def words(text: str) -> int:
        return len(text.split())

    text = "One two three. Four five six seven. Eight nine ten eleven twelve thirteen fourteen fifteen."
    assert chunk_text(text, 7, words) == [
        "One two three. Four five six seven.",
        "Eight nine ten eleven twelve thirteen fourteen",
        "fifteen.",
    ]
    assert chunk_text("Supercalifragilistic word", 1, words) == ["Supercalifragilistic", "word"]


def test_a_chunk_size_that_cannot_hold_a_word_is_refused(
    small_corpus: Path, tmp_path: Path, capsys: Any
) -> None:
    args = ["build", "--corpus", str(small_corpus), "--out", str(tmp_path), "--encoder", "bm25"]
    assert cli_main([*args, "--chunk-tokens", "3", "--no-progress"]) == 1
    assert "--chunk-tokens 3 cannot hold a word" in capsys.readouterr().err


@pytest.mark.parametrize(
    "encoder",
    ["bm25", pytest.param(None, marks=pytest.mark.slow), pytest.param("hybrid", marks=pytest.mark.slow)],
)
def test_chunked_search_returns_whole_parents_deduplicated(
    encoder: str | None, small_corpus: Path, tmp_path: Path, start_retriever: Any
) -> None:
    build_index(small_corpus, tmp_path, encoder=encoder, chunk_tokens=24, progress=False)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["index"]["type"] == "chunked"
    assert manifest["index"]["chunks"] > 60  # passages of several sentences make several chunks
    corpus = {
        row["id"]: row["contents"] for row in map(json.loads, small_corpus.read_text("utf-8").splitlines())
    }
    # A sentence from the middle of a long passage finds that passage, returned whole.
    target_id, target = max(corpus.items(), key=lambda item: len(item[1]))
    sentence = target.split(". ")[2]
    with start_retriever(tmp_path, max_topk=60) as (url, _):
        payload = _retrieve(url, [sentence, *QUERIES], 10)
        everything = _retrieve(url, ["the"], 60)
    assert payload["score_kind"].startswith("best_chunk_")
    first = payload["result"][0][0]["document"]
    assert (first["id"], first["contents"]) == (target_id, target)
    for hits in payload["result"]:
        ids = [hit["document"]["id"] for hit in hits]
        assert len(ids) == 10 and len(set(ids)) == 10  # parents, each once
        assert all(hit["document"]["contents"] == corpus[hit["document"]["id"]] for hit in hits)
        scores = [hit["score"] for hit in hits]
        assert scores == sorted(scores, reverse=True)
    if encoder != "bm25":  # BM25 scores only passages sharing a word with "the" (a stopword: none)
        assert len(set(_ids(everything)[0])) == 60


# ---- reranking -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_judge(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = load_tokenizer(QWEN_TOKENIZER)
    model = tiny_qwen2(
        tokenizer, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, vocab_size=151936
    )
    out = tmp_path_factory.mktemp("tiny-judge")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize(
    ("mode", "score_kind"), [("query-likelihood", "rerank_query_logprob"), ("yes-no", "rerank_logodds")]
)
def test_rerank_rescores_the_top_candidates(
    small_corpus: Path, tmp_path: Path, tiny_judge: Path, start_retriever: Any, mode: str, score_kind: str
) -> None:
    build_index(small_corpus, tmp_path, encoder="bm25", index_type="bm25", progress=False)
    plain = Retriever.load(plan_serving(ServeConfig(index_dir=tmp_path)))
    config = {"rerank": tiny_judge, "rerank_depth": 6, "rerank_dtype": "fp32", "rerank_mode": mode}
    with start_retriever(tmp_path, **config) as (url, _):
        payload = _retrieve(url, QUERIES, 3)
        health = httpx.get(f"{url}/health").json()
        stats = httpx.get(f"{url}/stats").json()
    assert payload["score_kind"] == health["score_kind"] == score_kind
    assert health["rerank_depth"] == 6 and health["rerank_mode"] == mode and stats["rerank_seconds"] > 0
    candidates = plain.search(QUERIES, 6)[1]
    from retriever_server.rerank import load_reranker

    judge = load_reranker(str(tiny_judge), dtype="fp32", mode=mode)
    for query, rows, hits in zip(QUERIES, candidates, payload["result"], strict=True):
        pool = [plain.store.get(int(r)) for r in rows]
        scores = judge.score([(query, doc["contents"]) for doc in pool])
        order = sorted(range(6), key=lambda i: -scores[i])[:3]
        assert [hit["document"]["id"] for hit in hits] == [pool[i]["id"] for i in order]
        assert [hit["score"] for hit in hits] == pytest.approx([scores[i] for i in order], abs=1e-4)


def _ql_pairs(small_corpus: Path) -> list[tuple[str, str]]:
    """Queries and passages of clearly different token lengths, so a batch is padded."""
    passages = [json.loads(line)["contents"] for line in small_corpus.read_text("utf-8").splitlines()[:4]]
    passages.append("Short.")
    queries = [*QUERIES, "who?", "which 1945 film starred the actress who later became a diplomat"]
    return [(q, p) for q, p in zip(queries, passages, strict=True)]


def test_query_likelihood_batched_equals_one_at_a_time(small_corpus: Path, tiny_judge: Path) -> None:
    from retriever_server.rerank import load_reranker

    judge = load_reranker(str(tiny_judge), dtype="fp32", batch_size=8, mode="query-likelihood")
    pairs = _ql_pairs(small_corpus)
    lengths = {sum(map(len, judge.query_tokens(q, p))) for q, p in pairs}
    assert len(lengths) == len(pairs)  # every row of the batch but the longest is padded
    batched = judge.score(pairs)
    alone = [judge.score([pair])[0] for pair in pairs]
    assert batched == pytest.approx(alone, abs=1e-4)
    assert len({round(x, 4) for x in batched}) == len(pairs)


def test_query_likelihood_scores_only_query_tokens(small_corpus: Path, tiny_judge: Path) -> None:
    import torch

    from retriever_server.rerank import MAX_PASSAGE_TOKENS, load_reranker

    judge = load_reranker(str(tiny_judge), dtype="fp32", mode="query-likelihood")
    long_passage = " ".join(["Corliss Archer"] * 400)
    pairs = [*_ql_pairs(small_corpus), ("Corliss Archer radio program", long_passage)]
    scores = judge.score(pairs)
    for (query, passage), score in zip(pairs, scores, strict=True):
        prefix, target = judge.query_tokens(query, passage)
        assert target == judge.tokenizer.encode(" " + query, add_special_tokens=False)
        assert len(prefix) < MAX_PASSAGE_TOKENS + 40  # the passage is cut
        ids = torch.tensor([prefix + target])
        with torch.inference_mode():
            logp = torch.log_softmax(judge.model(ids).logits[0, :-1].float(), -1)
        per_token = logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]]
        assert score == pytest.approx(per_token[-len(target) :].mean().item(), abs=1e-4)
        assert score != pytest.approx(per_token.mean().item(), abs=1e-4)  # the passage part is not counted


def test_unknown_reranker_is_refused_at_start(small_corpus: Path, tmp_path: Path, minilm_dir: Path) -> None:
    build_index(small_corpus, tmp_path, encoder="bm25", index_type="bm25", progress=False)
    with pytest.raises(ValueError, match="unknown reranker 'cross-encoder/ms-marco"):
        plan_serving(ServeConfig(index_dir=tmp_path, rerank="cross-encoder/ms-marco-MiniLM-L-6-v2"))
    with pytest.raises(ValueError, match="is not a causal language model"):
        plan_serving(ServeConfig(index_dir=tmp_path, rerank=str(minilm_dir)))


def test_unknown_rerank_mode_is_refused_at_start(
    small_corpus: Path, tmp_path: Path, tiny_judge: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    build_index(small_corpus, tmp_path, encoder="bm25", index_type="bm25", progress=False)
    with pytest.raises(
        ValueError, match="unknown rerank mode 'listwise' \\(choose from query-likelihood, yes-no\\)"
    ):
        plan_serving(ServeConfig(index_dir=tmp_path, rerank=str(tiny_judge), rerank_mode="listwise"))
    args = ["serve", "--index", str(tmp_path), "--rerank", str(tiny_judge), "--rerank-mode", "listwise"]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    assert exit_info.value.code == 2
    assert "--rerank-mode: invalid choice: 'listwise'" in capsys.readouterr().err


# ---- cache and bf16 ------------------------------------------------------------------------------------


def test_repeated_queries_are_served_from_the_cache(hybrid_index: Path, start_retriever: Any) -> None:
    with start_retriever(hybrid_index) as (url, _):
        first = _retrieve(url, QUERIES, 3)
        again = _retrieve(url, [QUERIES[0], QUERIES[0], "a new query"], 3)
        other_k = _retrieve(url, [QUERIES[0]], 2)
        cache = httpx.get(f"{url}/health").json()["cache"]
    assert again["result"][0] == again["result"][1] == first["result"][0]
    assert _ids(other_k)[0] == _ids(first)[0][:2]
    # Lookups per distinct (query, topk) of a batch: 3 misses, then 1 hit + 1 miss, then 1 miss.
    assert (cache["hits"], cache["misses"], cache["batch_duplicates"]) == (1, 5, 1)
    assert cache["hit_rate"] == pytest.approx(1 / 6, abs=1e-6)
    with start_retriever(hybrid_index, cache_size=0) as (url, _):
        _retrieve(url, QUERIES, 3)
        _retrieve(url, QUERIES, 3)
        cache = httpx.get(f"{url}/health").json()["cache"]
    assert (cache["hits"], cache["size"]) == (0, 0)


def test_bf16_query_encoder_keeps_the_ranking(hybrid_index: Path, start_retriever: Any) -> None:
    dense = hybrid_index / "member-dense"
    fp32 = Retriever.load(plan_serving(ServeConfig(index_dir=dense)))
    bf16 = Retriever.load(plan_serving(ServeConfig(index_dir=dense, encoder_dtype="bf16")))
    a = fp32.searcher.encode(QUERIES)
    b = bf16.searcher.encode(QUERIES)
    assert np.all(np.sum(a * b, axis=1) > 0.99)
    assert not np.array_equal(a, b)  # really another precision
    with start_retriever(dense, encoder_dtype="bf16") as (url, _):
        health = httpx.get(f"{url}/health").json()
        assert health["encoder_dtype"] == "bf16"
        assert _ids(_retrieve(url, QUERIES, 1)) == [
            [fp32.store.get(int(r[0]))["id"]] for r in fp32.search(QUERIES, 1)[1]
        ]
    with pytest.raises(ValueError, match="needs a dense encoder"):
        plan_serving(ServeConfig(index_dir=hybrid_index / "member-bm25", encoder_dtype="bf16"))


@pytest.mark.slow  # two servers and the wiki200 MiniLM index
def test_searchr1_style_dense_baseline_ranks_like_our_flat_index(
    wiki200_corpus: Path, wiki200_flat_index: Path, start_searchr1_server: Any, start_retriever: Any
) -> None:
    # The throughput baseline of benchmarks/retrieval.py must answer what ours answers, or the race is unfair.
    queries = ["Aaron priest of Israel", "Moses brother", "Egypt pharaoh"]
    with start_searchr1_server(wiki200_corpus, dense_index=wiki200_flat_index) as (url, _):
        theirs = _ids(_retrieve(url, queries, 3))
    with start_retriever(wiki200_flat_index) as (url, _):
        ours = _ids(_retrieve(url, queries, 3))
    assert theirs == ours


def test_cache_hit_rate_reaches_the_training_logs(demo_bm25_index: Path, start_retriever: Any) -> None:
    from collections import defaultdict
    from types import SimpleNamespace

    from autorefine.retrieval import RetrieverClient
    from autorefine.training.callbacks import RetrieverCacheCallback

    trainer = SimpleNamespace(_metrics=defaultdict(lambda: defaultdict(list)))
    with start_retriever(demo_bm25_index) as (url, _):
        client = RetrieverClient([url])
        client.search(["before training"])
        callback = RetrieverCacheCallback(trainer, client.server_cache)
        callback.on_train_begin(None, None, None)
        client.search(["Shirley Temple", "Shirley Temple", "Corliss Archer"])  # 2 distinct: 2 misses
        client.search(["Shirley Temple", "Meet Corliss Archer"])  # 1 hit, 1 miss
        callback.on_step_end(None, None, None)
        client.search(["Shirley Temple"])  # 1 hit
        callback.on_step_end(None, None, None)
        client.close()
    assert trainer._metrics["train"]["retriever/cache_hit_rate"] == [pytest.approx(1 / 4), 1.0]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--encoder", "hybrid", "--index-type", "bm25"], "--encoder hybrid builds BM25 itself"),
        (
            ["--chunk-tokens", "64", "--import-faiss", "x.index"],
            "--chunk-tokens does not apply to --import-faiss",
        ),
    ],
)
def test_combinations_that_cannot_work_are_refused(
    extra: list[str], message: str, small_corpus: Path, tmp_path: Path, capsys: Any
) -> None:
    args = ["build", "--corpus", str(small_corpus), "--out", str(tmp_path), "--no-progress", *extra]
    assert cli_main(args) == 1
    assert message in capsys.readouterr().err
