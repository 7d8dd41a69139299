"""A cache of quantization results keyed by everything that produced them.

Quantizing is the expensive step; evaluating is not. A cache entry holds the artifacts plus any
other parameter the method changed (AWQ folds scales into norms), keyed by a hash of the model
fingerprint, method options, quant spec, calibration config and data fingerprint, seed, and the
source code of the quantization path. Changing an eval setting reuses it; changing code or
config never silently does.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import torch

from harness.results import atomic_write_bytes

REPO = Path(__file__).resolve().parent.parent
# The code that determines a quantized model: any edit here invalidates every cache entry.
QUANT_CODE = ("methods", "harness/blockwise.py", "harness/architectures.py", "harness/data.py", "harness/models.py")


def code_fingerprint() -> str:
    """sha256 over the source files of the quantization path."""
    h = hashlib.sha256()
    for entry in QUANT_CODE:
        path = REPO / entry
        for f in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            h.update(str(f.relative_to(REPO)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


@torch.no_grad()
def param_checksums(model: torch.nn.Module) -> dict[str, tuple[float, float]]:
    """{parameter/buffer name: (sum, sum of squares)}, to find what a method changed in place."""
    return {name: (t.double().sum().item(), t.double().pow(2).sum().item()) for name, t in model.state_dict().items()}


def changed_tensors(model: torch.nn.Module, before: dict, exclude: set[str]) -> dict[str, torch.Tensor]:
    """Tensors whose checksum differs from `before`, except those under the excluded module names."""
    after = param_checksums(model)
    state = model.state_dict()
    return {name: state[name].detach().cpu().clone() for name, sums in after.items()
            if sums != before.get(name) and name.rsplit(".", 1)[0] not in exclude}


def save_entry(path: Path, key: dict, artifacts: dict, modified: dict[str, torch.Tensor], meta: dict) -> None:
    buffer = io.BytesIO()
    torch.save({"key": key, "artifacts": artifacts, "modified": modified, "meta": meta}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_entry(path: Path, key: dict) -> tuple[dict, dict, dict] | None:
    """(artifacts, modified tensors, meta) if a valid entry for exactly `key` exists, else None."""
    if not path.exists():
        return None
    entry = torch.load(path, map_location="cpu", weights_only=False)  # our own file, written by save_entry
    if json.dumps(entry.get("key"), sort_keys=True, default=str) != json.dumps(key, sort_keys=True, default=str):
        return None  # a hash collision or a foreign file: never reuse it
    return entry["artifacts"], entry["modified"], entry["meta"]
