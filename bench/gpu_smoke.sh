#!/usr/bin/env bash
# GPU smoke test (issue 18.9): torch CUDA latency of the RSMAS-Net teacher vs a pruned student
# (FP32/FP16, CUDA events); with TensorRT, FP32 and INT8 engines compared with ONNX Runtime, per-layer
# precision and host vs GPU time. Prints a SKIP line for each part it cannot run; exits 0.
#
#   bash bench/gpu_smoke.sh [--quick]          (PYTHON=python3.11 to choose the interpreter)
#
# Needs no install of edgeus: it runs the repository's code with PYTHONPATH=<repo>. Writes
# bench/results/gpu_smoke.{json,md} when something was measured. Stops after 10 minutes at most.
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
py="${PYTHON:-python3}"
if ! command -v "$py" >/dev/null 2>&1; then
    echo "SKIP torch-cuda: no $py here"
    echo "SKIP tensorrt: no $py here"
    exit 0
fi
if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "note: nvidia-smi not found (no NVIDIA driver here?)"
else
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /'
fi
cd "$repo" || exit 0
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
timeout 590 "$py" -m bench.gpu_smoke "$@"
rc=$?
if [ "$rc" -eq 124 ]; then
    echo "SKIP rest: the 10-minute limit was reached (partial results were not written)"
    exit 0
fi
if [ "$rc" -ne 0 ]; then
    echo "gpu_smoke: failed with exit code $rc (see the traceback above)" >&2
fi
exit "$rc"
