#!/usr/bin/env bash
# Launch GRPO training with accelerate (DDP / DeepSpeed / FSDP, vLLM rollouts as the preset says).
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: scripts/train_grpo.sh [--accelerate-config FILE] [--gpus N] [--dry-run] PRESET [section.key=value ...]

  PRESET                  a GRPO preset, e.g. configs/grpo/autorefine-qwen2.5-3b-base.yaml
  --accelerate-config F   accelerate launch config (default: configs/accelerate/multi_gpu_ddp.yaml)
  --gpus N                processes to launch (default: what the accelerate config says)
  --resume PATH|latest    continue from a checkpoint (exact: optimizer, scheduler, RNG, data position)
  --dry-run               print the command instead of running it

Before launching: a retriever must answer at retriever.url (scripts/serve_retriever.sh) and the training
data must exist (autorefine prepare-data). Examples:
  scripts/train_grpo.sh configs/grpo/autorefine-qwen2.5-3b-base.yaml retriever.url=http://retriever-node:8000
  scripts/train_grpo.sh --accelerate-config configs/accelerate/deepspeed_zero3.yaml configs/grpo/autorefine-qwen2.5-3b-instruct.yaml
  scripts/train_grpo.sh --accelerate-config configs/accelerate/cpu_2proc.yaml configs/grpo/tiny-cpu.yaml
USAGE
}

accel=configs/accelerate/multi_gpu_ddp.yaml
gpus=""
resume=()
dry=0
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --accelerate-config) accel="$2"; shift 2 ;;
    --gpus) gpus="$2"; shift 2 ;;
    --resume) resume=(--resume "$2"); shift 2 ;;
    --dry-run) dry=1; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
[[ ${#args[@]} -ge 1 ]] || { usage >&2; exit 2; }
preset="${args[0]}"
overrides=("${args[@]:1}")
[[ -f "$preset" ]] || { echo "error: preset not found: $preset" >&2; exit 2; }
[[ -f "$accel" ]] || { echo "error: accelerate config not found: $accel" >&2; exit 2; }

cmd=(accelerate launch --config_file "$accel")
[[ -n "$gpus" ]] && cmd+=(--num_processes "$gpus")
cmd+=(-m autorefine.cli train-grpo --config "$preset" "${resume[@]}" "${overrides[@]}")

if [[ $dry -eq 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
export TRL_EXPERIMENTAL_SILENCE=1
exec "${cmd[@]}"
