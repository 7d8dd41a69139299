"""Integrity of everything the harness writes and later reuses: atomic writes, checksums, quarantine.

Two forms, both verified before anything is read as a number:
- a *sealed* file (one cache entry): a header line with the sha256 of the payload, then the payload. Written in one
  atomic rename, so the checksum can never belong to other bytes. `torch.load` does not check its zip's CRC, so a
  flipped byte inside a tensor would otherwise be read back silently.
- a *manifest* (a directory: a streamed run's cache entry, a converted model): MANIFEST.json lists every file with
  its size and sha256, written inside the directory before the directory is renamed into place.

A damaged entry is never deleted: it is moved aside (`<name>.corrupt-<time>`) with a warning naming the path and
the reason, and the work is redone. Checksums are computed while the bytes are read anyway (one pass over bytes
that are then parsed), never as a separate pass over tensors.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)

SEAL_MAGIC = b"quant-harness sealed v1 sha256="
MANIFEST = "MANIFEST.json"
HASH_CHUNK = 1 << 22
T = TypeVar("T")


class IntegrityError(Exception):
    """Stored bytes that do not match their checksum (or carry none): never to be read as a number."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = Path(path), reason


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same directory, fsync, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in chunks (as fast as the disk delivers them)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_CHUNK):
            h.update(block)
    return h.hexdigest()


def write_sealed(path: Path, payload: bytes) -> None:
    """Atomically write `payload` behind a header carrying its sha256."""
    header = SEAL_MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n"
    atomic_write_bytes(path, header + payload)


def read_sealed(path: Path) -> bytes:
    """The payload of a sealed file; IntegrityError if it has no seal or its bytes do not match it."""
    data = Path(path).read_bytes()
    head = len(SEAL_MAGIC) + 64 + 1
    if not data.startswith(SEAL_MAGIC) or len(data) < head:
        raise IntegrityError(path, "no checksum header (written by an older version, or not ours)")
    expected, payload = data[len(SEAL_MAGIC):head - 1].decode("ascii", "replace"), memoryview(data)[head:]
    actual = hashlib.sha256(payload).hexdigest()
    if actual != expected:
        raise IntegrityError(path, f"checksum mismatch (stored {expected[:16]}, content {actual[:16]}): damaged")
    return bytes(payload)


def _listing(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(directory: Path) -> dict:
    """Record every file under `directory` (size, sha256) in its MANIFEST.json; returns the listing."""
    directory = Path(directory)
    files = {p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
             for p in _listing(directory)}
    atomic_write_text(directory / MANIFEST, json.dumps({"files": files}, indent=1, sort_keys=True) + "\n")
    return files


def verify_manifest(directory: Path) -> Path:
    """The directory, verified: IntegrityError unless every file of its manifest is present with its size and sha256,
    and no other file is."""
    directory = Path(directory)
    try:
        listed = json.loads((directory / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        raise IntegrityError(directory, f"no {MANIFEST} (written by an older version, or unfinished)") from None
    except (ValueError, KeyError, TypeError) as err:
        raise IntegrityError(directory, f"unreadable {MANIFEST}: {err}") from None
    present = {p.relative_to(directory).as_posix() for p in _listing(directory)}
    if missing := sorted(set(listed) - present):
        raise IntegrityError(directory, f"missing files {missing[:3]}")
    if extra := sorted(present - set(listed)):
        raise IntegrityError(directory, f"files not in the manifest {extra[:3]}")
    for name, want in listed.items():
        path = directory / name
        if path.stat().st_size != want["bytes"]:
            raise IntegrityError(path, f"size {path.stat().st_size} bytes, the manifest says {want['bytes']}")
        if file_sha256(path) != want["sha256"]:
            raise IntegrityError(path, "checksum mismatch with the manifest: damaged")
    return directory


def aside_path(path: Path) -> Path:
    """Where a damaged entry goes: a sibling `<name>.corrupt-<time>-<pid>` (unique, never read as an entry)."""
    path = Path(path)
    return path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")


def quarantine(path: Path, reason: str) -> Path | None:
    """Move a damaged entry aside (never delete it) and say so; returns where it went (None if it vanished)."""
    path = Path(path)
    aside = aside_path(path)
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return None
    log.warning("%s is damaged (%s): moved aside to %s; recomputing it", path, reason, aside.name)
    return aside


def read_or_quarantine(entry: Path, read: Callable[[], T]) -> T | None:
    """`read()` of a stored entry, or None after moving the whole entry aside when its bytes fail their checksum
    or, checksummed, still do not parse."""
    try:
        return read()
    except IntegrityError as err:
        quarantine(entry, err.reason if err.path == Path(entry) else f"{err.path.name}: {err.reason}")
    except Exception as err:  # noqa: BLE001 -- whatever the parser says, the entry cannot be trusted
        quarantine(entry, f"unreadable ({type(err).__name__}: {err})")
    return None
