#!/usr/bin/env bash
# The one-shot GPU benchmark (benchmarks/gpu/bench.py): one command, a few minutes on one GPU.
#   bash benchmarks/gpu/run.sh [--out DIR] [--budget-s 420] [--cpu-dry-run]
# Results: benchmarks/results/gpu/<device>.json (or --out). PYTHON picks the interpreter
# (default python3: on the GPU machine that is the one holding PyTorch).
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-python3}" -u benchmarks/gpu/bench.py "$@"
