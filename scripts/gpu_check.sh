#!/usr/bin/env bash
# The whole GPU validation in one command, for the device machine (one H200, no network):
#   bash scripts/gpu_check.sh          # writes $OUT/gpu_check.md and CSVs; at most ~8 minutes
#   bash scripts/gpu_check.sh --dry    # the same code on CPU (Triton's interpreter, tiny shapes); the suite runs it
# What the device lacks (hydra-core, omegaconf, antlr4) travels as wheels in .device_wheels/, fetched here by
# scripts/fetch_device_wheels.sh and installed there into .device_site/ (the device's own venv is left alone).
# The device call, from a machine that has run the fetch script:
#   run(command="bash scripts/gpu_check.sh", carry=[".device_wheels"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=()
[[ "${1:-}" == "--dry" ]] && DRY=(--dry)
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c "import hydra, omegaconf" 2>/dev/null; then
    [[ -d .device_wheels ]] || { echo "gpu_check: hydra-core/omegaconf missing and no .device_wheels/ (run scripts/fetch_device_wheels.sh and carry it)" >&2; exit 2; }
    "$PY" -m pip install --quiet --no-deps --no-index --target .device_site .device_wheels/*.whl
    export PYTHONPATH="$PYTHONPATH:$PWD/.device_site"
fi

status=0
if [[ ${#DRY[@]} -eq 0 ]]; then
    # the GPU-marked tests on the real device (kernels, block driver, methods CUDA vs CPU, packed model, timing)
    "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_kernels.py 2>&1 | tee "$OUT/pytest_gpu.txt" | tail -3 || status=1
fi
"$PY" benchmarks/gpu_check.py --out "$OUT" "${DRY[@]}" || status=1
exit $status
