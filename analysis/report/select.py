"""Choosing the rows a report shows: one row per key, the reference run, the keys that vary, the main-table runs;
and where each run lives (its per-block and per-document records feed the paired tests)."""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.labels import CONFIG_KEYS, FINGERPRINT, SECONDARY_KEYS, VARIANT, is_reference, latest_per_key
from analysis.results import DONE_FILE, DTYPES, ROWS_FILE, find_run_dirs

__all__ = ["collapse_draws", "is_reference", "latest_per_key", "main_rows", "run_directories", "varying_keys",
           "with_variants"]


def varying_keys(frame: pd.DataFrame) -> list[str]:
    """Secondary config keys that take more than one non-missing value, so rows must be split by them; and the
    variant wherever a run has one (the other runs of its config keys show the dash)."""
    keys = [k for k in SECONDARY_KEYS if frame[k].dropna().nunique() > 1]
    return keys + ([VARIANT] if VARIANT in frame and frame[VARIANT].notna().any() else [])


def with_variants(frame: pd.DataFrame, run_dirs: Mapping[str, Path] | None = None) -> pd.DataFrame:
    """`frame` with a `variant` column naming, for runs that share every config key and the model but not their run
    hash (config_hash), what in their result keys sets them apart: 'export=gptq', 'eval.max_windows=8', ... (read
    from each run's DONE marker, which records its result key); 'config <hash>' where a run's key cannot be read.
    Missing (the dash) for a run that has none of the differing entries, and for every other run."""
    variant = pd.Series(pd.NA, index=frame.index, dtype=object)
    hashes = frame["config_hash"].astype(object)
    for _, group in frame.groupby(CONFIG_KEYS + [FINGERPRINT], dropna=False, sort=False):
        distinct = sorted({str(h) for h in group["config_hash"].dropna()})
        if len(distinct) < 2:
            continue
        keys = {h: _flat_result_key(run_dirs, group.loc[hashes[group.index] == h, "run_id"].iloc[0]) for h in distinct}
        if any(k is None for k in keys.values()):
            names = {h: f"config {h}" for h in distinct}
        else:
            differ = sorted(k for k in set().union(*keys.values())
                            if len({json.dumps(flat.get(k), default=str) for flat in keys.values()}) > 1)
            names = {h: ", ".join(f"{k}={_short(keys[h][k])}" for k in differ if k in keys[h]) or pd.NA
                     for h in distinct}
        for h, name in names.items():
            variant[group.index[(hashes[group.index] == h).to_numpy()]] = name
    return frame.assign(**{VARIANT: variant})


def _flat_result_key(run_dirs: Mapping[str, Path] | None, run_id) -> dict | None:
    """The run's result key (harness/identity.py, as its DONE marker recorded it) as {dotted key: value}, without
    None-valued entries (the run hash leaves them out too); None where it cannot be read."""
    path = (run_dirs or {}).get(str(run_id))
    try:
        key = json.loads((Path(path) / DONE_FILE).read_text())["result_key"]
    except (TypeError, OSError, ValueError, KeyError):
        return None
    flat: dict = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif value is not None:
            flat[prefix] = value

    walk("", key)
    return flat


def _short(value, width: int = 40) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= width else "…" + text[-(width - 1):]


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
