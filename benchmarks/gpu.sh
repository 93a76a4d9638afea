#!/usr/bin/env bash
# The GPU benchmark in one command (benchmarks/gpu.py): ViT-B/16 with random weights, an estimated 8 minutes on
# one GPU (not yet measured).
#   benchmarks/gpu.sh                        # on cuda -> reports/benchmark-gpu.json and .md
#   benchmarks/gpu.sh --device cpu --quick   # every part at the tiny size (what the tests run)
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exec "$PYTHON" -m benchmarks.gpu "$@"
