"""A retrieval server that speaks only the Search-R1 API, written for the tests from its description.

    python -m tests.searchr1_server --corpus data/synthetic/corpus.jsonl --port 8001 [--bare-documents]
        [--unquoted-titles]

The API (REFERENCE §2): `POST /retrieve` with `{"queries": [str], "topk": int, "return_scores": bool}`,
answered `{"result": [[{"document": {"id", "contents"}, "score"}, ...], ...]}`, one list per query, best
first. Nothing else: no `/health`, no `/stats`, no micro-batching, no request limits. As the reference
server does, it builds its index before the port opens, and `return_scores: false` makes it fail (500).
`--bare-documents` answers documents without scores (`{"result": [[{"id", "contents"}, ...]]}`) whatever
the request says, the other shape clients meet; `--unquoted-titles` serves `Title\\ntext` instead of
FlashRAG's `"Title"\\ntext`. Search is BM25 (bm25s) over `contents`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import bm25s
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel


class QueryRequest(BaseModel):
    """The request body of `POST /retrieve`."""

    queries: list[str]
    topk: int | None = None
    return_scores: bool = False


def _tokens(texts: list[str]) -> list[list[str]]:
    return bm25s.tokenize(texts, lower=True, stopwords="en", return_ids=False, show_progress=False)


def _dense_search(index_dir: Path) -> Any:
    """`search(queries, k) -> (rows, scores)` over a flat MiniLM index, one forward pass per call."""
    import faiss
    import torch
    from transformers import AutoModel, AutoTokenizer

    from retriever_server.encoders import model_path

    manifest = json.loads((index_dir / "manifest.json").read_text("utf-8"))
    name = model_path(manifest["encoder"]["name"])
    tokenizer, model = AutoTokenizer.from_pretrained(name), AutoModel.from_pretrained(name).eval()
    index = faiss.read_index(str(index_dir / manifest["index"]["path"]))

    def search(queries: list[str], k: int) -> tuple[Any, Any]:
        batch = tokenizer(queries, padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
        scores, rows = index.search(emb.numpy(), k)
        return rows, scores

    return search


def create_app(
    corpus: Path,
    *,
    bare_documents: bool = False,
    unquoted_titles: bool = False,
    dense_index: Path | None = None,
) -> FastAPI:
    """The app over `corpus` (FlashRAG JSONL with `id` and `contents`)."""
    documents = [json.loads(line) for line in corpus.read_text("utf-8").splitlines() if line.strip()]
    if unquoted_titles:
        for doc in documents:
            title, _, text = doc["contents"].partition("\n")
            doc["contents"] = f"{title.strip(chr(34))}\n{text}"
    if dense_index is not None:
        search = _dense_search(dense_index)
    else:
        index = bm25s.BM25()
        index.index(_tokens([doc["contents"] for doc in documents]), show_progress=False)

        def search(queries: list[str], k: int) -> tuple[Any, Any]:
            return index.retrieve(_tokens(queries), k=k, show_progress=False)

    app = FastAPI()

    @app.post("/retrieve")
    def retrieve(request: QueryRequest) -> dict[str, Any]:
        if not request.return_scores and not bare_documents:
            raise RuntimeError("return_scores=False is not supported")  # the reference server's crash
        k = min(request.topk or 3, len(documents))
        rows, scores = search(request.queries, k)
        result = []
        for query_rows, query_scores in zip(rows, scores, strict=True):
            hits = [
                {"id": str(documents[int(r)]["id"]), "contents": documents[int(r)]["contents"]}
                for r in query_rows
            ]
            if bare_documents:
                result.append(hits)
            else:
                result.append(
                    [{"document": hit, "score": float(s)} for hit, s in zip(hits, query_scores, strict=True)]
                )
        return {"result": result}

    return app


def main() -> None:
    """Serve on 127.0.0.1 until killed."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bare-documents", action="store_true")
    parser.add_argument("--unquoted-titles", action="store_true")
    parser.add_argument(
        "--dense-index", type=Path, default=None, help="flat MiniLM index folder (dense mode)"
    )
    args = parser.parse_args()
    app = create_app(
        args.corpus,
        bare_documents=args.bare_documents,
        unquoted_titles=args.unquoted_titles,
        dense_index=args.dense_index,
    )
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
