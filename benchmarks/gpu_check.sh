#!/usr/bin/env bash
# GPU check of issue #16 item 4 (see benchmarks/gpu_check.py): the CUDA kernels on CuPy vs the CPU twin, the
# estimator through PyTorch FP16 on the GPU with the on-device probe loop vs the CPU ONNX path, cells/s.
#
#   OUT=/some/folder benchmarks/gpu_check.sh [--cpu-dry-run] [--cells N] [--budget-s S]
#
# Writes $OUT/gpu_check.json (default folder: ./gpu_check_out). Runs this checkout's code, installed or not
# (a temporary namespace folder links cytoedge.* to its stage folders, ahead of any other cytoedge).
# $PYTHON picks the interpreter (default python3); GPU_CHECK_TIMEOUT_S (default 470) kills the run, which
# still leaves the JSON of the steps done. Exit codes: 0 passed, or no CUDA device (nothing run; the JSON says so); 1 a check failed;
# 3 the Python packages the check needs are missing, or a device without both PyTorch CUDA and CuPy (the
# JSON names what); 124 killed by the timeout.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
out="${OUT:-$PWD/gpu_check_out}"
python="${PYTHON:-python3}"
mkdir -p "$out"

# this checkout's code, even where another cytoedge is installed
found="$("$python" -c "import os, cytoedge.runtime as r; print(os.path.realpath(list(r.__path__)[0]))" 2>/dev/null || true)"
if [ "$found" != "$(realpath "$root/runtime")" ]; then
    pkg="$(mktemp -d)"
    trap 'rm -rf "$pkg"' EXIT
    mkdir "$pkg/cytoedge"
    for stage in runtime export kernels calibration training models; do
        ln -s "$root/$stage" "$pkg/cytoedge/$stage"
    done
    export PYTHONPATH="$pkg${PYTHONPATH:+:$PYTHONPATH}"
fi

if ! missing="$("$python" -c "import numpy, cv2, onnx, cytoedge.runtime.estimator" 2>&1)"; then
    "$python" - "$out/gpu_check.json" "$missing" <<'PY' || printf '{"status": "missing python packages"}\n' >"$out/gpu_check.json"
import json, sys
json.dump({"status": "missing python packages", "error": sys.argv[2].strip().splitlines()[-1]}, open(sys.argv[1], "w"))
PY
    echo "gpu_check: missing python packages: $missing" >&2
    exit 3
fi

rc=0
timeout --signal=TERM --kill-after=10 "${GPU_CHECK_TIMEOUT_S:-470}" \
    "$python" "$here/gpu_check.py" --out "$out" "$@" || rc=$?
exit "$rc"
