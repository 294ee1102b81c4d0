#!/usr/bin/env bash
# Serve a retrieval index over HTTP (Search-R1 API) on this node's GPUs, for trainers on other nodes:
# one server sharding the index over the GPUs, or one replica per GPU.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: scripts/serve_retriever.sh [--gpus LIST] [--replica-per-gpu] [--host H] [--port P] [--dry-run]
                                  INDEX_DIR [retriever-server serve options]

  INDEX_DIR          a folder written by `retriever-server build` (manifest.json inside)
  --gpus LIST        CUDA_VISIBLE_DEVICES for FAISS and the encoder (default: all visible GPUs; none → CPU)
  --replica-per-gpu  one server per GPU of LIST (default: every GPU nvidia-smi lists) on ports P, P+1, ...,
                     each holding the whole index on its GPU; trainers spread requests over them and
                     survive losing one (retriever.url: [http://HOST:P, http://HOST:P+1, ...]). The replicas
                     memory-map the same index file, so its pages are read and cached once per node.
                     If one replica exits, the others are stopped and the script exits with its status.
  --host H           bind address (default 0.0.0.0 here, since trainers on other nodes must reach it;
                     the server itself defaults to 127.0.0.1). Beyond loopback, require a token:
                     --api-key-file FILE (or set AUTOREFINE_RETRIEVER_API_KEY), see docs/retriever.md
  --port P           default 8000 (`trl vllm-serve` also defaults to 8000: pick another port for one of them)
  --dry-run          print the command(s) instead of running them

Examples (wiki-18, e5 flat index):
  scripts/serve_retriever.sh --gpus 0,1 --port 8000 indexes/wiki18-e5-flat --topk 3 --batch-max-size 512
  scripts/serve_retriever.sh --replica-per-gpu --gpus 0,1,2,3 --port 8000 indexes/wiki18-e5-flat \
      --api-key-file ~/.retriever.key
Check it:  curl -H "Authorization: Bearer $(cat ~/.retriever.key)" http://HOST:8000/health
USAGE
}

gpus=""
per_gpu=0
host=0.0.0.0
port=8000
dry=0
rest=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --gpus) gpus="$2"; shift 2 ;;
    --replica-per-gpu) per_gpu=1; shift ;;
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

if [[ $per_gpu -eq 0 ]]; then
  cmd=(retriever-server serve --index "$index" --host "$host" --port "$port" "${extra[@]}")
  if [[ $dry -eq 1 ]]; then
    [[ -n "$gpus" ]] && printf 'CUDA_VISIBLE_DEVICES=%s ' "$gpus"
    printf '%q ' "${cmd[@]}"; echo
    exit 0
  fi
  [[ -n "$gpus" ]] && export CUDA_VISIBLE_DEVICES="$gpus"
  exec "${cmd[@]}"
fi

# One replica per GPU.
if [[ -z "$gpus" ]]; then
  if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    gpus="$CUDA_VISIBLE_DEVICES"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    gpus="$(nvidia-smi --query-gpu=index --format=csv,noheader | paste -sd, -)"
  fi
fi
[[ -n "$gpus" ]] || { echo "error: --replica-per-gpu found no GPU (nvidia-smi lists none); give --gpus LIST" >&2; exit 2; }
IFS=, read -ra gpu_list <<< "$gpus"
shown_host="$host"
[[ "$host" == "0.0.0.0" ]] && shown_host="$(hostname)"
urls=()
for i in "${!gpu_list[@]}"; do urls+=("http://$shown_host:$((port + i))"); done
joined="$(IFS=,; echo "${urls[*]}")"
summary="${#gpu_list[@]} replicas: retriever.url=[${joined//,/, }] (or --retriever-url $joined)"

if [[ $dry -eq 1 ]]; then
  for i in "${!gpu_list[@]}"; do
    printf 'CUDA_VISIBLE_DEVICES=%s ' "${gpu_list[$i]}"
    printf '%q ' retriever-server serve --index "$index" --host "$host" --port "$((port + i))" "${extra[@]}"
    echo '&'
  done
  echo "# $summary"
  exit 0
fi

pids=()
stop_all() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap stop_all EXIT
trap 'exit 143' TERM
trap 'exit 130' INT
for i in "${!gpu_list[@]}"; do
  CUDA_VISIBLE_DEVICES="${gpu_list[$i]}" \
    retriever-server serve --index "$index" --host "$host" --port "$((port + i))" "${extra[@]}" &
  pids+=($!)
done
echo "serve_retriever.sh: $summary" >&2
status=0
wait -n "${pids[@]}" || status=$?
echo "serve_retriever.sh: a replica exited with status $status; stopping the others" >&2
exit "$status"
