"""Choosing the rows a report shows: one row per key, the reference run, the keys that vary, the main-table runs."""
from __future__ import annotations

import pandas as pd

from harness.labels import SECONDARY_KEYS, is_reference, latest_per_key

__all__ = ["is_reference", "latest_per_key", "main_rows", "varying_keys"]


def varying_keys(frame: pd.DataFrame) -> list[str]:
    """Secondary config keys that take more than one non-missing value, so rows must be split by them."""
    return [k for k in SECONDARY_KEYS if frame[k].dropna().nunique() > 1]


def main_rows(frame: pd.DataFrame, main_calib: str | None) -> pd.DataFrame:
    """Rows for the main table: all, or only runs calibrated on `main_calib` plus runs needing no calibration."""
    if main_calib is None:
        return frame
    return frame[frame["calib_source"].isna() | (frame["calib_source"] == main_calib)]
