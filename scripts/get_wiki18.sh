#!/usr/bin/env bash
# Download the wiki-18 corpus and a prebuilt e5 index (Search-R1's), and make a `retriever-server` index of them.
set -euo pipefail

CORPUS_REPO=PeterJinGo/wiki-18-corpus
FLAT_REPO=PeterJinGo/wiki-18-e5-index
HNSW_REPO=PeterJinGo/wiki-18-e5-index-HNSW64

usage() {
  cat <<'USAGE'
usage: scripts/get_wiki18.sh --out DIR [--index flat|hnsw|none] [--build flat|hnsw|ivfpq]
                             [--encoder NAME] [--import-mode auto|reference|copy] [--keep-parts] [--dry-run]
                             [-- BUILD_OPTIONS]

Downloads the wiki-18 corpus (PeterJinGo/wiki-18-corpus, 21,015,324 passages) into DIR and either
  --index flat   (default) Search-R1's prebuilt e5-base-v2 IndexFlatIP (PeterJinGo/wiki-18-e5-index), exact
  --index hnsw   the prebuilt e5-base-v2 HNSW64 index (PeterJinGo/wiki-18-e5-index-HNSW64), approximate, CPU
and imports it (`retriever-server build --import-faiss`: no encoding), or, with --index none (implied by
--build), builds an index of our own, encoding every passage with e5-base-v2 on this machine's GPUs:
  --build ivfpq  IVF-PQ with 8-bit refinement (~18 GB, recall@3 ~0.98 of flat on our demo benchmark)
  --build hnsw   HNSW, M 32 (CPU build of 21M vectors: slow)
  --build flat   exact inner product, like the prebuilt flat index

  --out DIR          where everything goes (corpus, FAISS file, index directory)
  --encoder NAME     default intfloat/e5-base-v2; the prebuilt indexes need that model (a local copy of it
                     is fine: --encoder /models/e5-base-v2), --build can use any dense encoder
  --import-mode M    how the index directory holds the FAISS file: auto (hard link, else a reference by
                     path; default), reference, copy (see docs/retriever.md)
  --keep-parts       keep the downloaded index parts (part_aa, part_ab, ...) after joining them
  --dry-run          print every command instead of running it (nothing is downloaded or written)
  -- BUILD_OPTIONS   passed on to `retriever-server build` (e.g. -- --batch-size 1024 --delete-shards)

Needs the `hf` CLI (huggingface_hub >= 0.34: pip install -U huggingface_hub; older versions ship the same
command as `huggingface-cli`) and `retriever-server` (pip install -e '.[retriever]'). Re-running skips what
is already there. Serve the result with:  retriever-server serve --index DIR/index-e5-... --host 0.0.0.0
USAGE
}

out=""
encoder=intfloat/e5-base-v2
index=flat
index_given=0
build=""
import_mode=auto
keep_parts=0
dry=0
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --out) out="${2:?--out needs a directory}"; shift 2 ;;
    --index) index="${2:?--index needs flat, hnsw or none}"; index_given=1; shift 2 ;;
    --build) build="${2:?--build needs flat, hnsw or ivfpq}"; shift 2 ;;
    --encoder) encoder="${2:?--encoder needs a model name or path}"; shift 2 ;;
    --import-mode) import_mode="${2:?--import-mode needs auto, reference or copy}"; shift 2 ;;
    --keep-parts) keep_parts=1; shift ;;
    --dry-run) dry=1; shift ;;
    --) shift; extra=("$@"); break ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
die() { echo "error: $*" >&2; exit 2; }
[[ -n "$out" ]] || die "--out DIR is required (see --help)"
case "$index" in flat|hnsw|none) ;; *) die "--index must be flat, hnsw or none, got '$index'" ;; esac
case "$build" in ""|flat|hnsw|ivfpq) ;; *) die "--build must be flat, hnsw or ivfpq, got '$build'" ;; esac
case "$import_mode" in auto|reference|copy) ;; *) die "--import-mode must be auto, reference or copy" ;; esac
if [[ -n "$build" ]]; then
  [[ $index_given -eq 0 || "$index" == none ]] || die "--build $build encodes the corpus itself: drop --index $index"
  index=none
fi

# Every step goes through `run`: printed, then executed unless --dry-run.
run() {
  if [[ $dry -eq 1 ]]; then echo "$*"; else echo "+ $*" >&2; eval "$*"; fi
}
q() { printf '%q' "$1"; }
skip() { echo "# skip: $1" >&2; }

if command -v hf >/dev/null 2>&1; then
  hf=hf
elif command -v huggingface-cli >/dev/null 2>&1; then
  hf=huggingface-cli
else
  hf=hf
  [[ $dry -eq 1 ]] || die "neither 'hf' nor 'huggingface-cli' found: pip install -U huggingface_hub"
fi
[[ $dry -eq 1 ]] || command -v retriever-server >/dev/null 2>&1 \
  || die "retriever-server not found: pip install -e '.[retriever]' in this repository"

corpus="$out/wiki-18.jsonl"
case "$index" in
  flat) repo=$FLAT_REPO; file="$out/e5_Flat.index"; target="$out/index-e5-flat" ;;
  hnsw) repo=$HNSW_REPO; file="$out/e5_HNSW64.index"; target="$out/index-e5-hnsw64" ;;
  none) target="$out/index-e5-$build" ;;
esac

cat >&2 <<NEEDS
wiki-18 into $out: what it takes (21,015,324 passages; e5-base-v2 vectors are 768 x 4 B = 3,072 B each)
  corpus         wiki-18.jsonl ~14 GB on disk (downloaded gzipped, a few GB), offsets table 0.17 GB;
                 scanning it (sha256 + JSON check) takes ~3-5 min at the ~80 MB/s measured on 2 busy cores
NEEDS
case "$index" in
  flat) cat >&2 <<NEEDS
  flat index     e5_Flat.index ~65 GB on disk (21,015,324 x 3,072 B), ~130 GB at peak while the parts are joined;
                 serving it needs ~65 GB of RAM on CPU, or ~33 GB of GPU memory in total over all visible GPUs
                 (fp16, sharded) after loading the 65 GB file into RAM; download time: ~65 GB at your bandwidth
                 (~11 min at 100 MB/s, ~1 h at 20 MB/s); import: the corpus scan plus ~1 min
NEEDS
  ;;
  hnsw) cat >&2 <<NEEDS
  HNSW64 index   e5_HNSW64.index ~76 GB on disk (the 65 GB of vectors plus ~11 GB of graph: 2 x 64 neighbours
                 x 4 B per passage), ~150 GB at peak while the parts are joined; served on CPU only, ~76 GB of RAM;
                 importing reads its graph into RAM (~11 GB); download: ~76 GB at your bandwidth
NEEDS
  ;;
esac
if [[ -n "$build" ]]; then
  cat >&2 <<NEEDS
  own $build index  encoding 21M passages with e5-base-v2: roughly 1-2 GPU-hours on A100/H100-class GPUs at fp16,
                 shared by the visible GPUs (an estimate, not measured here); embedding shards ~65 GB on disk
                 (kept for resuming and for other index types; pass -- --delete-shards to drop them)
NEEDS
  case "$build" in
    ivfpq) echo "                 IVF-PQ: ~18 GB on disk and in RAM (96 B code + 768 B sq8 + 8 B id per passage; -- --refine none: ~2.2 GB, recall@3 ~0.8); training and adding on CPU: tens of minutes" >&2 ;;
    hnsw) echo "                 HNSW M32: ~71 GB on disk and in RAM; the CPU graph build takes many hours" >&2 ;;
    flat) echo "                 flat: ~65 GB on disk and in RAM (GPU: ~33 GB in total, fp16)" >&2 ;;
  esac
fi
if [[ $dry -eq 0 ]]; then
  mkdir -p "$out"
  echo "  free disk in $out: $(df -Ph "$out" | awk 'NR == 2 {print $4}')" >&2
fi

if [[ -f "$corpus" ]]; then
  skip "$corpus exists"
else
  run "$hf download $CORPUS_REPO wiki-18.jsonl.gz --repo-type dataset --local-dir $(q "$out")"
  run "gzip -d $(q "$corpus.gz")"
fi

if [[ "$index" != none ]]; then
  if [[ -f "$file" ]]; then
    skip "$file exists"
  else
    parts="$out/parts/$(basename "$repo")"
    run "$hf download $repo --repo-type dataset --include 'part_*' --local-dir $(q "$parts")"
    run "cat $(q "$parts")/part_* > $(q "$file.partial")"
    run "mv $(q "$file.partial") $(q "$file")"
    [[ $keep_parts -eq 1 ]] || run "rm -r $(q "$parts")"
  fi
fi

cmd="retriever-server build --corpus $(q "$corpus") --encoder $(q "$encoder")"
if [[ "$index" != none ]]; then
  cmd+=" --import-faiss $(q "$file") --import-mode $import_mode"
else
  cmd+=" --index-type $build --batch-size 512"
fi
cmd+=" --out $(q "$target")"
for arg in "${extra[@]}"; do cmd+=" $(q "$arg")"; done
run "$cmd"
echo "# serve it: retriever-server serve --index $(q "$target") --host 0.0.0.0 --port 8000 (see docs/retriever.md)" >&2
