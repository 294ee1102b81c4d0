#!/usr/bin/env bash
# Launch `autorefine train-grpo|train-sft|train-ipdpo` with accelerate on one node or several
# (DDP / DeepSpeed / FSDP as the accelerate config says). scripts/train_{grpo,sft,ipdpo}.sh call this.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib/nodes.sh
source "$here/lib/nodes.sh"

method="${1:-}"
case "$method" in
  grpo|sft|ipdpo) shift ;;
  *) echo "usage: scripts/launch_training.sh grpo|sft|ipdpo [options] PRESET [section.key=value ...] (--help)" >&2; exit 2 ;;
esac

usage() {
  local resume_line example
  if [[ $method == ipdpo ]]; then
    resume_line="  --resume                continue at the first unfinished stage of the last round"
  else
    resume_line="  --resume PATH|latest    continue from a checkpoint (exact: optimizer, scheduler, RNG, data position)"
  fi
  case "$method" in
    grpo) example="configs/grpo/autorefine-qwen2.5-3b-base.yaml" ;;
    sft) example="configs/sft/smollm2-hotpotqa.yaml" ;;
    ipdpo) example="configs/ipdpo/qwen2.5-3b-base.yaml" ;;
  esac
  cat <<USAGE
usage: scripts/train_$method.sh [--accelerate-config FILE] [--gpus N] [--nodes N --node-rank R --main-address HOST
                               [--main-port P]] [--resume ...] [--dry-run] PRESET [section.key=value ...]

  PRESET                  a $method preset, e.g. $example
  --accelerate-config F   accelerate launch config (default: configs/accelerate/multi_gpu_ddp.yaml)
  --gpus N                processes on this node (default: \$SLURM_GPUS_ON_NODE, else the accelerate config's
                          num_processes / num_machines)
$resume_line
  --dry-run               print the command of every node instead of running it

Several nodes (run this script once on each; under SLURM the four values come from the job):
  --nodes N               machines in the job (default: \$SLURM_NNODES, else 1)
  --node-rank R           this machine's rank, 0 being the main one (default: \$SLURM_NODEID, else 0)
  --main-address HOST     the main machine's address as every node reaches it (default: the first host of
                          \$SLURM_JOB_NODELIST, from \`scontrol show hostnames\`)
  --main-port P           its rendezvous port (default: the accelerate config's main_process_port, else 29500)
They become accelerate's --num_machines, --machine_rank, --main_process_ip, --main_process_port and
--num_processes (N × the processes of one node). trainer.output_dir must be a folder every node shares.

Before launching: a retriever must answer at retriever.url (scripts/serve_retriever.sh) and the training
data must exist (autorefine prepare-data). Examples:
  scripts/train_$method.sh $example retriever.url=http://retriever-node:8000
  scripts/train_$method.sh --accelerate-config configs/accelerate/fsdp2.yaml --nodes 2 --node-rank 0 \\
      --main-address node-a $example             # and --node-rank 1 on node-b
  scripts/train_$method.sh --accelerate-config configs/accelerate/cpu_2proc.yaml configs/$method/...   # 2 CPU processes
  sbatch scripts/slurm/train-all-nodes.sbatch $method $example   # SLURM: every node trains
USAGE
}

accel=configs/accelerate/multi_gpu_ddp.yaml
gpus="${SLURM_GPUS_ON_NODE:-}"
nodes="${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-1}}"
rank="${SLURM_NODEID:-0}"
address=""
port=""
resume=()
dry=0
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --accelerate-config) accel="$2"; shift 2 ;;
    --gpus) gpus="$2"; shift 2 ;;
    --nodes) nodes="$2"; shift 2 ;;
    --node-rank) rank="$2"; shift 2 ;;
    --main-address) address="$2"; shift 2 ;;
    --main-port) port="$2"; shift 2 ;;
    --resume)
      if [[ $method == ipdpo ]]; then resume=(--resume); shift
      else [[ $# -ge 2 ]] || { echo "error: --resume needs PATH or latest" >&2; exit 2; }; resume=(--resume "$2"); shift 2
      fi ;;
    --dry-run) dry=1; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
[[ ${#args[@]} -ge 1 ]] || { usage >&2; exit 2; }
preset="${args[0]}"
overrides=("${args[@]:1}")
[[ -f "$preset" ]] || { echo "error: preset not found: $preset" >&2; exit 2; }
[[ -f "$accel" ]] || { echo "error: accelerate config not found: $accel" >&2; exit 2; }
for value in "$nodes" "$rank" ${gpus:+"$gpus"} ${port:+"$port"}; do
  [[ "$value" =~ ^[0-9]+$ ]] || { echo "error: not a number: $value" >&2; exit 2; }
done
(( nodes >= 1 && rank < nodes )) || { echo "error: --node-rank $rank is not one of the $nodes nodes (0..$((nodes - 1)))" >&2; exit 2; }

target=(-m autorefine.cli "train-$method" --config "$preset" "${resume[@]}" "${overrides[@]}")

if (( nodes == 1 )); then
  cmd=(accelerate launch --config_file "$accel")
  [[ -n "$gpus" ]] && cmd+=(--num_processes "$gpus")
  [[ -n "$port" ]] && cmd+=(--main_process_port "$port")
  cmd+=("${target[@]}")
  if [[ $dry -eq 1 ]]; then
    printf '%q ' "${cmd[@]}"; echo
    exit 0
  fi
  export TRL_EXPERIMENTAL_SILENCE=1
  exec "${cmd[@]}"
fi

# Several nodes: the same command on each, with its rank.
if [[ -z "$address" && -n "${SLURM_JOB_NODELIST:-}" ]]; then
  mapfile -t hosts < <(slurm_hostnames "$SLURM_JOB_NODELIST")  # whole: `| head -n1` would SIGPIPE scontrol
  address="${hosts[0]:-}"
fi
[[ -n "$address" ]] || {
  echo "error: --nodes $nodes needs --main-address (the main node's address, reachable from every node)," \
    "or SLURM's \$SLURM_JOB_NODELIST" >&2
  exit 2
}
port="${port:-$(accelerate_value "$accel" main_process_port)}"
port="${port:-29500}"
if [[ -z "$gpus" ]]; then
  total="$(accelerate_value "$accel" num_processes)"
  machines="$(accelerate_value "$accel" num_machines)"
  gpus=$(( ${total:-1} / ${machines:-1} ))
fi

node_command() {  # the command of node $1, in the global array `cmd`
  cmd=(accelerate launch --config_file "$accel" --num_machines "$nodes" --machine_rank "$1"
       --main_process_ip "$address" --main_process_port "$port" --num_processes "$((gpus * nodes))"
       "${target[@]}")
}

if [[ $dry -eq 1 ]]; then
  for ((r = 0; r < nodes; r++)); do
    node_command "$r"
    label="# node $r of $nodes"
    (( r == 0 )) && label+=" (main: $address:$port)"
    (( r == rank )) && label+=" <- this node"
    echo "$label"
    printf '%q ' "${cmd[@]}"; echo
  done
  exit 0
fi
node_command "$rank"
echo "launch_training.sh: node $rank of $nodes, $gpus processes here, main $address:$port" >&2
export TRL_EXPERIMENTAL_SILENCE=1
exec "${cmd[@]}"
