"""A cache of quantization results keyed by everything that produced them.

Quantizing is the expensive step; evaluating is not. An entry holds a method's whole QuantizationResult
(artifacts, the tensors it changed in place, its statistics and extras such as AWQ's search), keyed by the
model fingerprint, method options, quant spec, calibration config and tokens, seed, and the source of every
project module the method imports (derived from the imports, so moving a file cannot silently keep or drop it).
Changing an eval setting reuses it; changing code or config never silently does.
"""
from __future__ import annotations

import ast
import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from analysis.integrity import read_or_quarantine, verify_manifest, write_manifest
from harness.identity import stable_hash
from harness.sealed import load_sealed, save_sealed
from methods.base import QuantizationResult
from structure.streaming import ArtifactStore

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parent.parent
PROJECT_PACKAGES = ("core", "structure", "methods", "kernels", "harness", "analysis")


def code_fingerprint(root_module: str, repo: Path = REPO) -> str:
    """sha256 over the source of every project module that `root_module` (a method's module) imports, directly or
    not, each under its module name. Derived from the imports, not from a list of paths: a moved or renamed module
    changes the key (entries are recomputed, never silently reused), and no module the method uses can be left out."""
    h = hashlib.sha256()
    for name, path in sorted(module_closure(root_module, repo).items()):
        h.update(name.encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def module_closure(root_module: str, repo: Path = REPO) -> dict[str, Path]:
    """{module name: source file} of the project modules `root_module` loads: what it imports, what those import,
    and the packages (their __init__) along the way."""
    found: dict[str, Path] = {}
    todo = [root_module]
    while todo:
        name = todo.pop()
        if name in found or name.split(".")[0] not in PROJECT_PACKAGES:
            continue
        path = _source(name, repo)
        if path is None:  # `from package import name` where name is not a module
            continue
        found[name] = path
        todo += [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]  # parent packages run first
        todo += _imported_modules(path, name)
    return found


def _source(module: str, repo: Path) -> Path | None:
    base = repo.joinpath(*module.split("."))
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)


def _imported_modules(path: Path, module: str) -> list[str]:
    """Every module an import statement of the file may load (`from a import b`: a, and a.b in case b is a module);
    relative imports resolved against the file's package."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            names += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return names


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
    body = {"key": key, "modified": result.modified, "stats": result.stats, "extras": result.extras,
            "routing": result.routing, "meta": meta}
    if not isinstance(result.artifacts, ArtifactStore):
        save_sealed(path, {**body, "artifacts": result.artifacts})
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
    return QuantizationResult(ArtifactStore(target / "artifacts"), result.modified, result.stats, result.extras,
                              result.routing)


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
    result = QuantizationResult(entry["artifacts"], entry["modified"], entry["stats"], entry["extras"],
                                entry.get("routing", {}))
    return result, entry["meta"]


def _read_entry(path: Path, directory: Path) -> dict:
    """The verified content of an entry: a sealed file, or a directory checked against its manifest."""
    if path.exists():
        return load_sealed(path, weights_only=False)  # our own file
    verify_manifest(directory)
    entry = torch.load(directory / "entry.pt", map_location="cpu", weights_only=False)
    entry["artifacts"] = ArtifactStore(directory / "artifacts")
    return entry
