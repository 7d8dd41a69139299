#!/usr/bin/env bash
# Reproducible install of the AutoAWQ 0.2.9 reference into its own venv, outside the repo.
# The venv sees the project's base stack (CPU torch, transformers) through a .pth file, and every
# package is installed with --no-deps so no resolver can pull a CUDA torch.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${AWQ_VENV:-/work/venv-awq}"
BASE_SITE="$ROOT/.venv/lib/python3.11/site-packages"

python3 -m venv "$VENV"
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# the project stack, and the project itself (its editable install is a .pth the base venv alone processes)
printf '%s\n%s\n' "$BASE_SITE" "$ROOT" > "$SITE/base_stack.pth"
# autoawq's own requirements are torch/transformers/tokenizers/accelerate/datasets/zstandard/
# typing_extensions/huggingface_hub; those the base stack lacks are added one by one, --no-deps.
"$VENV/bin/pip" install --no-deps autoawq==0.2.9
for pkg in "$@"; do "$VENV/bin/pip" install --no-deps "$pkg"; done
"$VENV/bin/python" - <<'PY'
import importlib.util
for name in ("awq", "torch", "transformers", "accelerate", "datasets", "zstandard"):
    print(f"{name:14s}", "ok" if importlib.util.find_spec(name) else "MISSING")
PY
