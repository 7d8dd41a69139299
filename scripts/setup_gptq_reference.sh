#!/usr/bin/env bash
# Reference venv for benchmarks/crosscheck_gptq.py: GPTQModel 7.6.0 on top of the project's CPU stack.
#
# The venv sees the project's site-packages through a .pth file (torch 2.13.0 CPU, transformers 5.23.0, ...),
# and every package is installed with --no-deps so no resolver can pull a CUDA torch (gptqmodel 7.7.0 does;
# 7.6.0 does not need it). The project's own .venv is never modified.
#
# Usage: scripts/setup_gptq_reference.sh [VENV_DIR]    (default /work/venv-gptq)
# Then:  GPTQMODEL_CPU_WORKERS=2 $VENV_DIR/bin/python benchmarks/crosscheck_gptq.py ...
# The first GPTQModel quantize compiles a C++ packing extension (~40 s, longer on a busy machine).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-/work/venv-gptq}"
BASE_SITE="$REPO/.venv/lib/python3.11/site-packages"

if [[ ! -d "$BASE_SITE" ]]; then
  echo "error: $BASE_SITE not found; create the project venv first" >&2
  exit 1
fi
[[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
SITE="$("$VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')"
# the project stack, and the project itself (its editable install is a .pth the base venv alone processes)
printf '%s\n%s\n' "$BASE_SITE" "$REPO" > "$SITE/base_stack.pth"

# gptqmodel's own dependencies that the base stack lacks, pinned to what was verified on 2026-11-22.
PKGS=(gptqmodel==7.6.0 defuser==0.0.28 device-smi==0.5.7 logbar==0.4.15 ninja==1.13.2 pypcre==0.6.4
      tokenicer==0.0.14 protobuf==7.36.2)
for pkg in "${PKGS[@]}"; do
  "$VENV/bin/pip" install --quiet --no-deps "$pkg"
done

"$VENV/bin/python" - <<'PY'
import torch, transformers, gptqmodel
assert not torch.version.cuda, f"a CUDA torch leaked into the reference venv: {torch.__version__}"
print(f"ok: gptqmodel {gptqmodel.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
PY
