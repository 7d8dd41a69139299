"""Choosing the rows a report shows: one row per key, the reference run, the keys that vary, the main-table runs;
and where each run lives (its per-block and per-document records feed the paired tests)."""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.labels import SECONDARY_KEYS, is_reference, latest_per_key
from analysis.results import DTYPES, ROWS_FILE, find_run_dirs

__all__ = ["collapse_draws", "is_reference", "latest_per_key", "main_rows", "run_directories", "varying_keys"]


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


LOG_SCALE = {"ppl", "base_ppl", "ppl_ratio_vs_base"}  # metrics averaged over draws as geometric means


def collapse_draws(rows: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """One row per observation for each configuration with several calibration draws (runs that share
    `replicate_of` and the model fingerprint, and differ in `calib_seed`), and {its row id: the draws' run ids}.

    The row is the mean over draws (geometric for ppl-type metrics) with an interval that includes the draws:
    se^2 = mean(se_i^2) + f var(values) / K, f the median-unbiased factor of analysis.replicates, t with
    Satterthwaite's df. That counts the per-run token noise once more than the exact crossed design does
    (conservative); the paired tests (bold, wins) use the exact design from the runs' blocks."""
    from scipy import stats as sstats

    from analysis.replicates import median_unbiased

    if rows.empty or "replicate_of" not in rows:
        return rows, {}
    keyed = rows.assign(_rep=rows["replicate_of"].astype("string"), _fp=rows["model_fingerprint"].astype("string"))
    draws = keyed[keyed["calib_seed"].notna() & keyed["_rep"].notna()]
    counts = draws.groupby(["_rep", "_fp"], dropna=False)["calib_seed"].nunique()
    replicated = counts[counts > 1]
    if replicated.empty:
        return rows, {}
    groups, out = {}, []
    keep = pd.Series(True, index=rows.index)
    for (rep, fp), k in replicated.items():
        members = draws[(draws["_rep"] == rep) & (draws["_fp"] == fp)]
        keep[members.index] = False
        seeds = sorted(int(s) for s in members["calib_seed"].unique())
        group_id = f"{rep} ({k} draws)"
        groups[group_id] = sorted(str(r) for r in members["run_id"].unique())
        for _, obs in members.groupby(["suite", "task", "metric"], sort=False):
            row = obs.iloc[-1].copy()
            values = obs["value"].astype(float).to_numpy()
            log = row["metric"] in LOG_SCALE and (values > 0).all()
            v = np.log(values) if log else values
            se = obs["stderr"].astype(float).to_numpy()
            se = se / values if log else se
            mean = float(v.mean())
            row["value"] = float(np.exp(mean)) if log else mean
            row["run_id"], row["calib_seed"] = group_id, pd.NA
            row["detail"] = json.dumps({"draws": len(obs), "seeds": seeds, "interval": "includes the draws"})
            if len(obs) > 1 and not np.isnan(se).any():
                token, draw = float(np.mean(se ** 2)), median_unbiased(len(obs) - 1) * float(v.var(ddof=1)) / len(obs)
                total = token + draw
                df = total ** 2 / (draw ** 2 / (len(obs) - 1)) if draw > 0 else 1e6
                q = float(sstats.t.ppf(0.975, df)) * np.sqrt(total)
                lo, hi = mean - q, mean + q
                row["stderr"] = float(np.sqrt(total) * (row["value"] if log else 1.0))
                row["ci_low"], row["ci_high"] = (float(np.exp(lo)), float(np.exp(hi))) if log else (lo, hi)
            else:
                row["stderr"] = row["ci_low"] = row["ci_high"] = np.nan
            out.append(row)
    collapsed = pd.DataFrame(out).drop(columns=["_rep", "_fp"])
    collapsed = collapsed.astype({k: v for k, v in DTYPES.items() if k in collapsed})
    merged = pd.concat([rows[keep.to_numpy()], collapsed], ignore_index=True)
    return merged, groups
