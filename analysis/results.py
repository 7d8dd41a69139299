"""Tidy result rows: the schema, atomic writes, and reading a results tree into one DataFrame.

Long format, one observation per row. Comparisons are pivot tables of this frame; reports and
regression checks read results/ only and never run a model.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from analysis.integrity import aside_path, atomic_write_bytes, atomic_write_text, file_sha256

log = logging.getLogger(__name__)

# Run-level keys, repeated on every row of a run so each row stands alone.
RUN_COLUMNS = [
    "run_id", "config_hash", "model", "method", "bits", "group_size", "symmetric",
    "calib_source", "calib_samples", "calib_seqlen", "calib_seed", "seed", "replicate_of",
]
OBSERVATION_COLUMNS = ["suite", "task", "metric", "value", "stderr", "ci_low", "ci_high", "n", "detail"]
PROVENANCE_COLUMNS = [
    "git_sha", "versions", "model_fingerprint", "data_fingerprint", "device",
    "started_at", "wall_s", "peak_mem_mb",
]
COLUMNS = RUN_COLUMNS + OBSERVATION_COLUMNS + PROVENANCE_COLUMNS
# stage: wall time per stage of the run; routing: per expert of a mixture, the calibration tokens its router sent it
SUITES = ("ppl", "lm_eval", "timing", "quant", "stage", "routing")
ROWS_FILE = "rows.parquet"
CSV_FILE = "rows.csv"
CONFIG_FILE = "config.yaml"
BLOCKS_FILE = "blocks.parquet"  # per eval set, window and block of tokens: the sums behind ppl and KLD
DOCS_FILE = "docs.parquet"  # per lm-eval task and document: correctness
DONE_FILE = "DONE"  # written last: a run directory without it is unfinished
# An attempt that failed: its error, log and where it ran (JSON; a dot file, so no reader takes it for a result and
# set_aside leaves it); removed when the run finishes. `python -m harness.status` shows it.
FAILED_FILE = ".failed.json"

DTYPES = {
    "bits": "Int64", "group_size": "Int64", "calib_samples": "Int64", "calib_seqlen": "Int64", "calib_seed": "Int64",
    "seed": "Int64",
    "n": "Int64", "value": "float64", "stderr": "float64", "ci_low": "float64", "ci_high": "float64",
    "wall_s": "float64", "peak_mem_mb": "float64",
    "symmetric": "boolean",
}


def to_frame(rows: Iterable[dict]) -> pd.DataFrame:
    """Rows (dicts) -> DataFrame with exactly COLUMNS, in order, with nullable dtypes; unknown keys are an error."""
    rows = list(rows)
    extra = {k for r in rows for k in r} - set(COLUMNS)
    if extra:
        raise ValueError(f"unknown result columns {sorted(extra)}; the schema is {COLUMNS}")
    bad = [r for r in rows if r.get("suite") not in SUITES]
    if bad:
        raise ValueError(f"row suite {bad[0].get('suite')!r} unknown; allowed values: {list(SUITES)}")
    frame = pd.DataFrame(rows, columns=COLUMNS)
    return frame.astype({k: v for k, v in DTYPES.items()})


def quant_row(metric: str, value: float, detail: dict | None = None) -> dict:
    """A `suite=quant` row (about the quantized model itself, not an evaluation)."""
    return {"suite": "quant", "task": "all", "metric": metric, "value": value,
            "detail": json.dumps(detail) if detail else None}


def write_run(run_dir: Path, frame: pd.DataFrame, config_yaml: str, meta: dict,
              files: dict[str, bytes] | None = None) -> None:
    """Write a finished run: rows (parquet + CSV), composed config, extra files (a method's extras, such as
    awq_search.pt), and last the DONE marker, which holds the metadata and the sha256 of every file written."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    contents = {**(files or {}), CONFIG_FILE: config_yaml.encode(), ROWS_FILE: frame.to_parquet(index=False),
                CSV_FILE: frame.to_csv(index=False).encode()}
    for name, data in contents.items():
        atomic_write_bytes(run_dir / name, data)
    checksums = {name: hashlib.sha256(data).hexdigest() for name, data in contents.items()}
    atomic_write_text(run_dir / DONE_FILE, json.dumps({**meta, "files": checksums}, indent=2, default=str) + "\n")
    (run_dir / FAILED_FILE).unlink(missing_ok=True)  # an earlier attempt's failure is history now


@dataclass(frozen=True)
class RunCheck:
    """What a run directory holds: `complete` (every file matches the checksum in DONE), `unfinished` (no DONE),
    `damaged` (a file is missing or does not match), or `legacy` (finished before checksums were recorded, so it
    cannot be verified). `meta` is the content of DONE where it could be read."""

    state: str
    reason: str | None = None
    meta: dict = field(default_factory=dict)

    @property
    def readable(self) -> bool:
        """Whether readers (compare, report, regress) may use it: verified, or legacy (with a warning)."""
        return self.state in ("complete", "legacy")


def check_run(run_dir: Path) -> RunCheck:
    """Verify a run directory against the checksums its DONE marker recorded."""
    run_dir = Path(run_dir)
    try:
        meta = json.loads((run_dir / DONE_FILE).read_text())
    except FileNotFoundError:
        return RunCheck("unfinished", f"no {DONE_FILE} marker")
    except (OSError, ValueError) as err:
        return RunCheck("damaged", f"unreadable {DONE_FILE}: {err}")
    if not isinstance(meta, dict):
        return RunCheck("damaged", f"{DONE_FILE} is not a JSON object")
    if "files" not in meta:
        state = "legacy" if (run_dir / ROWS_FILE).exists() else "damaged"
        return RunCheck(state, f"written before checksums were recorded ({DONE_FILE} has no 'files')", meta)
    for name, expected in meta["files"].items():
        path = run_dir / name
        if not path.is_file():
            return RunCheck("damaged", f"{name} is missing", meta)
        if file_sha256(path) != expected:
            return RunCheck("damaged", f"{name} does not match its checksum", meta)
    return RunCheck("complete", None, meta)


def is_complete(run_dir: Path) -> bool:
    """A finished run whose every file matches its checksum."""
    return check_run(run_dir).state == "complete"


def update_done(run_dir: Path, **fields) -> None:
    """Rewrite DONE's metadata (not its checksums) atomically, e.g. a new weights stamp for the same weights."""
    meta = json.loads((Path(run_dir) / DONE_FILE).read_text())
    atomic_write_text(Path(run_dir) / DONE_FILE, json.dumps({**meta, **fields}, indent=2, default=str) + "\n")


def set_aside(run_dir: Path, reason: str) -> Path:
    """Move a damaged run's files (not its lock or temporary files, whose names start with '.') into a sibling
    `<run>.corrupt-<time>` directory, its DONE renamed so no reader takes it for a run; never deletes anything."""
    run_dir = Path(run_dir)
    aside = aside_path(run_dir)
    aside.mkdir(parents=True)
    for entry in run_dir.iterdir():
        if not entry.name.startswith("."):
            os.replace(entry, aside / (f"{DONE_FILE}.corrupt" if entry.name == DONE_FILE else entry.name))
    log.warning("%s is damaged (%s): its files moved aside to %s; re-running it", run_dir, reason, aside)
    with contextlib.suppress(OSError):  # left empty: no directory that looks like a run until the re-run writes one
        run_dir.rmdir()
    return aside


def read_run(run_dir: Path) -> pd.DataFrame:
    frame = pd.read_parquet(Path(run_dir) / ROWS_FILE)
    # a run written before a column existed (ci_low/ci_high) reads with that column empty
    frame = frame.reindex(columns=COLUMNS).astype(DTYPES)
    # before calib.seed existed, a calibrating run drew its windows with the run's seed
    legacy_draw = frame["calib_seed"].isna() & frame["calib_source"].notna()
    frame.loc[legacy_draw, "calib_seed"] = frame.loc[legacy_draw, "seed"]
    return frame


def _readable(run_dir: Path) -> bool:
    """Whether a reader may use this run; a damaged one is skipped with a warning, a legacy one read with one."""
    check = check_run(run_dir)
    if check.state == "damaged":
        log.warning("skipping %s: damaged (%s)", run_dir, check.reason)
    elif check.state == "legacy":
        log.warning("reading %s unverified: %s", run_dir, check.reason)
    return check.readable


def find_run_dirs(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """Finished run directories under each path or glob (a run dir itself, or any tree containing them)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    found: set[Path] = set()
    for p in paths:
        for root in glob.glob(str(p)) or []:
            root = Path(root)
            if (root / DONE_FILE).is_file():
                if _readable(root):
                    found.add(root)
            elif root.is_dir():
                found.update(d.parent for d in root.rglob(DONE_FILE) if _readable(d.parent))
    return sorted(found)


def no_run_there(path: str | Path) -> str:
    """Why `path` (a run directory, a tree of runs, or a glob) yields no finished run, for a one-line error."""
    if not glob.glob(str(path)):
        return f"{path}: no such run directory or file"
    if (Path(path) / DONE_FILE).is_file():
        check = check_run(Path(path))
        return f"{path}: the run is {check.state} ({check.reason}), so it is not read"
    return f"{path}: no finished run there (a run directory holds a {DONE_FILE} marker once it finished)"


def load_results(paths: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """Every finished run under `paths` (dirs or globs) as one tidy DataFrame; unfinished runs are skipped."""
    frames = []
    for run_dir in find_run_dirs(paths):
        try:
            frames.append(read_run(run_dir))
        except Exception as err:  # noqa: BLE001 -- a legacy run's damaged parquet: skip it, say which and why
            log.warning("skipping %s: its %s cannot be read (%s)", run_dir, ROWS_FILE, err)
    return pd.concat(frames, ignore_index=True) if frames else to_frame([])
