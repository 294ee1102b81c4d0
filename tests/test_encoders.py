"""Dense encoder conventions (pooling, prefixes, instruction, truncation) against hand computations."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from retriever_server.encoders import (
    BGE_QUERY_INSTRUCTION,
    EMBEDDED_NAME,
    DenseEncoder,
    EncoderError,
    EncoderSpec,
    bm25_tokenize,
    detect_family,
    resolve_encoder_spec,
)

TEXTS = [
    "Shirley Temple was an American actress.",
    "short",
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France; it is named after "
    "the engineer Gustave Eiffel, whose company designed and built the tower.",
]


@pytest.fixture(scope="module")
def hf_model(minilm_dir: Path) -> tuple[Any, Any]:
    """The raw transformers model and tokenizer, for hand computations."""
    return AutoTokenizer.from_pretrained(minilm_dir), AutoModel.from_pretrained(minilm_dir).eval()


def _by_hand(hf_model: tuple[Any, Any], texts: list[str], pooling: str, max_length: int = 256) -> np.ndarray:
    tokenizer, model = hf_model
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    if pooling == "cls":
        pooled = hidden[:, 0]
    else:
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
    return (pooled / pooled.norm(dim=-1, keepdim=True)).numpy()


@pytest.fixture(scope="module")
def forced(minilm_dir: Path) -> dict[str, DenseEncoder]:
    """MiniLM weights with each family's conventions forced (no e5/bge weights offline)."""
    return {
        family: DenseEncoder(resolve_encoder_spec(str(minilm_dir), family=family), batch_size=2)
        for family in ("e5", "bge")
    }


def test_default_is_embedded_minilm_with_mean_pooling(minilm_encoder: DenseEncoder) -> None:
    spec = minilm_encoder.spec
    assert spec.name == EMBEDDED_NAME
    assert (spec.family, spec.pooling, spec.max_length, spec.dim) == (
        "sentence-transformers",
        "mean",
        256,
        384,
    )
    assert (spec.query_prefix, spec.passage_prefix, spec.query_instruction) == ("", "", "")


def test_mean_pooling_equals_hand_computation(
    minilm_encoder: DenseEncoder, hf_model: tuple[Any, Any]
) -> None:
    # Mixed lengths: padding and the encoder's length sort must not change any vector or the order.
    got = minilm_encoder.encode_passages(TEXTS)
    expected = _by_hand(hf_model, TEXTS, "mean")
    assert got.dtype == np.float32 and got.shape == (3, 384)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_sentence_transformers_pooling_read_from_config(minilm_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "my-cls-model"
    shutil.copytree(minilm_dir, copy)
    config = copy / "1_Pooling" / "config.json"
    data = json.loads(config.read_text())
    data.update(pooling_mode_cls_token=True, pooling_mode_mean_tokens=False)
    config.write_text(json.dumps(data))
    assert resolve_encoder_spec(str(copy)).pooling == "cls"
    assert resolve_encoder_spec(str(minilm_dir)).pooling == "mean"


def test_bge_uses_cls_pooling_and_query_instruction(
    forced: dict[str, DenseEncoder], hf_model: tuple[Any, Any]
) -> None:
    bge = forced["bge"]
    assert (bge.spec.pooling, bge.spec.query_instruction, bge.spec.passage_prefix) == (
        "cls",
        BGE_QUERY_INSTRUCTION,
        "",
    )
    np.testing.assert_allclose(
        bge.encode_queries(TEXTS),
        _by_hand(hf_model, [BGE_QUERY_INSTRUCTION + t for t in TEXTS], "cls"),
        atol=1e-5,
    )
    np.testing.assert_allclose(bge.encode_passages(TEXTS), _by_hand(hf_model, TEXTS, "cls"), atol=1e-5)


def test_e5_uses_prefixes_and_mean_pooling(
    forced: dict[str, DenseEncoder], hf_model: tuple[Any, Any]
) -> None:
    e5 = forced["e5"]
    assert (e5.spec.pooling, e5.spec.query_prefix, e5.spec.passage_prefix) == ("mean", "query: ", "passage: ")
    np.testing.assert_allclose(
        e5.encode_queries(TEXTS), _by_hand(hf_model, ["query: " + t for t in TEXTS], "mean"), atol=1e-5
    )
    np.testing.assert_allclose(
        e5.encode_passages(TEXTS), _by_hand(hf_model, ["passage: " + t for t in TEXTS], "mean"), atol=1e-5
    )


def test_long_input_is_truncated_not_an_error(
    minilm_encoder: DenseEncoder, hf_model: tuple[Any, Any]
) -> None:
    long_text = "retrieval " * 3000
    got = minilm_encoder.encode_queries([long_text])
    np.testing.assert_allclose(got, _by_hand(hf_model, [long_text], "mean", max_length=256), atol=1e-5)


def test_encode_empty_list(minilm_encoder: DenseEncoder) -> None:
    assert minilm_encoder.encode_queries([]).shape == (0, 384)


@pytest.mark.parametrize(
    ("name", "family"),
    [
        ("intfloat/e5-base-v2", "e5"),
        ("/models/multilingual-e5-large", "e5"),
        ("intfloat/e5-large-v2", "e5"),
        ("BAAI/bge-base-en-v1.5", "bge"),
        ("/data/bge-large-en", "bge"),
        ("sentence-transformers/all-MiniLM-L6-v2", "sentence-transformers"),
        ("/models/gte-base", "sentence-transformers"),
        ("facebook/contriever", "sentence-transformers"),
    ],
)
def test_family_detected_from_name(name: str, family: str) -> None:
    assert detect_family(name) == family


def test_overrides_and_manifest_round_trip() -> None:
    spec = resolve_encoder_spec("intfloat/e5-base-v2", pooling="cls", max_length=128, query_prefix="q: ")
    assert (spec.family, spec.pooling, spec.max_length, spec.query_prefix, spec.passage_prefix) == (
        "e5",
        "cls",
        128,
        "q: ",
        "passage: ",
    )
    assert EncoderSpec.from_dict({**spec.to_dict(), "fingerprint": "x"}) == spec
    assert "name" not in spec.conventions()


def test_bad_family_and_pooling_are_errors() -> None:
    with pytest.raises(EncoderError, match="unknown encoder family"):
        resolve_encoder_spec(None, family="word2vec")
    with pytest.raises(EncoderError, match="unknown pooling"):
        resolve_encoder_spec(None, pooling="max")


def test_missing_local_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EncoderError, match="cannot load encoder"):
        DenseEncoder(resolve_encoder_spec(str(tmp_path / "no-such-model")))


def test_bm25_tokens_lowercase_without_stopwords() -> None:
    assert bm25_tokenize(["The Eiffel Tower, in Paris!"]) == [["eiffel", "tower", "paris"]]


def test_forward_passes_cover_every_row_once_within_limits() -> None:
    from retriever_server.encoders import _cheapest_split

    rng = np.random.default_rng(0)
    for _ in range(50):
        lengths = sorted(rng.integers(1, 300, size=int(rng.integers(1, 120))).tolist())
        batches = _cheapest_split(lengths, 16, 512)
        assert [i for batch in batches for i in batch] == list(range(len(lengths)))
        for batch in batches:
            assert len(batch) <= 16
            assert len(batch) == 1 or len(batch) * lengths[batch[-1]] <= 512
