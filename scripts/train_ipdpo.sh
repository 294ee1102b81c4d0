#!/usr/bin/env bash
# Launch `autorefine train-ipdpo` with accelerate, on one node or several: scripts/train_ipdpo.sh --help.
# One implementation for every method: scripts/launch_training.sh.
exec "$(dirname "${BASH_SOURCE[0]}")/launch_training.sh" ipdpo "$@"
