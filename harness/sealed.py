"""Cache entries of tensors in sealed files (analysis/integrity.py: a checksum header, one atomic write): written with
torch.save, read back only after the checksum matched, and reused only for exactly the key they were computed for.
The baseline, token, kept-block and quantization caches all go through here (analysis/ itself never imports torch)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from analysis.integrity import read_or_quarantine, read_sealed, write_sealed


def save_sealed(path: Path, obj) -> None:
    """`obj` written with torch.save into a sealed file."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_sealed(path, buffer.getvalue())


def load_sealed(path: Path, weights_only: bool = True):
    """What save_sealed wrote, on the CPU, once its checksum has matched (IntegrityError otherwise). weights_only=False
    only for our own files that hold more than tensors and plain containers."""
    return torch.load(io.BytesIO(read_sealed(path)), map_location="cpu", weights_only=weights_only)


def load_sealed_for(path: Path, key) -> dict | None:
    """The entry save_sealed wrote at `path` as {"key": key, ...}, if there is one, it matches its checksum (else it
    is moved aside with a warning) and it was computed for exactly `key`; else None."""
    if not Path(path).exists():
        return None
    entry = read_or_quarantine(path, lambda: load_sealed(path))
    same = entry is not None and _canonical(entry.get("key")) == _canonical(key)
    return entry if same else None


def _canonical(key) -> str:
    # the canonical JSON harness.identity.stable_hash hashes (not imported: identity -> config -> data -> here)
    return json.dumps(key, sort_keys=True, default=str)
