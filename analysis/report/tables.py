"""Tables as (text, bold) frame pairs: numbers become cell text, and a mask says which cells are bold; the main
table and the wins/ties/losses matrix also come with a note saying which test decided them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd

from analysis.labels import (CONFIG_KEYS, DASH, LABEL_KEYS, REFERENCE_METHOD, config_keys, config_label,
                            label_columns, label_row_names)
from analysis.report.select import varying_keys
from analysis.report.significance import (ALPHA, PAIRED_TESTS, CellSpec, ColumnDecision, PairedEvidence,
                                         not_worse_than_best, wins_ties_losses)

# Everything that identifies a calibration-robustness group except the calibration source itself.
ROBUSTNESS_GROUP = [k for k in CONFIG_KEYS if k != "calib_source"]


def pivot_unique(frame: pd.DataFrame, index: list[str], columns: str | list[str]) -> pd.DataFrame:
    """pivot_table of `value` that refuses to aggregate: each cell must come from exactly one row."""
    counts = frame.pivot_table(index=index, columns=columns, values="value", aggfunc="size", sort=False)
    if (counts > 1).to_numpy().any():
        raise ValueError("several rows fall into one table cell; deduplicate by key first")
    return frame.pivot_table(index=index, columns=columns, values="value", aggfunc="first", sort=False)


class Table(NamedTuple):
    """A rendered table: cell text (Markdown/plain), bold mask, a note printed below it, and optionally the LaTeX of
    cells that need more than escaping their text (same shape as `text`; a missing cell means: escape the text)."""

    text: pd.DataFrame
    bold: pd.DataFrame
    note: str = ""
    latex: pd.DataFrame | None = None


# Main-table quantities: header prefix/suffix, digits, whether a delta vs fp is shown, column order.
MAIN_KINDS = {"ppl": ("PPL {task}", 2, True, 0), "kld": ("KLD {task}", 4, False, 1),
              "acc": ("{task} {metric} (%)", 2, True, 2)}


def main_observations(frame: pd.DataFrame, acc_metric: str) -> pd.DataFrame:
    """Perplexity, mean KLD vs fp and lm-eval accuracy rows, each with its column header, the name analysis.compare
    gives the quantity (`kind`), a 'higher is better' flag, a display scale and digits, and whether to show a delta."""
    parts = []
    for kind, suite, metric, higher, scale in (("ppl", "ppl", "ppl", False, 1.0), ("kld", "ppl", "kld", False, 1.0),
                                               ("acc", "lm_eval", acc_metric, True, 100.0)):
        rows = frame[(frame["suite"] == suite) & (frame["metric"] == metric)]
        header, digits, delta, order = MAIN_KINDS[kind]
        parts.append(rows.assign(
            column=[header.format(task=t, metric=acc_metric) for t in rows["task"].astype(str)],
            kind=acc_metric if kind == "acc" else kind, higher_better=higher, scale=scale, digits=digits,
            delta=delta, order=order))
    parts = [p for p in parts if not p.empty]
    return pd.concat(parts) if parts else frame.iloc[0:0]


@dataclass
class MainGrid:
    """The main table as numbers: one row per config (index = display label columns), one column per quantity."""

    values: pd.DataFrame  # scaled for display (accuracy in percent)
    ci_low: pd.DataFrame
    ci_high: pd.DataFrame
    run_ids: pd.DataFrame  # the run behind each cell
    specs: pd.DataFrame  # per column: kind, task, higher_better, digits, delta

    @property
    def is_reference(self) -> np.ndarray:
        return np.asarray(self.values.index.get_level_values("Method") == REFERENCE_METHOD)

    def cell_specs(self) -> list[CellSpec]:
        return [CellSpec(c, s.kind, s.task, bool(s.higher_better)) for c, s in self.specs.iterrows()]


def main_grid(frame: pd.DataFrame, acc_metric: str = "acc") -> MainGrid | None:
    """Values, intervals and run ids of the main table (None without ppl, KLD or accuracy rows)."""
    obs = main_observations(frame, acc_metric)
    if obs.empty:
        return None
    extra = varying_keys(obs)
    labels = label_columns(obs, extra)
    obs = obs.join(labels).loc[labels.index]
    index = list(labels.columns)
    specs = obs.groupby("column")[["kind", "task", "higher_better", "scale", "digits", "delta", "order"]].first()
    specs = specs.sort_values(["order", "task"], kind="stable")
    values = pivot_unique(obs, index, "column")[specs.index]

    def field(name: str) -> pd.DataFrame:
        cells = obs.set_index(index + ["column"])[name].unstack("column")
        return cells.reindex(index=values.index, columns=values.columns)

    scale = specs["scale"]
    grid = MainGrid(values * scale, field("ci_low").astype(float) * scale, field("ci_high").astype(float) * scale,
                    field("run_id"), specs.drop(columns=["scale", "order"]))
    for part in (grid.values, grid.ci_low, grid.ci_high, grid.run_ids):
        part.columns.name = None
    return grid


def main_table(frame: pd.DataFrame, acc_metric: str = "acc",
               evidence: PairedEvidence | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows method x bits x group (x varying keys), columns PPL and KLD per eval set and acc per task: (text, bold)."""
    table = main_table_with_note(frame, acc_metric, evidence)
    return table.text, table.bold


def main_table_with_note(frame: pd.DataFrame, acc_metric: str = "acc", evidence: PairedEvidence | None = None
                         ) -> Table:
    """Cells 'value [ci_low, ci_high] (delta vs fp)' (LaTeX: 'value$^{+up}_{-down}$ (delta)'); bold = per column the
    best quantized value and every quantized value not significantly worse than it (see not_worse_than_best); the
    note says which test decided."""
    grid = main_grid(frame, acc_metric)
    if grid is None:
        return Table(pd.DataFrame(), pd.DataFrame())
    ref_mask = grid.is_reference
    reference = grid.values[ref_mask].iloc[0] if ref_mask.any() else None
    cells = {c: _interval_cells(grid, c, reference, ref_mask) for c in grid.values.columns}
    text = pd.DataFrame({c: [md for md, _ in v] for c, v in cells.items()}, index=grid.values.index)
    latex = pd.DataFrame({c: [tex for _, tex in v] for c, v in cells.items()}, index=grid.values.index)
    decisions = {}
    for column, spec in grid.specs.iterrows():
        decisions[column] = not_worse_than_best(
            grid.values[column], grid.ci_low[column], grid.ci_high[column], grid.run_ids[column].to_numpy(),
            ~ref_mask, bool(spec.higher_better), spec.kind, spec.task, evidence)
    bold = pd.DataFrame({c: d.bold for c, d in decisions.items()}, index=grid.values.index)
    index = list(grid.values.index.names)
    latex = latex.reset_index()
    latex[index] = None
    return Table(text.reset_index(), _with_label_columns(bold, index), significance_note(decisions, ref_mask.any()),
                 latex)


def _interval_cells(grid: MainGrid, column: str, reference: pd.Series | None, ref_mask) -> list[tuple[str, str | None]]:
    """(text, LaTeX) per row: '12.34 [12.10, 12.58] (+0.56)', the interval where the row has one, the delta vs fp for
    quantized rows of columns that show one; in LaTeX the interval is compact, 12.34$^{+0.24}_{-0.24}$."""
    spec = grid.specs.loc[column]
    digits = int(spec.digits)
    ref = None if reference is None or not spec.delta else reference[column]
    cells = []
    for value, lo, hi, is_ref in zip(grid.values[column], grid.ci_low[column], grid.ci_high[column], ref_mask):
        if pd.isna(value):
            cells.append((DASH, None))
            continue
        md = tex = f"{value:.{digits}f}"
        if pd.notna(lo) and pd.notna(hi):
            md += f" [{lo:.{digits}f}, {hi:.{digits}f}]"
            tex += f"$^{{+{max(hi - value, 0.0):.{digits}f}}}_{{-{max(value - lo, 0.0):.{digits}f}}}$"
        if not is_ref and ref is not None and pd.notna(ref):
            delta = f" ({value - ref:+.{digits}f})"
            md, tex = md + delta, tex + delta
        cells.append((md, tex))
    return cells


def significance_note(decisions: dict[str, ColumnDecision], has_reference: bool) -> str:
    """What the bold cells of the main table mean and which test decided them, column by column."""
    who = "quantized value" if has_reference else "value"
    paired = [c for c, d in decisions.items() if d.paired]
    by_intervals = [f"{c} ({d.intervals})" for c, d in decisions.items() if d.intervals]
    best_only = [f"{c} ({d.best_only})" for c, d in decisions.items() if d.best_only]
    parts = [(f"Intervals: each config's own 95% interval (perplexity and KLD over blocks of tokens, accuracy Wilson), "
              f"not adjusted for multiplicity and not what decides bold. Bold: in each column the best {who} and every "
              f"{who} not significantly worse than it.")]
    if paired:
        parts.append(f"Test: the best config against each other config with {PAIRED_TESTS}. Family: the comparisons "
                     f"with the best of one column (one family per column, Holm's correction within it, family-wise "
                     f"level {ALPHA:.2g}); paired tests per column: "
                     + ", ".join(f"{c} ({decisions[c].paired})" for c in paired) + ".")
    if by_intervals:
        parts.append("Configs without paired records against the best (no blocks.parquet/docs.parquet, or not the "
                     "same tokens or documents) are bold when their 95% interval overlaps the best one's (outside the "
                     "family, no test at a stated level): " + ", ".join(by_intervals) + ".")
    if best_only:
        parts.append("Without paired records or intervals only the best value is bold: " + ", ".join(best_only) + ".")
    return " ".join(parts)


def wins_table(frame: pd.DataFrame, acc_metric: str, evidence: PairedEvidence | None) -> Table:
    """Config x config 'wins/ties/losses' of the row config against the column config over every main-table
    quantity both measured on identical data (Holm over the whole matrix), plus a total column; empty without
    any paired test."""
    grid = main_grid(frame, acc_metric)
    if grid is None or evidence is None or len(grid.values) < 2:
        return Table(pd.DataFrame(), pd.DataFrame())
    counts, n_tests = wins_ties_losses(grid.run_ids, grid.cell_specs(), grid.is_reference, evidence)
    if n_tests == 0:
        return Table(pd.DataFrame(), pd.DataFrame())
    names = label_row_names(grid.values.index.to_frame(index=False))
    n = len(names)
    compared = counts.sum(axis=2) > 0
    text = pd.DataFrame({"config": [f"({i + 1}) {name}" for i, name in enumerate(names)]})
    for j in range(n):
        text[f"({j + 1})"] = [DASH if i == j or not compared[i, j] else "/".join(map(str, counts[i, j]))
                              for i in range(n)]
    text["total"] = ["/".join(map(str, counts[i].sum(axis=0))) if compared[i].any() else DASH for i in range(n)]
    bold = pd.DataFrame(False, index=text.index, columns=text.columns)
    metric = f"accuracy ({acc_metric})"
    note = (f"Each cell: wins/ties/losses of the row config against the column config, one per perplexity set, KLD "
            f"set (not against fp, from which KLD is measured) and lm-eval task ({metric}) that both measured on "
            f"identical tokens or documents; {DASH} where no such pair exists. Family: all {n_tests} tests of the "
            f"matrix ({PAIRED_TESTS}); a win or loss is a significant difference after Holm's correction over the "
            f"family at family-wise level {ALPHA:.2g}, a tie is none. Runs without per-block/per-document records "
            "count nothing.")
    return Table(text, bold, note)


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


def robustness_matrices(frame: pd.DataFrame, with_runs: bool = False) -> list[tuple]:
    """Per config calibrated on several sources: (config label, ppl matrix rows calib source x cols eval set), and
    with `with_runs` the run id behind each cell (the paired tests of the penalties need them)."""
    ppl = frame[(frame["suite"] == "ppl") & (frame["metric"] == "ppl") & frame["calib_source"].notna()]
    out = []
    group_keys = ROBUSTNESS_GROUP + [k for k in config_keys(frame) if k not in CONFIG_KEYS]
    for _, group in ppl.groupby(group_keys, dropna=False, sort=True):
        if group["calib_source"].nunique() < 2:
            continue
        label = config_label(group.head(1), [k for k in LABEL_KEYS if k != "calib_source"
                                              and k in group and group[k].notna().any()]).iloc[0]
        matrix = pivot_unique(group, ["calib_source"], "task")
        matrix.index.name, matrix.columns.name = "calibrated on", "eval set"
        if with_runs:
            runs = group.set_index(["calib_source", "task"])["run_id"].unstack("task")
            out.append((label, matrix, runs.reindex(index=matrix.index, columns=matrix.columns)))
        else:
            out.append((label, matrix))
    return out


def robustness_penalty(matrix: pd.DataFrame) -> pd.DataFrame:
    """Out-of-domain penalty: ppl on set E when calibrated on C minus ppl on E when calibrated on E."""
    in_domain = pd.Series({e: matrix.loc[e, e] for e in matrix.columns if e in matrix.index}, dtype="float64")
    penalty = matrix[in_domain.index] - in_domain
    penalty.columns.name = matrix.columns.name
    return penalty


def robustness_tables(matrix: pd.DataFrame, runs: pd.DataFrame | None = None,
                      evidence: PairedEvidence | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Matrix cells 'ppl (penalty)' with the in-domain cell marked bold; eval sets with no in-domain run show ppl only.
    The penalty is the ratio to the in-domain ppl with its interval (over token blocks and, for configurations with
    replicate draws, the draws) where `evidence` holds both runs' records, else the difference of ppls."""
    penalty = robustness_penalty(matrix)
    ratios = {}
    if runs is not None and evidence is not None:
        for calib in matrix.index:
            for eval_set in matrix.columns:
                if calib != eval_set and eval_set in matrix.index:
                    got = evidence.ratio(runs.loc[calib, eval_set], runs.loc[eval_set, eval_set], "ppl", eval_set)
                    if got is not None:
                        ratios[calib, eval_set] = got
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
            elif (calib, eval_set) in ratios:
                ratio, low, high = ratios[calib, eval_set]
                text.loc[calib, eval_set] = f"{value:.2f} (×{ratio:.3f} [{low:.3f}, {high:.3f}])"
            elif eval_set in penalty.columns and pd.notna(penalty.loc[calib, eval_set]):
                text.loc[calib, eval_set] = f"{value:.2f} ({penalty.loc[calib, eval_set]:+.2f})"
            else:
                text.loc[calib, eval_set] = f"{value:.2f}"
    flat_bold = bold.reset_index()
    flat_bold[matrix.index.name] = False
    return text.reset_index(), flat_bold
