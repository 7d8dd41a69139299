"""Choosing the rows a report shows: one row per key, the reference run, the keys that vary, the main-table runs;
and where each run lives (its per-block and per-document records feed the paired tests)."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from analysis.labels import SECONDARY_KEYS, is_reference, latest_per_key
from analysis.results import ROWS_FILE, find_run_dirs

__all__ = ["is_reference", "latest_per_key", "main_rows", "run_directories", "varying_keys"]


def varying_keys(frame: pd.DataFrame) -> list[str]:
    """Secondary config keys that take more than one non-missing value, so rows must be split by them."""
    return [k for k in SECONDARY_KEYS if frame[k].dropna().nunique() > 1]


def main_rows(frame: pd.DataFrame, main_calib: str | None) -> pd.DataFrame:
    """Rows for the main table: all, or only runs calibrated on `main_calib` plus runs needing no calibration."""
    if main_calib is None:
        return frame
    return frame[frame["calib_source"].isna() | (frame["calib_source"] == main_calib)]


def run_directories(paths: str | Path | Iterable[str | Path]) -> dict[str, Path]:
    """run_id -> directory of every finished run under `paths` (the first directory, sorted, when a run_id repeats)."""
    found: dict[str, Path] = {}
    for run_dir in find_run_dirs(paths):
        for run_id in pd.read_parquet(run_dir / ROWS_FILE, columns=["run_id"])["run_id"].dropna().unique():
            found.setdefault(str(run_id), run_dir)
    return found
