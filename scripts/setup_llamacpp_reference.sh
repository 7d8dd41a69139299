#!/usr/bin/env bash
# Reference venv for scripts/produce/llamacpp.py: llama-cpp-python built from source on the CPU (no CUDA), which
# exposes llama.cpp's quantizer (the K-quant mixes). With --tools, also builds llama.cpp's llama-imatrix and
# llama-quantize binaries from the same source (an importance matrix cannot pass through the Python binding).
# Both builds take 10-20 minutes on 2 cores.
#
# Usage: scripts/setup_llamacpp_reference.sh [VENV_DIR] [--tools]    (default /work/venv-llamacpp)
set -euo pipefail

VENV="${1:-/work/venv-llamacpp}"
VERSION=0.3.36
[[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF" \
  "$VENV/bin/pip" install --quiet --no-cache-dir "llama-cpp-python==$VERSION"
"$VENV/bin/python" -c "import llama_cpp; print('ok: llama-cpp-python', llama_cpp.__version__)"

if [[ "${2:-}" == "--tools" ]]; then
  SRC="$VENV/src"
  mkdir -p "$SRC"
  "$VENV/bin/pip" download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$SRC"
  tar -xzf "$SRC/llama_cpp_python-$VERSION.tar.gz" -C "$SRC"
  LLAMA="$SRC/llama_cpp_python-$VERSION/vendor/llama.cpp"
  cmake -S "$LLAMA" -B "$VENV/llama-build" -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DCMAKE_BUILD_TYPE=Release
  cmake --build "$VENV/llama-build" --target llama-imatrix llama-quantize -j "$(nproc)"
  echo "ok: $VENV/llama-build/bin/llama-imatrix and llama-quantize"
fi
