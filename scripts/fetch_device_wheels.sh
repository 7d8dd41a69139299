#!/usr/bin/env bash
# Wheels of what the device machine lacks and the harness needs (its image has torch, triton, transformers,
# pandas, pyarrow, scipy, ...; not hydra-core or omegaconf). Pure-Python, a few hundred KB in all; carried to
# the device by the run's `carry` (.device_wheels is git-ignored). lm-eval, datasets and gguf are not needed:
# the GPU check runs no lm-eval task, no hub dataset and no GGUF model, and the harness imports them lazily.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
rm -rf .device_wheels && mkdir -p .device_wheels
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest .device_wheels hydra-core==1.3.8 omegaconf==2.3.0
# antlr4-python3-runtime 4.9.3 (hydra's parser runtime) is an sdist only: build its wheel here, where pip can
# fetch build tools, so the offline device installs wheels only.
"$PY" -m pip wheel --quiet --no-deps --wheel-dir .device_wheels antlr4-python3-runtime==4.9.3
ls -l .device_wheels
