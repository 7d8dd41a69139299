"""One-screen summaries of runs and sweeps, read from the tidy rows."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.experimental.callback import Callback

from harness.labels import PRIMARY_KEYS
from harness.results import load_results

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
    table = pd.concat(parts, axis=1)
    return table.sort_index().to_string(float_format=lambda v: f"{v:.3f}")


class SweepSummary(Callback):
    """Hydra callback: after a -m sweep, print one table of every run in it."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        run_dirs = sorted({Path(p.read_text().strip()) for p in sweep_dir.glob(f"*/{RUN_FILE}")})
        frame = load_results(run_dirs) if run_dirs else pd.DataFrame()
        log.info("sweep summary (%d runs, rows in %s):\n%s", len(run_dirs),
                 ", ".join(sorted({str(d.parent) for d in run_dirs})) or "-", summary_table(frame))
