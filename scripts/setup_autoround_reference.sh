#!/usr/bin/env bash
# Reference venv for scripts/produce/autoround.py: Intel AutoRound 0.16.1 on top of the project's CPU stack.
#
# The venv sees the project's site-packages through a .pth file (torch 2.13.0 CPU, transformers 5.23.0, accelerate,
# datasets, ...), and every package is installed with --no-deps so no resolver can pull a CUDA torch or downgrade
# the stack. The project's own .venv is never modified.
#
# Versions, verified on 2026-12-06 (SignRound tuning on CPU; auto_round, auto_gptq, auto_awq and llm_compressor
# exports, offline): auto-round 0.16.1 (newest) with py-cpuinfo, the one import its core lacks here;
# compressed-tensors 0.19.0 (+ loguru) for the llm_compressor export and for
# scripts/produce/check_layout.py. The optional kernel package auto-round-lib (the "cpu" extra) is left
# out: it only speeds up inference.
#
# Usage: scripts/setup_autoround_reference.sh [VENV_DIR]    (default /work/venv-autoround)
# Then:  /work/venv-autoround/bin/python scripts/produce/autoround.py BASE OUT --format auto_round ...
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-/work/venv-autoround}"
BASE_SITE="$REPO/.venv/lib/python3.11/site-packages"

if [[ ! -d "$BASE_SITE" ]]; then
  echo "error: $BASE_SITE not found; create the project venv first (scripts/setup.sh)" >&2
  exit 1
fi
[[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
SITE="$("$VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')"
# the project stack, and the project itself (its editable install is a .pth the base venv alone processes)
printf '%s\n%s\n' "$BASE_SITE" "$REPO" > "$SITE/base_stack.pth"

PKGS=(auto-round==0.16.1 py-cpuinfo==9.0.0 compressed-tensors==0.19.0 loguru==0.7.3)
for pkg in "${PKGS[@]}"; do
  "$VENV/bin/pip" install --quiet --no-deps "$pkg"
done

"$VENV/bin/python" - <<'PY'
import torch, transformers, compressed_tensors, auto_round
from auto_round import AutoRound
from auto_round_extension.torch.qlinear_torch_zp import QuantLinear
assert not torch.version.cuda, f"a CUDA torch leaked into the reference venv: {torch.__version__}"
print(f"ok: auto-round {auto_round.__version__}, compressed-tensors {compressed_tensors.__version__}, "
      f"torch {torch.__version__}, transformers {transformers.__version__}")
PY
