# Sourced by the launchers and the SLURM examples: reading a SLURM node list and an accelerate config.
# (bash; no side effects when sourced)

# Every host of a SLURM node list, one per line (gpu[01-03,07],cpu1 → gpu01 gpu02 gpu03 gpu07 cpu1):
# `scontrol show hostnames` where SLURM is installed, else the same expansion done here (one bracket per name).
slurm_hostnames() {
  local list="$1"
  if command -v scontrol >/dev/null 2>&1; then
    scontrol show hostnames "$list"
    return
  fi
  local items=() current="" depth=0 c i
  for ((i = 0; i < ${#list}; i++)); do
    c="${list:i:1}"
    case "$c" in
      '[') depth=$((depth + 1)); current+="$c" ;;
      ']') depth=$((depth - 1)); current+="$c" ;;
      ',') if ((depth == 0)); then items+=("$current"); current=""; else current+="$c"; fi ;;
      *) current+="$c" ;;
    esac
  done
  [[ -n "$current" ]] && items+=("$current")
  local item prefix body part lo hi n
  for item in "${items[@]}"; do
    if [[ "$item" != *"["* ]]; then echo "$item"; continue; fi
    prefix="${item%%\[*}"
    body="${item#*\[}"
    body="${body%%\]*}"
    IFS=, read -ra parts <<< "$body"
    for part in "${parts[@]}"; do
      if [[ "$part" == *-* ]]; then
        lo="${part%-*}"
        hi="${part#*-}"
        for ((n = 10#$lo; n <= 10#$hi; n++)); do printf '%s%0*d\n' "$prefix" "${#lo}" "$n"; done
      else
        echo "$prefix$part"
      fi
    done
  done
}

# A top-level `key: value` of an accelerate config (YAML), quotes and comments dropped; empty when absent.
accelerate_value() {
  local file="$1" key="$2"
  sed -n "s/^${key}:[[:space:]]*\([^#]*\).*/\1/p" "$file" | sed -n 1p | tr -d "\"' "
}
