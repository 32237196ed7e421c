#!/usr/bin/env bash
# Creates .venv with the CPU build of torch and installs chatglm (editable) with the given extras.
# Usage: scripts/setup.sh [extras]      e.g. scripts/setup.sh test,hub
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-hub}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# torch first, pinned (and kept pinned while the extras install): another torch would pull a multi-GB CUDA build.
echo "torch==2.13.0" > .venv/constraints.txt
.venv/bin/python -m pip install -q -c .venv/constraints.txt torch
.venv/bin/python -m pip install -q -c .venv/constraints.txt -e ".[${extras}]"
# Compile the CPU kernel for quantized models now rather than on first use (a warning, not a failure, without gcc).
.venv/bin/python -m chatglm.kernels || true
