"""Tidy result rows: the schema, atomic writes, and reading a results tree into one DataFrame.

Long format, one observation per row. Comparisons are pivot tables of this frame; reports and
regression checks read results/ only and never run a model.
"""
from __future__ import annotations

import glob
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

# Run-level keys, repeated on every row of a run so each row stands alone.
RUN_COLUMNS = [
    "run_id", "config_hash", "model", "method", "bits", "group_size", "symmetric",
    "calib_source", "calib_samples", "calib_seqlen", "seed",
]
OBSERVATION_COLUMNS = ["suite", "task", "metric", "value", "stderr", "ci_low", "ci_high", "n", "detail"]
PROVENANCE_COLUMNS = [
    "git_sha", "versions", "model_fingerprint", "data_fingerprint", "device",
    "started_at", "wall_s", "peak_mem_mb",
]
COLUMNS = RUN_COLUMNS + OBSERVATION_COLUMNS + PROVENANCE_COLUMNS
SUITES = ("ppl", "lm_eval", "timing", "quant")
ROWS_FILE = "rows.parquet"
CSV_FILE = "rows.csv"
CONFIG_FILE = "config.yaml"
BLOCKS_FILE = "blocks.parquet"  # per eval set, window and block of tokens: the sums behind ppl and KLD
DOCS_FILE = "docs.parquet"  # per lm-eval task and document: correctness
DONE_FILE = "DONE"  # written last: a run directory without it is unfinished

_DTYPES = {
    "bits": "Int64", "group_size": "Int64", "calib_samples": "Int64", "calib_seqlen": "Int64", "seed": "Int64",
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
    return frame.astype({k: v for k, v in _DTYPES.items()})


def quant_row(metric: str, value: float, detail: dict | None = None) -> dict:
    """A `suite=quant` row (about the quantized model itself, not an evaluation)."""
    return {"suite": "quant", "task": "all", "metric": metric, "value": value,
            "detail": json.dumps(detail) if detail else None}


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


def write_run(run_dir: Path, frame: pd.DataFrame, config_yaml: str, meta: dict,
              files: dict[str, bytes] | None = None) -> None:
    """Write a finished run: rows (parquet + CSV), composed config, extra files (a method's extras, such as
    awq_search.pt), metadata, and the DONE marker last."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for name, data in (files or {}).items():
        atomic_write_bytes(run_dir / name, data)
    atomic_write_text(run_dir / CONFIG_FILE, config_yaml)
    atomic_write_bytes(run_dir / ROWS_FILE, frame.to_parquet(index=False))
    atomic_write_text(run_dir / CSV_FILE, frame.to_csv(index=False))
    atomic_write_text(run_dir / DONE_FILE, json.dumps(meta, indent=2, default=str) + "\n")


def is_complete(run_dir: Path) -> bool:
    run_dir = Path(run_dir)
    return (run_dir / DONE_FILE).exists() and (run_dir / ROWS_FILE).exists()


def read_run(run_dir: Path) -> pd.DataFrame:
    frame = pd.read_parquet(Path(run_dir) / ROWS_FILE)
    # a run written before a column existed (ci_low/ci_high) reads with that column empty
    return frame.reindex(columns=COLUMNS).astype(_DTYPES)


def find_run_dirs(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """Finished run directories under each path or glob (a run dir itself, or any tree containing them)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    found: set[Path] = set()
    for p in paths:
        for root in glob.glob(str(p)) or []:
            root = Path(root)
            if is_complete(root):
                found.add(root)
            elif root.is_dir():
                found.update(d.parent for d in root.rglob(DONE_FILE) if is_complete(d.parent))
    return sorted(found)


def load_results(paths: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """Every finished run under `paths` (dirs or globs) as one tidy DataFrame; unfinished runs are skipped."""
    dirs = find_run_dirs(paths)
    if not dirs:
        return to_frame([])
    return pd.concat([read_run(d) for d in dirs], ignore_index=True)
