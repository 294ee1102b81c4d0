#!/usr/bin/env bash
# Smoke test of a training machine, offline: GRPO steps (transformers engine; vLLM colocate and server when
# vLLM is installed), a held-out evaluation and a resume, printed as a pass/fail table. See scripts/gpu_smoke.py.
#   scripts/gpu_smoke.sh [--out DIR] [--cpu] [--steps N]        (PYTHON=... picks the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/gpu_smoke.py "$@"
