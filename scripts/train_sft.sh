#!/usr/bin/env bash
# Launch `autorefine train-sft` with accelerate, on one node or several: scripts/train_sft.sh --help.
# One implementation for every method: scripts/launch_training.sh.
exec "$(dirname "${BASH_SOURCE[0]}")/launch_training.sh" sft "$@"
