"""`method.path` as a Hub id: resolved in a fake local Hugging Face cache laid out as huggingface_hub lays it out
(models--org--name/refs/<branch>, snapshots/<commit>/...), offline; a missing snapshot fails in one line."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from checkpoints.base import CheckpointError
from checkpoints.hub import resolve_checkpoint_path
from harness.config import ConfigError
from harness.run import execute
from tests.test_checkpoints import BASE, GOLDEN, checkpoint_run, gguf_file, ppl_and_kld

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"


def cache_repo(cache: Path, repo: str, files: dict[str, Path], commit: str = COMMIT, ref: str = "main") -> Path:
    """A repository's snapshot in a hub cache at `cache`, `ref` pointing at `commit` (files copied, as blobs would be
    linked)."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, source in files.items():
        shutil.copy(source, snapshot / name)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_a_hub_id_resolves_to_its_cached_snapshot(hub):
    directory = GOLDEN / "gptqmodel-w4g32-sym"
    snapshot = cache_repo(hub, "org/tiny-gptq", {p.name: p for p in directory.iterdir()})
    assert resolve_checkpoint_path("org/tiny-gptq") == snapshot
    other = cache_repo(hub, "org/tiny-gguf", {"tiny-Q4_0.gguf": gguf_file("Q4_0")}, commit=OTHER, ref="v1")
    assert resolve_checkpoint_path("org/tiny-gguf@v1") == other / "tiny-Q4_0.gguf"  # the one GGUF file of the repo
    assert resolve_checkpoint_path(f"org/tiny-gguf@{OTHER}/tiny-Q4_0.gguf") == other / "tiny-Q4_0.gguf"
    assert resolve_checkpoint_path(str(directory)) == directory  # a local path stays itself


def test_a_missing_snapshot_offline_fails_in_one_line(hub):
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache .* HF_HUB_OFFLINE is set") as err:
        resolve_checkpoint_path("org/absent")
    assert "\n" not in str(err.value)
    cache_repo(hub, "org/tiny-gguf", {"tiny-Q4_0.gguf": gguf_file("Q4_0")})
    with pytest.raises(CheckpointError, match="org/tiny-gguf@v2 is not in the local"):
        resolve_checkpoint_path("org/tiny-gguf@v2")  # cached, but not at that revision
    with pytest.raises(CheckpointError, match="holds no other.gguf"):
        resolve_checkpoint_path("org/tiny-gguf/other.gguf")


def test_a_run_on_a_hub_id_equals_the_run_on_its_directory(hub, text_file, tmp_path):
    directory = GOLDEN / "gptqmodel-w4g32-sym"
    cache_repo(hub, "org/tiny-gptq", {p.name: p for p in directory.iterdir()})
    by_id = execute(checkpoint_run(text_file, tmp_path, "org/tiny-gptq", "method.label=a"))
    by_path = execute(checkpoint_run(text_file, tmp_path, directory, "method.label=b"))
    assert ppl_and_kld(by_id) == ppl_and_kld(by_path)


def test_a_run_on_a_missing_hub_id_is_refused_before_anything_is_written(hub, text_file, tmp_path):
    with pytest.raises(ConfigError, match="method.path='org/absent'.*HF_HUB_OFFLINE is set"):
        execute(checkpoint_run(text_file, tmp_path, "org/absent"))
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())
