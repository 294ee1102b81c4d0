#!/usr/bin/env bash
# Launch `autorefine train-grpo` with accelerate, on one node or several: scripts/train_grpo.sh --help.
# One implementation for every method: scripts/launch_training.sh.
exec "$(dirname "${BASH_SOURCE[0]}")/launch_training.sh" grpo "$@"
