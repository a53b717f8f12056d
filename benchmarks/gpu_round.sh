#!/usr/bin/env bash
# The GPU round in one device call (see benchmarks/gpu_round.py for the stages, their order
# and limits, and what comes back in $OUT):
#
#   CPS_FAST_COMMIT=<sha> OUT=$OUT bash benchmarks/gpu_round.sh [--budget-s 540] [--full]
#   DRY=1 OUT=/tmp/round bash benchmarks/gpu_round.sh      # every stage on the CPU, tiny
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -u benchmarks/gpu_round.py "$@"
