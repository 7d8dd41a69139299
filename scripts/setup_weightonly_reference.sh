#!/usr/bin/env bash
# Reference venvs for scripts/produce/weightonly.py and benchmarks/bench_runtimes.py: one data-free weight-only library
# each, in its own venv under VENVS (default /work/venvs): torch 2.13.0 first (the local CPU wheel; otherwise a resolver
# pulls CUDA builds), then transformers 5.23.0, accelerate and the library at the version the goldens were made with.
#
# Usage: scripts/setup_weightonly_reference.sh bnb|mlx|hqq|quanto|torchao [VENVS]
set -euo pipefail

declare -A PACKAGES=([bnb]="bitsandbytes==0.50.2" [mlx]="mlx[cpu]==0.32.4 mlx-lm==0.32.2" [hqq]="hqq==0.2.8.post1"
                     [quanto]="optimum-quanto==0.2.7" [torchao]="torchao==0.18.0")
LIB="${1:?usage: $0 bnb|mlx|hqq|quanto|torchao [VENVS]}"
[[ -n "${PACKAGES[$LIB]:-}" ]] || { echo "error: unknown library $LIB; allowed: ${!PACKAGES[*]}" >&2; exit 2; }
VENV="${2:-/work/venvs}/$LIB"
[[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet "torch==2.13.0"
# shellcheck disable=SC2086
"$VENV/bin/pip" install --quiet "torch==2.13.0" "transformers==5.23.0" safetensors accelerate ${PACKAGES[$LIB]}
"$VENV/bin/python" -c "import torch, transformers; print('ok: $LIB venv at $VENV, torch', torch.__version__)"
