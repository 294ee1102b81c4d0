#!/usr/bin/env bash
# Serve a retrieval index over HTTP (Search-R1 API) on this node's GPUs, for trainers on other nodes.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: scripts/serve_retriever.sh [--gpus LIST] [--host H] [--port P] [--dry-run] INDEX_DIR [retriever-server serve options]

  INDEX_DIR      a folder written by `retriever-server build` (manifest.json inside)
  --gpus LIST    CUDA_VISIBLE_DEVICES for FAISS and the encoder (default: all visible GPUs; none → CPU)
  --host H       bind address (default 0.0.0.0 here, since trainers on other nodes must reach it;
                 the server itself defaults to 127.0.0.1)
  --port P       default 8000 (`trl vllm-serve` also defaults to 8000: pick another port for one of them)
  --dry-run      print the command instead of running it

Example (wiki-18, e5 flat index on 2 GPUs):
  scripts/serve_retriever.sh --gpus 0,1 --port 8000 indexes/wiki18-e5-flat --topk 3 --batch-max-size 512
Check it:  curl http://HOST:8000/health
USAGE
}

gpus=""
host=0.0.0.0
port=8000
dry=0
rest=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --gpus) gpus="$2"; shift 2 ;;
    --host) host="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --dry-run) dry=1; shift ;;
    *) rest+=("$1"); shift ;;
  esac
done
[[ ${#rest[@]} -ge 1 ]] || { usage >&2; exit 2; }
index="${rest[0]}"
extra=("${rest[@]:1}")
[[ $dry -eq 1 || -f "$index/manifest.json" ]] || { echo "error: $index/manifest.json not found (build the index first)" >&2; exit 2; }

cmd=(retriever-server serve --index "$index" --host "$host" --port "$port" "${extra[@]}")
if [[ $dry -eq 1 ]]; then
  [[ -n "$gpus" ]] && printf 'CUDA_VISIBLE_DEVICES=%s ' "$gpus"
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
[[ -n "$gpus" ]] && export CUDA_VISIBLE_DEVICES="$gpus"
exec "${cmd[@]}"
