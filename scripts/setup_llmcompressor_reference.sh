#!/usr/bin/env bash
# Reference venv for scripts/produce/llmcompressor.py: llm-compressor 0.14.0.1 + compressed-tensors 0.19.0 on top of
# the project's CPU stack.
#
# The venv sees the project's site-packages through a .pth file (torch 2.13.0 CPU, transformers 5.23.0, datasets,
# accelerate, ...), and every package is installed with --no-deps so no resolver can pull a CUDA torch or downgrade
# the stack. The project's own .venv is never modified.
#
# Versions, verified on 2026-12-06 (GPTQModifier and AWQModifier on a Llama, CPU, offline):
#   llmcompressor 0.14.0.1 is the newest release. Its metadata pins transformers<=5.17.0, compressed-tensors==0.19.0
#   and auto-round<=0.15.1; it imports and runs GPTQ and AWQ with transformers 5.23.0 all the same (no older release
#   accepts 5.23 either: the pins only go down). auto-round is imported only by AutoRoundModifier and is left out
#   here (see scripts/setup_autoround_reference.sh); nvidia-ml-py is not imported on these paths.
#   compressed-tensors 0.19.0 is the version llmcompressor pins; loguru is the one import the base stack lacks.
#   llmcompressor 0.14.0.1's AWQ needs an accelerator for IntermediatesCache.pin_memory; the producer skips that
#   pinning on CPU (it never changes a value) and records the patch in PRODUCER.json.
#
# Usage: scripts/setup_llmcompressor_reference.sh [VENV_DIR]    (default /work/venv-llmc)
# Then:  /work/venv-llmc/bin/python scripts/produce/llmcompressor.py BASE OUT --modifier gptq ...
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-/work/venv-llmc}"
BASE_SITE="$REPO/.venv/lib/python3.11/site-packages"

if [[ ! -d "$BASE_SITE" ]]; then
  echo "error: $BASE_SITE not found; create the project venv first (scripts/setup.sh)" >&2
  exit 1
fi
[[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
SITE="$("$VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')"
# the project stack, and the project itself (its editable install is a .pth the base venv alone processes)
printf '%s\n%s\n' "$BASE_SITE" "$REPO" > "$SITE/base_stack.pth"

PKGS=(llmcompressor==0.14.0.1 compressed-tensors==0.19.0 loguru==0.7.3)
for pkg in "${PKGS[@]}"; do
  "$VENV/bin/pip" install --quiet --no-deps "$pkg"
done

"$VENV/bin/python" - <<'PY'
import torch, transformers, datasets, compressed_tensors, llmcompressor
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
from llmcompressor.modifiers.transform import AWQModifier
from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
assert not torch.version.cuda, f"a CUDA torch leaked into the reference venv: {torch.__version__}"
print(f"ok: llmcompressor {llmcompressor.__version__}, compressed-tensors {compressed_tensors.__version__}, "
      f"torch {torch.__version__}, transformers {transformers.__version__}, datasets {datasets.__version__}")
PY
