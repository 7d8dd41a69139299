"""A cache of quantization results keyed by everything that produced them.

Quantizing is the expensive step; evaluating is not. An entry holds a method's whole QuantizationResult
(artifacts, the tensors it changed in place, its statistics and extras such as AWQ's search), keyed by the
model fingerprint, method options, quant spec, calibration config and tokens, seed, and the source code of the
quantization path. Changing an eval setting reuses it; changing code or config never silently does.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from harness.identity import stable_hash
from harness.integrity import read_or_quarantine, read_sealed, verify_manifest, write_manifest, write_sealed
from methods.base import QuantizationResult
from structure.streaming import ArtifactStore

log = logging.getLogger(__name__)
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


def _directory_of(path: Path) -> Path:
    """Where the entry of a streamed run lives: a directory with one file per artifact beside `<hash>.pt`."""
    return path.with_suffix(".d")


def save_entry(path: Path, key: dict, result: QuantizationResult, meta: dict) -> QuantizationResult:
    """Write the entry atomically; returns the result as stored (artifacts on disk move into the entry).

    Artifacts held in memory go into one sealed file (its sha256 in its header). Artifacts a streamed run kept on
    disk (an ArtifactStore) move into a directory entry with a manifest of checksums, so that no step ever holds
    them all in memory."""
    body = {"key": key, "modified": result.modified, "stats": result.stats, "extras": result.extras, "meta": meta}
    if not isinstance(result.artifacts, ArtifactStore):
        buffer = io.BytesIO()
        torch.save({**body, "artifacts": result.artifacts}, buffer)
        write_sealed(path, buffer.getvalue())
        return result
    target = _directory_of(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{target.name}-"))
    try:
        shutil.move(str(result.artifacts.directory), tmp / "artifacts")  # a rename: the scratch is in the cache
        torch.save({**body, "artifacts": "artifacts/"}, tmp / "entry.pt")
        write_manifest(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return QuantizationResult(ArtifactStore(target / "artifacts"), result.modified, result.stats, result.extras)


def load_entry(path: Path, key: dict) -> tuple[QuantizationResult, dict] | None:
    """(result, meta) if a verified entry for exactly `key` exists (one file, or a streamed run's directory), else
    None. An entry that fails its checksum or cannot be read is moved aside, with a warning naming it."""
    directory = _directory_of(path)
    where = path if path.exists() else directory
    if not where.exists():
        return None
    entry = read_or_quarantine(where, lambda: _read_entry(path, directory))
    if entry is None:
        return None
    if stable_hash(entry.get("key"), 64) != stable_hash(key, 64):
        log.warning("%s holds another key (a hash collision or a foreign file): not reused", where)
        return None
    result = QuantizationResult(entry["artifacts"], entry["modified"], entry["stats"], entry["extras"])
    return result, entry["meta"]


def _read_entry(path: Path, directory: Path) -> dict:
    """The verified content of an entry: a sealed file, or a directory checked against its manifest."""
    if path.exists():
        return torch.load(io.BytesIO(read_sealed(path)), map_location="cpu", weights_only=False)  # our own file
    verify_manifest(directory)
    entry = torch.load(directory / "entry.pt", map_location="cpu", weights_only=False)
    entry["artifacts"] = ArtifactStore(directory / "artifacts")
    return entry
