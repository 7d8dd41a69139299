"""One-screen summaries of runs and sweeps, read from the tidy rows."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.experimental.callback import Callback

from analysis.labels import PRIMARY_KEYS
from analysis.results import load_results

log = logging.getLogger(__name__)
RUN_FILE = "run_dir.txt"  # each Hydra job records where its results went


def summary_table(frame: pd.DataFrame) -> str:
    """Perplexity per eval set (and lm-eval acc per task when present) for each run, as text."""
    if frame.empty:
        return "(no rows)"
    frame = frame.assign(group_size=frame["group_size"].astype("string").fillna("-"),
                         bits=frame["bits"].astype("string").fillna("-"),
                         calib_source=frame["calib_source"].astype("string").fillna("-"))
    index = ["model", *PRIMARY_KEYS]
    if frame["calib_source"].nunique() > 1:  # e.g. a calibration-robustness sweep: keep the runs apart
        index.append("calib_source")
    for key in ("calib_samples", "calib_seed"):  # budgets, and replicate draws: one line per run
        if frame[key].dropna().nunique() > 1:
            frame = frame.assign(**{key: frame[key].astype("string").fillna("-")})
            index.append(key)
    parts = []
    ppl = frame[(frame["suite"] == "ppl") & (frame["metric"] == "ppl")]
    if not ppl.empty:
        parts.append(ppl.pivot_table(index=index, columns="task", values="value", aggfunc="last").add_prefix("ppl_"))
    acc = frame[(frame["suite"] == "lm_eval") & (frame["metric"] == "acc")]
    if not acc.empty:
        parts.append(acc.pivot_table(index=index, columns="task", values="value", aggfunc="last").add_prefix("acc_"))
    quant = frame[(frame["suite"] == "quant") & (frame["metric"] == "quant_wall_s")]
    if not quant.empty:
        parts.append(quant.pivot_table(index=index, values="value", aggfunc="last").rename(columns={"value": "quant_s"}))
    if not parts:
        return "(no ppl or lm_eval rows)"
    table = pd.concat(parts, axis=1).sort_index()
    text = table.to_string(float_format=lambda v: f"{v:.3f}")
    if "calib_seed" in index:
        over = [k for k in index if k != "calib_seed"]
        ppl_cols = [c for c in table.columns if c.startswith("ppl_")]
        spread = table[ppl_cols].groupby(level=over).agg(["mean", "min", "max", "count"])
        text += ("\n\nover calibration draws (mean, min, max, draws; python -m analysis.compare for intervals "
                 "that include the draws):\n" + spread.to_string(float_format=lambda v: f"{v:.3f}"))
    return text


def interval_text(value: float, low: float | None, high: float | None, fmt: str = ".3f") -> str:
    """'18.480 [18.210, 18.760]', or the bare value where there is no interval (too little data)."""
    if low is None or high is None or pd.isna(low) or pd.isna(high):
        return f"{value:{fmt}} [no CI]"
    return f"{value:{fmt}} [{low:{fmt}}, {high:{fmt}}]"


def versus_baseline(frame: pd.DataFrame) -> str:
    """One run against the unquantized model on the same tokens, per eval set: ppl and the baseline's, their ratio,
    mean KLD and top-1 agreement, each with its 95% interval. Empty when the run measured no KLD."""
    ppl = frame[frame["suite"] == "ppl"].drop_duplicates(["task", "metric"], keep="last").set_index(["task", "metric"])
    if ppl.empty or "kld" not in set(ppl.index.get_level_values("metric")):
        return ""
    lines = []
    for task in dict.fromkeys(ppl.index.get_level_values("task")):
        def cell(metric: str, fmt: str = ".3f") -> str:
            r = ppl.loc[(task, metric)]
            return interval_text(r["value"], r["ci_low"], r["ci_high"], fmt)

        lines.append({"set": task, "ppl": cell("ppl"), "baseline ppl": cell("base_ppl"),
                      "ratio": cell("ppl_ratio_vs_base", ".4f"), "KLD": cell("kld", ".4f"),
                      "top-1 agree": cell("top1_agree", ".3f")})
    return ("vs the unquantized model on the same tokens (95% intervals over blocks of tokens):\n" +
            pd.DataFrame(lines).to_string(index=False))


class SweepSummary(Callback):
    """Hydra callback: after a -m sweep, print one table of every run in it."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        run_dirs = sorted({Path(p.read_text().strip()) for p in sweep_dir.glob(f"*/{RUN_FILE}")})
        frame = load_results(run_dirs) if run_dirs else pd.DataFrame()
        log.info("sweep summary (%d runs, rows in %s):\n%s", len(run_dirs),
                 ", ".join(sorted({str(d.parent) for d in run_dirs})) or "-", summary_table(frame))
