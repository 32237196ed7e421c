#!/usr/bin/env bash
# The prepared GPU check (issue 14), for a lent GPU machine that has only this working tree: the CUDA tests, decode
# speed at ChatGLM3-6B and ChatGLM-6B shape (bf16, int4, batch 1) and the engine at 1/32/128 streams, in at most
# ~8 minutes. Results: $OUT/results.json (else /tmp/gpu-check/) and a short table on stdout and in table.txt.
#
#   scripts/gpu_check.sh             # on the GPU machine (other arguments go to scripts/gpu_check.py)
#   scripts/gpu_check.sh --dry-run   # the same steps on a CPU with tiny shapes (tests/gpu/test_gpu_check.py)
#
# Python: $PYTHON, else the machine's python3 (the lent machines' python3 holds CUDA torch, triton, sentencepiece,
# safetensors, numpy and pytest, and nothing can be downloaded there). What is missing is installed with pip
# where an index is reachable. The tree is used in place (PYTHONPATH), not installed. The golden tests read
# ../shared/golden, which does not travel: copy it into shared/golden here (git-ignored via .git/info/exclude)
# and it is linked there.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=""
case " $* " in *" --dry-run "*) DRY=1 ;; esac
OUTDIR=${OUT:-/tmp/gpu-check}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && [ -n "$DRY" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi

missing=$("$PY" - <<'PY'
import importlib.util
need = ["torch", "sentencepiece", "safetensors", "numpy", "pytest", "triton"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
PY
)
if [ -n "$missing" ]; then
  echo "gpu_check: installing $missing" >&2
  "$PY" -m pip install -q $missing || { echo "gpu_check: could not install $missing" >&2; [ "$missing" = triton ] || exit 1; }
fi
if [ ! -e ../shared ] && [ -d shared/golden ]; then ln -s "$PWD/shared" ../shared 2>/dev/null || true; fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
  | tee "$OUTDIR/nvidia-smi.txt" || true
# 8 minutes in all: the driver skips what would start too late, and this stops it for good at 470 s.
exec timeout 470 "$PY" scripts/gpu_check.py --out "$OUTDIR" --budget-s 420 "$@"
