"""`retriever-server build` and `retriever-server serve`.

Heavy libraries (torch, faiss, transformers) are imported only by the subcommand that needs them, so
`--help` is instant. Errors print one line and exit non-zero; set RETRIEVER_SERVER_DEBUG=1 for tracebacks.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from autorefine.api_key import API_KEY_ENV, read_api_key
from retriever_server.rerank import RERANK_MODES

EXIT_ERROR = 1
EXIT_USAGE = 2

_EXAMPLES = """examples:
  retriever-server build --corpus data/demo/corpus.jsonl --out runs/index/demo-minilm-flat
  retriever-server build --corpus wiki-18.jsonl --encoder intfloat/e5-base-v2 --index-type ivfpq --out idx/
  retriever-server build --corpus data/demo/corpus.jsonl --encoder bm25 --out runs/index/demo-bm25
  retriever-server build --corpus wiki-18.jsonl --encoder intfloat/e5-base-v2 --import-faiss e5_Flat.index --out idx/
  retriever-server serve --index runs/index/demo-minilm-flat --port 8000
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of both subcommands."""
    parser = argparse.ArgumentParser(
        prog="retriever-server",
        description="FAISS / BM25 retrieval service speaking the Search-R1 HTTP API (POST /retrieve).",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{build,serve,audit}")

    build = sub.add_parser(
        "build",
        help="build an index (offsets, embeddings, FAISS/BM25 index, manifest.json) from a FlashRAG JSONL corpus",
        description="Build an index directory from a FlashRAG JSONL corpus ({id, contents} or {id, title, text}). "
        "Embeddings are written in shards, so an interrupted build resumes where it stopped.",
    )
    build.add_argument("--corpus", required=True, type=Path, help="corpus JSONL file")
    build.add_argument("--out", required=True, type=Path, help="index directory to write")
    build.add_argument(
        "--encoder",
        default=None,
        help="hub name or local path of a dense encoder, 'bm25', or 'hybrid' (BM25 + --dense-encoder, fused "
        "by reciprocal rank when serving); default: the embedded all-MiniLM-L6-v2",
    )
    build.add_argument(
        "--dense-encoder",
        default=None,
        help="with --encoder hybrid: the dense member (default: the embedded all-MiniLM-L6-v2)",
    )
    build.add_argument(
        "--chunk-tokens",
        type=_positive_int,
        default=None,
        metavar="N",
        help="index chunks of whole sentences up to N encoder tokens (each under its passage's title); "
        "serving returns the parent passages, ranked by their best chunk. Any --encoder, hybrid included",
    )
    build.add_argument(
        "--add-evidence",
        type=Path,
        default=None,
        metavar="QUESTIONS",
        help="questions JSONL with metadata.evidence: evidence passages missing from the corpus are added "
        "(written with the corpus into OUT/corpus+evidence.jsonl, each marked with its provenance)",
    )
    build.add_argument(
        "--index-type",
        choices=("flat", "hnsw", "ivfpq", "bm25"),
        default=None,
        help="FAISS inner-product index type (default flat; bm25 with --encoder bm25)",
    )
    build.add_argument(
        "--family",
        choices=("e5", "bge", "sentence-transformers"),
        default=None,
        help="encoder conventions (prefixes, pooling); detected from the name by default",
    )
    build.add_argument(
        "--pooling", choices=("mean", "cls"), default=None, help="override the family's pooling"
    )
    build.add_argument(
        "--max-length", type=_positive_int, default=256, help="max tokens per passage/query (default 256)"
    )
    build.add_argument(
        "--batch-size", type=_positive_int, default=64, help="passages per encoder batch (default 64)"
    )
    build.add_argument(
        "--max-batch-tokens",
        type=_positive_int,
        default=None,
        help="padded tokens per encoder forward pass (default 512 on CPU, unlimited on GPU)",
    )
    build.add_argument(
        "--shard-size",
        type=_positive_int,
        default=10_000,
        help="passages per embedding shard, the unit of resumption (default 10000)",
    )
    build.add_argument(
        "--shards-dir",
        type=Path,
        default=None,
        help="embedding shards directory (default OUT/embeddings); point it at another build's "
        "shards to build another index type without encoding again",
    )
    build.add_argument(
        "--delete-shards", action="store_true", help="delete the embedding shards after the build"
    )
    build.add_argument(
        "--skip-malformed",
        action="store_true",
        help="skip malformed corpus lines (counted in the manifest) instead of failing",
    )
    build.add_argument(
        "--force", action="store_true", help="overwrite a finished index built with another configuration"
    )
    build.add_argument(
        "--threads", type=_positive_int, default=None, help="CPU threads (default: available cores)"
    )
    build.add_argument("--no-progress", action="store_true", help="no progress bars")
    foreign = build.add_argument_group(
        "importing a prebuilt FAISS index (e.g. Search-R1's wiki-18 e5_Flat.index) instead of encoding"
    )
    foreign.add_argument(
        "--import-faiss",
        type=Path,
        metavar="INDEX_FILE",
        help="FAISS inner-product index whose rows are the corpus's passages in file order, built with "
        "--encoder; checked (count, dim, metric, spot check) and served like one we built",
    )
    foreign.add_argument(
        "--import-mode",
        choices=("auto", "reference", "copy"),
        default="auto",
        help="auto: hard-link it into OUT as index.faiss, else reference it by absolute path; "
        "reference: always by path; copy: copy it (default auto)",
    )
    foreign.add_argument(
        "--verify-rows",
        type=_non_negative_int,
        default=16,
        metavar="N",
        help="passages encoded to spot-check the vectors at their rows (flat, HNSW); 0 skips (default 16)",
    )
    params = build.add_argument_group("index parameters (default: derived from corpus size and dimension)")
    params.add_argument("--hnsw-m", dest="M", type=_positive_int, help="hnsw: neighbours per node (32)")
    params.add_argument(
        "--ef-construction", dest="efConstruction", type=_positive_int, help="hnsw: build beam (200)"
    )
    params.add_argument("--ef-search", dest="efSearch", type=_positive_int, help="hnsw: search beam (128)")
    params.add_argument("--nlist", type=_positive_int, help="ivfpq: inverted lists (~4·sqrt(N))")
    params.add_argument(
        "--pq-m", dest="m", type=_positive_int, help="ivfpq: PQ sub-quantizers, divides dim (~dim/8)"
    )
    params.add_argument("--nbits", type=_positive_int, help="ivfpq: bits per PQ code (8)")
    params.add_argument("--nprobe", type=_positive_int, help="ivfpq: lists visited per query")
    params.add_argument(
        "--refine",
        choices=("flat", "sq8", "none"),
        help="ivfpq: re-rank PQ candidates with fp32 (flat, +4·dim B/vector), 8-bit (sq8, +dim B) or not",
    )
    params.add_argument(
        "--k-factor", dest="k_factor", type=_positive_int, help="ivfpq: candidates re-ranked per hit (8)"
    )
    params.add_argument("--k1", type=float, help="bm25: term saturation (1.5)")
    params.add_argument("--b", type=float, help="bm25: length normalization (0.75)")

    serve = sub.add_parser(
        "serve",
        help="serve an index over HTTP (POST /retrieve, GET /health, GET /stats)",
        description="Serve an index built by `retriever-server build`. The port opens at once; /health answers "
        "503 until the index and encoder are loaded. Refuses an index whose manifest does not match the corpus "
        "or the encoder given.",
    )
    serve.add_argument("--index", required=True, type=Path, help="index directory (with manifest.json)")
    serve.add_argument(
        "--corpus", type=Path, default=None, help="corpus file (default: the path in the manifest)"
    )
    serve.add_argument(
        "--encoder",
        default=None,
        help="encoder to use; must be the one the index was built with (default: the manifest's)",
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)"
    )
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument(
        "--topk", type=_positive_int, default=3, help="documents per query when a request names none (3)"
    )
    serve.add_argument(
        "--max-topk", type=_positive_int, default=100, help="largest topk a request may ask (100)"
    )
    serve.add_argument(
        "--max-queries", type=_positive_int, default=1024, help="most queries per request (1024)"
    )
    serve.add_argument(
        "--batch-wait-ms",
        type=_non_negative_float,
        default=5.0,
        help="how long a batch waits for more requests (5; 0 disables micro-batching)",
    )
    serve.add_argument(
        "--batch-max-size", type=_positive_int, default=256, help="most queries per merged batch (256)"
    )
    serve.add_argument(
        "--threads", type=_positive_int, default=None, help="CPU threads (default: available cores)"
    )
    serve.add_argument(
        "--verify-corpus-hash", action="store_true", help="check the corpus's full sha256 at startup"
    )
    serve.add_argument(
        "--max-batch-tokens",
        type=_positive_int,
        default=None,
        help="padded tokens per encoder forward pass (default 512 on CPU, unlimited on GPU)",
    )
    serve.add_argument(
        "--ef-search", dest="efSearch", type=_positive_int, help="hnsw: override the search beam"
    )
    serve.add_argument(
        "--nprobe", type=_positive_int, help="ivfpq, ivf: override the lists visited per query"
    )
    serve.add_argument(
        "--k-factor", dest="k_factor", type=_positive_int, help="ivfpq: override the re-ranked candidates"
    )
    serve.add_argument(
        "--max-request-bytes",
        type=_positive_int,
        default=None,
        help="largest request body in bytes; larger ones get 413 (default 8 MiB)",
    )
    serve.add_argument(
        "--api-key-file",
        type=Path,
        default=None,
        help="require 'Authorization: Bearer <token>' on every request, the token being this file's "
        f"content (default: ${API_KEY_ENV} if set, else no token)",
    )
    fusion = serve.add_argument_group("hybrid indexes: weighted reciprocal-rank fusion, Σ w / (k + rank)")
    fusion.add_argument("--rrf-k", type=_non_negative_float, default=None, help="RRF constant k (60)")
    fusion.add_argument("--bm25-weight", type=_non_negative_float, default=None, help="BM25's weight (0.3)")
    fusion.add_argument("--dense-weight", type=_non_negative_float, default=None, help="dense weight (0.7)")
    fusion.add_argument(
        "--fusion-depth", type=_positive_int, default=None, help="candidates per member before fusion (50)"
    )
    serve.add_argument(
        "--encoder-dtype",
        choices=("fp32", "bf16"),
        default="fp32",
        help="dense query encoder precision on CPU (bf16: faster where the CPU has AVX512-BF16/AMX)",
    )
    rerank = serve.add_argument_group("reranking: a causal LM judges each of the top candidates")
    rerank.add_argument("--rerank", default=None, metavar="MODEL_DIR", help="causal LM folder (none)")
    rerank.add_argument(
        "--rerank-depth", type=_positive_int, default=10, help="candidates re-scored per query (10)"
    )
    rerank.add_argument(
        "--rerank-mode",
        choices=RERANK_MODES,
        default="query-likelihood",
        help="query-likelihood: mean log P(query | passage); yes-no: log-odds of a yes/no verdict "
        "(query-likelihood)",
    )
    rerank.add_argument("--rerank-dtype", choices=("fp32", "bf16"), default="bf16", help="(bf16)")
    rerank.add_argument("--rerank-batch", type=_positive_int, default=16, help="pairs per forward pass (16)")
    serve.add_argument(
        "--cache-size",
        type=_non_negative_int,
        default=4096,
        help="results kept for repeated (query, topk); hit rate in /health; 0 disables (4096)",
    )
    serve.add_argument(
        "--query-log",
        type=Path,
        default=None,
        metavar="FILE",
        help="append each /retrieve request's queries and topk to FILE (JSONL), e.g. to replay a run's "
        "searches against another cache size (benchmarks/retrieval_quality.py --replay)",
    )
    serve.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    serve.add_argument(
        "--access-log", action="store_true", help="log every request (off: it costs throughput)"
    )
    audit = sub.add_parser(
        "audit",
        help="is the questions' gold evidence in the corpus, and in the index's top k?",
        description="For questions carrying metadata.evidence ({title, text} passages): how many evidence "
        "passages the corpus holds (exactly, or as near duplicates: same title and text after normalizing "
        "case, punctuation and whitespace, or >= 90%% shared words under the same title), and evidence "
        "recall@k through the index. Prints a table; --json writes the report "
        "(keys evidence_in_corpus, recall_at_k, all_evidence_at_k; per dataset and overall).",
    )
    audit.add_argument("--index", required=True, type=Path, help="index directory")
    audit.add_argument("--questions", required=True, type=Path, nargs="+", help="questions JSONL file(s)")
    audit.add_argument(
        "--topk", type=_positive_int, nargs="+", default=[3, 5], help="k of recall@k (default 3 5)"
    )
    audit.add_argument("--corpus", type=Path, default=None, help="corpus file (default: the manifest's)")
    audit.add_argument("--json", type=Path, default=None, help="write the report here as JSON")
    audit.add_argument("--threads", type=_positive_int, default=None, help="CPU threads")
    return parser


_BUILD_PARAMS = (
    "M",
    "efConstruction",
    "efSearch",
    "nlist",
    "m",
    "nbits",
    "nprobe",
    "refine",
    "k_factor",
    "k1",
    "b",
)


def _import(args: argparse.Namespace, params: dict[str, Any]) -> Any:
    from retriever_server.build import BuildError
    from retriever_server.imports import import_faiss_index

    # These shape how we encode or which rows exist; a foreign index fixed both already.
    for given, flag in (
        (args.skip_malformed, "--skip-malformed"),
        (args.shards_dir, "--shards-dir"),
        (args.delete_shards, "--delete-shards"),
        (args.chunk_tokens, "--chunk-tokens"),
        (args.dense_encoder, "--dense-encoder"),
        (args.add_evidence, "--add-evidence"),
    ):
        if given:
            raise BuildError(f"{flag} does not apply to --import-faiss (no passages are encoded)")
    return import_faiss_index(
        args.corpus,
        args.out,
        args.import_faiss,
        encoder=args.encoder,
        family=args.family,
        pooling=args.pooling,
        max_length=args.max_length,
        index_type=args.index_type,
        search_params=params,
        mode=args.import_mode,
        verify_rows=args.verify_rows,
        batch_size=args.batch_size,
        force=args.force,
        threads=args.threads,
        progress=not args.no_progress,
    )


def _build(args: argparse.Namespace) -> int:
    from retriever_server.build import build_index

    params = {name: getattr(args, name) for name in _BUILD_PARAMS if getattr(args, name) is not None}
    if args.import_faiss is not None:
        return _report(args, _import(args, params))
    bm25 = (args.encoder or "").lower() == "bm25"
    index_type = args.index_type or ("bm25" if bm25 else "flat")
    corpus, added = args.corpus, None
    if args.add_evidence is not None:
        from retriever_server.audit import add_evidence

        corpus, added = add_evidence(args.corpus, [args.add_evidence], args.out / "corpus+evidence.jsonl")
        print(f"{corpus}: {args.corpus} plus {added} evidence passages of {args.add_evidence} it lacked")
    result = build_index(
        corpus,
        args.out,
        encoder=args.encoder,
        index_type=index_type,
        index_params=params,
        family=args.family,
        pooling=args.pooling,
        max_length=args.max_length,
        batch_size=args.batch_size,
        max_batch_tokens=args.max_batch_tokens,
        shard_size=args.shard_size,
        shards_dir=args.shards_dir,
        keep_shards=not args.delete_shards,
        skip_malformed=args.skip_malformed,
        force=args.force,
        threads=args.threads,
        progress=not args.no_progress,
        dense_encoder=args.dense_encoder,
        chunk_tokens=args.chunk_tokens,
    )
    return _report(args, result)


def _audit(args: argparse.Namespace) -> int:
    from retriever_server.audit import audit, render_table
    from retriever_server.indexes import configure_threads

    configure_threads(args.threads)
    report = audit(args.index, args.questions, args.topk, corpus=args.corpus)
    print(render_table(report))
    if args.json is not None:
        from autorefine.files import write_json

        write_json(args.json, report)
        print(f"report written to {args.json}")
    return 0


def _report(args: argparse.Namespace, result: Any) -> int:
    manifest = result.manifest
    corpus = manifest["corpus"]
    state = "up to date" if result.up_to_date else f"built in {manifest['build']['seconds']:.1f} s"
    print(
        f"{args.out}: {manifest['index']['type']} index of {corpus['passages']} passages "
        f"({corpus['skipped_lines']} malformed lines skipped), encoder {manifest['encoder']['name']}; {state}"
    )
    imported = manifest["index"].get("imported")
    if imported:
        checked = imported.get("spot_check")
        verdict = (
            f"{checked['rows']} rows spot-checked (min cosine {checked['min_cosine']:.4f})"
            if checked
            else "rows not spot-checked"
        )
        print(f"imported {imported['source']} ({imported['faiss_class']}, {imported['mode']}); {verdict}")
    if result.shards_reused:
        print(f"reused {len(result.shards_reused)} embedding shards, encoded {len(result.shards_encoded)}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import ipaddress

    import uvicorn

    from retriever_server.app import ServeConfig, create_app, plan_serving
    from retriever_server.search import Fusion

    fusion_given = {
        "rrf_k": args.rrf_k,
        "bm25_weight": args.bm25_weight,
        "dense_weight": args.dense_weight,
        "depth": args.fusion_depth,
    }
    fusion_given = {key: value for key, value in fusion_given.items() if value is not None}
    config = ServeConfig(
        fusion=Fusion(**fusion_given) if fusion_given else None,
        encoder_dtype=args.encoder_dtype,
        rerank=args.rerank,
        rerank_depth=args.rerank_depth,
        rerank_dtype=args.rerank_dtype,
        rerank_mode=args.rerank_mode,
        rerank_batch=args.rerank_batch,
        cache_size=args.cache_size,
        query_log=args.query_log,
        index_dir=args.index,
        corpus=args.corpus,
        encoder=args.encoder,
        topk=args.topk,
        max_topk=args.max_topk,
        max_queries=args.max_queries,
        batch_wait_ms=args.batch_wait_ms,
        batch_max_size=args.batch_max_size,
        threads=args.threads,
        verify_corpus_hash=args.verify_corpus_hash,
        max_batch_tokens=args.max_batch_tokens,
        search_params={k: getattr(args, k) for k in ("efSearch", "nprobe", "k_factor") if getattr(args, k)},
        **({"max_request_bytes": args.max_request_bytes} if args.max_request_bytes else {}),
        # ApiKeyError is a ValueError: main() reports it as the one-line message it carries.
        api_key=read_api_key(args.api_key_file, setting="--api-key-file"),
    )
    plan = plan_serving(config)
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if config.api_key is None and not loopback:
        logging.getLogger(__name__).warning(
            "serving on %s without an API key: anyone who reaches the port can query it "
            "(--api-key-file FILE, or set $%s)",
            args.host,
            API_KEY_ENV,
        )
    elif config.api_key is not None:
        logging.getLogger(__name__).info("every request must carry the API key (Authorization: Bearer)")
    fatal: list[str] = []
    server: Any = None

    def stop(message: str) -> None:
        fatal.append(message)
        server.should_exit = True

    app = create_app(plan, on_fatal=stop)
    server = uvicorn.Server(
        uvicorn.Config(
            app, host=args.host, port=args.port, log_level=args.log_level, access_log=args.access_log
        )
    )
    server.run()
    if fatal:
        raise RuntimeError(fatal[0])
    return 0


def _describe(err: Exception) -> str:
    # Our own errors (all ValueError subclasses) already read as sentences; name the type of anything else.
    message = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if isinstance(err, ValueError | OSError) and message:
        return message
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `retriever-server` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(args, "log_level", "info").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("faiss", "bm25s", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if getattr(args, "no_progress", False):
        # transformers reads this when first imported: its "Loading weights" bar goes too.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        return {"build": _build, "serve": _serve, "audit": _audit}[args.command](args)
    except KeyboardInterrupt:
        print("retriever-server: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if os.environ.get("RETRIEVER_SERVER_DEBUG"):
            raise
        print(f"retriever-server {args.command}: error: {_describe(err)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
