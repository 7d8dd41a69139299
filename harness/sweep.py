"""What a sweep is made of: its jobs, as Hydra's basic sweeper expands them, and the manifest a launcher writes when it
submits them (their SLURM job ids and logs). Read by the preflight (every job checked before any starts), the
launcher and `python -m harness.status`; imports neither torch nor the models, so a status query is quick."""
from __future__ import annotations

import json
from pathlib import Path

from hydra.errors import CompactHydraException
from omegaconf import DictConfig

from analysis.integrity import atomic_write_text

MANIFEST = "sweep_manifest.json"


class SweepFailed(CompactHydraException):
    """Some jobs of a sweep failed; the others finished (each is named with its log in the launcher's report).
    The command prints its message alone, without a traceback, and exits with status 1 (not a config error)."""


def sweep_jobs(config: DictConfig) -> list[list[str]]:
    """Every job of the sweep, as its list of overrides, expanded exactly as Hydra's basic sweeper expands them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{key}={value}" for key, value in (config.hydra.sweeper.get("params") or {}).items()]
    arguments = params + list(config.hydra.overrides.task)
    overrides = OverridesParser.create().parse_overrides(arguments)
    return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def shared_overrides(jobs) -> set[str]:
    """The overrides every job of a sweep has (none when there are no jobs)."""
    return set.intersection(*(set(o) for o in jobs)) if jobs else set()


def set_apart(overrides, shared: set[str]) -> str:
    """A job's configuration as one line: its overrides less the shared ones (all of them where none is its own)."""
    return " ".join(o for o in overrides if o not in shared) or " ".join(overrides)


def write_manifest(sweep_dir: Path, executor: str, jobs: list[dict]) -> None:
    """Record the jobs a launcher submitted ({num, overrides, job_id, submitit_log}), merged with those of an earlier
    batch of the same sweep."""
    known = {job["num"]: job for job in read_manifest(sweep_dir).get("jobs", [])}
    known.update({job["num"]: job for job in jobs})
    atomic_write_text(Path(sweep_dir) / MANIFEST, json.dumps(
        {"executor": executor, "jobs": [known[n] for n in sorted(known)]}, indent=1) + "\n")


def read_manifest(sweep_dir: Path) -> dict:
    """The sweep's manifest ({} when its launcher wrote none)."""
    try:
        return json.loads((Path(sweep_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
