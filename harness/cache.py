"""A cache of quantization results keyed by everything that produced them.

Quantizing is the expensive step; evaluating is not. An entry holds a method's whole QuantizationResult
(artifacts, the tensors it changed in place, its statistics and extras such as AWQ's search), keyed by the
model fingerprint, method options, quant spec, calibration config and tokens, seed, and the source code of the
quantization path. Changing an eval setting reuses it; changing code or config never silently does.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import torch

from harness.identity import stable_hash
from harness.results import atomic_write_bytes
from methods.base import QuantizationResult

REPO = Path(__file__).resolve().parent.parent
# The code that determines a quantized model: any edit here invalidates every cache entry.
QUANT_CODE = ("core", "structure", "methods", "harness/data.py", "harness/models.py")


def code_fingerprint() -> str:
    """sha256 over the source files of the quantization path."""
    h = hashlib.sha256()
    for entry in QUANT_CODE:
        path = REPO / entry
        for f in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            h.update(str(f.relative_to(REPO)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def entry_path(cache_dir: Path, key: dict) -> Path:
    return Path(cache_dir) / "quantized" / f"{stable_hash(key, 20)}.pt"


def save_entry(path: Path, key: dict, result: QuantizationResult, meta: dict) -> None:
    buffer = io.BytesIO()
    torch.save({"key": key, "artifacts": result.artifacts, "modified": result.modified, "stats": result.stats,
                "extras": result.extras, "meta": meta}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_entry(path: Path, key: dict) -> tuple[QuantizationResult, dict] | None:
    """(result, meta) if a valid entry for exactly `key` exists, else None."""
    if not path.exists():
        return None
    entry = torch.load(path, map_location="cpu", weights_only=False)  # our own file, written by save_entry
    if stable_hash(entry.get("key"), 64) != stable_hash(key, 64):
        return None  # a hash collision or a foreign file: never reuse it
    if "stats" not in entry:
        return None  # written before results carried stats and extras: recompute rather than lose them
    result = QuantizationResult(entry["artifacts"], entry["modified"], entry["stats"], entry["extras"])
    return result, entry["meta"]
