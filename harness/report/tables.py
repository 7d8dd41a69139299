"""Tables as (text, bold) frame pairs: numbers become cell text, and a mask says which cells are bold."""
from __future__ import annotations

import pandas as pd

from harness.labels import CONFIG_KEYS, DASH, REFERENCE_METHOD, SECONDARY_KEYS, config_label, label_columns
from harness.report.select import varying_keys

# Everything that identifies a calibration-robustness group except the calibration source itself.
ROBUSTNESS_GROUP = [k for k in CONFIG_KEYS if k != "calib_source"]


def pivot_unique(frame: pd.DataFrame, index: list[str], columns: str | list[str]) -> pd.DataFrame:
    """pivot_table of `value` that refuses to aggregate: each cell must come from exactly one row."""
    counts = frame.pivot_table(index=index, columns=columns, values="value", aggfunc="size", sort=False)
    if (counts > 1).to_numpy().any():
        raise ValueError("several rows fall into one table cell; deduplicate by key first")
    return frame.pivot_table(index=index, columns=columns, values="value", aggfunc="first", sort=False)


def main_observations(frame: pd.DataFrame, acc_metric: str) -> pd.DataFrame:
    """Perplexity and lm-eval accuracy rows, with a column header and a 'higher is better' flag each."""
    ppl = frame[(frame["suite"] == "ppl") & (frame["metric"] == "ppl")]
    acc = frame[(frame["suite"] == "lm_eval") & (frame["metric"] == acc_metric)]
    ppl = ppl.assign(column="PPL " + ppl["task"].astype(str), higher_better=False, scale=1.0)
    acc = acc.assign(column=acc["task"].astype(str) + f" {acc_metric} (%)", higher_better=True, scale=100.0)
    return pd.concat([ppl, acc])


def main_table(frame: pd.DataFrame, acc_metric: str = "acc") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows method x bits x group (x varying keys), columns PPL per eval set and acc per task: (text, bold)."""
    obs = main_observations(frame, acc_metric)
    if obs.empty:
        return pd.DataFrame(), pd.DataFrame()
    extra = varying_keys(obs)
    labels = label_columns(obs, extra)
    obs = obs.join(labels).loc[labels.index]
    index = list(labels.columns)
    values = pivot_unique(obs, index, "column") * _column_scale(obs)
    higher = obs.groupby("column")["higher_better"].first()
    ref_mask = values.index.get_level_values("Method") == REFERENCE_METHOD
    reference = values[ref_mask].iloc[0] if ref_mask.any() else None
    text = values.apply(lambda col: _delta_cells(col, reference, ref_mask))
    bold = values.apply(lambda col: _best_mask(col, ~ref_mask, bool(higher[col.name])))
    text.columns.name = bold.columns.name = None
    return text.reset_index(), _with_label_columns(bold, index)


def _column_scale(obs: pd.DataFrame) -> pd.Series:
    return obs.groupby("column")["scale"].first()


def _delta_cells(col: pd.Series, reference: pd.Series | None, ref_mask) -> pd.Series:
    """'12.34 (+0.56)' for quantized rows; the reference row shows its value alone."""
    ref = None if reference is None else reference[col.name]
    cells = []
    for value, is_ref in zip(col, ref_mask):
        if pd.isna(value):
            cells.append(DASH)
        elif is_ref or ref is None or pd.isna(ref):
            cells.append(f"{value:.2f}")
        else:
            cells.append(f"{value:.2f} ({value - ref:+.2f})")
    return pd.Series(cells, index=col.index)


def _best_mask(col: pd.Series, candidates, higher_better: bool) -> pd.Series:
    """True where a quantized row holds the best value of the column (ties all marked)."""
    pool = col[candidates].dropna()
    if pool.empty:
        return pd.Series(False, index=col.index)
    best = pool.max() if higher_better else pool.min()
    return pd.Series((col == best).fillna(False).to_numpy() & candidates, index=col.index)


def _with_label_columns(bold: pd.DataFrame, index: list[str]) -> pd.DataFrame:
    flat = bold.reset_index()
    flat[index] = False
    return flat


def simple_table(frame: pd.DataFrame, index: list[str], extra: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows `index`, one column per config label, 4 significant digits, nothing bolded (timing/quant tables)."""
    if frame.empty:
        return pd.DataFrame(), pd.DataFrame()
    labelled = frame.assign(config=config_label(frame, extra)).loc[label_columns(frame, extra).index]
    values = pivot_unique(labelled, index, "config")
    text = values.map(lambda v: DASH if pd.isna(v) else f"{v:.4g}").reset_index()
    return text, pd.DataFrame(False, index=text.index, columns=text.columns)


def timing_table(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Timing rows: one row per (task, metric), one column per config."""
    timing = frame[frame["suite"] == "timing"]
    return simple_table(timing, ["task", "metric"], varying_keys(timing))


def quant_table(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Quantization cost rows (quant_wall_s, storage bits/weight, ...): one row per metric, one column per config."""
    quant = frame[frame["suite"] == "quant"]
    return simple_table(quant, ["metric"], varying_keys(quant))


def robustness_matrices(frame: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """Per config calibrated on several sources: (config label, ppl matrix rows calib source x cols eval set)."""
    ppl = frame[(frame["suite"] == "ppl") & (frame["metric"] == "ppl") & frame["calib_source"].notna()]
    out = []
    for _, group in ppl.groupby(ROBUSTNESS_GROUP, dropna=False, sort=True):
        if group["calib_source"].nunique() < 2:
            continue
        label = config_label(group.head(1), [k for k in SECONDARY_KEYS if k != "calib_source"
                                              and group[k].notna().any()]).iloc[0]
        matrix = pivot_unique(group, ["calib_source"], "task")
        matrix.index.name, matrix.columns.name = "calibrated on", "eval set"
        out.append((label, matrix))
    return out


def robustness_penalty(matrix: pd.DataFrame) -> pd.DataFrame:
    """Out-of-domain penalty: ppl on set E when calibrated on C minus ppl on E when calibrated on E."""
    in_domain = pd.Series({e: matrix.loc[e, e] for e in matrix.columns if e in matrix.index}, dtype="float64")
    penalty = matrix[in_domain.index] - in_domain
    penalty.columns.name = matrix.columns.name
    return penalty


def robustness_tables(matrix: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Matrix cells 'ppl (penalty)' with the in-domain cell marked bold; eval sets with no in-domain run show ppl only."""
    penalty = robustness_penalty(matrix)
    text = matrix.copy().astype(object)
    bold = pd.DataFrame(False, index=matrix.index, columns=matrix.columns)
    for calib in matrix.index:
        for eval_set in matrix.columns:
            value = matrix.loc[calib, eval_set]
            if pd.isna(value):
                text.loc[calib, eval_set] = DASH
            elif calib == eval_set:
                text.loc[calib, eval_set] = f"{value:.2f}"
                bold.loc[calib, eval_set] = True
            elif eval_set in penalty.columns and pd.notna(penalty.loc[calib, eval_set]):
                text.loc[calib, eval_set] = f"{value:.2f} ({penalty.loc[calib, eval_set]:+.2f})"
            else:
                text.loc[calib, eval_set] = f"{value:.2f}"
    flat_bold = bold.reset_index()
    flat_bold[matrix.index.name] = False
    return text.reset_index(), flat_bold
