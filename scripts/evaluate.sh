#!/usr/bin/env bash
# Evaluate a checkpoint on the seven QA benchmarks (NQ, TriviaQA, PopQA, HotpotQA, 2Wiki, MuSiQue, Bamboogle).
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: scripts/evaluate.sh [--data-dir DIR] [--retriever-url URL] [--out DIR] [--decoding greedy|sc|esc] [--dry-run] MODEL_DIR [autorefine evaluate options]

  MODEL_DIR        a checkpoint folder (e.g. runs/autorefine-qwen2.5-3b-base/final or .../best)
  --data-dir DIR   FlashRAG files (<dir>/<name>/test.jsonl or dev.jsonl, or <dir>/<name>.jsonl);
                   without it the FlashRAG hub dataset is used (needs a network)
  --retriever-url  default http://127.0.0.1:8000
  --out DIR        default runs/eval/<model folder name>
  --decoding       greedy (default), sc (self-consistency) or esc (early-stopping SC)
  --dry-run        print the command instead of running it

Turn and observation limits default to those the checkpoint was trained with (autorefine_config.yaml).
The table lands in <out>/results.md (one row per dataset, single-hop / multi-hop / overall averages).
USAGE
}

data_dir=""
url=http://127.0.0.1:8000
out=""
decoding=greedy
dry=0
rest=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --data-dir) data_dir="$2"; shift 2 ;;
    --retriever-url) url="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --decoding) decoding="$2"; shift 2 ;;
    --dry-run) dry=1; shift ;;
    *) rest+=("$1"); shift ;;
  esac
done
[[ ${#rest[@]} -ge 1 ]] || { usage >&2; exit 2; }
model="${rest[0]}"
extra=("${rest[@]:1}")
out="${out:-runs/eval/$(basename "$(dirname "$model")")-$(basename "$model")}"

cmd=(autorefine evaluate --model "$model" --datasets nq,triviaqa,popqa,hotpotqa,2wikimultihopqa,musique,bamboogle
     --retriever-url "$url" --out "$out" --decoding "$decoding")
[[ -n "$data_dir" ]] && cmd+=(--data-dir "$data_dir")
cmd+=("${extra[@]}")
if [[ $dry -eq 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
