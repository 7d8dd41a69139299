"""Paper-ready comparison reports (Markdown, LaTeX booktabs, plots) built from tidy result rows.

Reads results only and never runs a model. Every number printed is read from the rows; the only
arithmetic is the requested deltas (vs the fp row, and the out-of-domain penalty) and unit
changes for display (accuracy shown in percent).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from harness.results import load_results

CONFIG_KEYS = ["model", "method", "bits", "group_size", "symmetric", "calib_source", "calib_samples",
               "calib_seqlen", "seed"]
OBS_KEYS = ["suite", "task", "metric"]
ROW_KEYS = CONFIG_KEYS + OBS_KEYS
REFERENCE_METHOD = "fp"
# Keys that only split table rows when they actually vary; method/bits/group always do.
SECONDARY_KEYS = ["symmetric", "calib_source", "calib_samples", "calib_seqlen", "seed"]
# Table headers for those keys (distinct from the raw column names so both can live in one frame).
DISPLAY = {"symmetric": "Sym", "calib_source": "Calib", "calib_samples": "Samples", "calib_seqlen": "Seqlen",
           "seed": "Seed"}
# Everything that identifies a calibration-robustness group except the calibration source itself.
ROBUSTNESS_GROUP = [k for k in CONFIG_KEYS if k != "calib_source"]
MODEL_NOTES = {
    "smollm2_135m": "weights dequantized from a 4-bit GGUF (Q4_1) file; "
                    "the fp baseline is not a true full-precision model",
}
# Where a run may record the parameter count used to turn bits/weight into a model size.
PARAMS_DETAIL_KEY = "params"
DASH = "—"


# ---------------------------------------------------------------------------------------------
# Selecting rows
# ---------------------------------------------------------------------------------------------

def latest_per_key(frame: pd.DataFrame, keys: list[str] = ROW_KEYS) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Keep one row per key (latest started_at wins, run_id breaks ties); also return the superseded rows."""
    frame = frame.reset_index(drop=True)  # concatenated inputs repeat index labels; later joins need them unique
    started = pd.to_datetime(frame["started_at"], utc=True, errors="coerce", format="ISO8601")
    # Unparseable/missing timestamps sort first so any dated run supersedes them.
    order = frame.assign(_t=started).sort_values(["_t", "run_id"], na_position="first", kind="stable")
    dup = order.duplicated(subset=keys, keep="last")
    return order.loc[~dup].drop(columns="_t"), order.loc[dup].drop(columns="_t")


def varying_keys(frame: pd.DataFrame) -> list[str]:
    """Secondary config keys that take more than one non-missing value, so rows must be split by them."""
    return [k for k in SECONDARY_KEYS if frame[k].dropna().nunique() > 1]


def is_reference(frame: pd.DataFrame) -> pd.Series:
    """Rows of the unquantized reference run."""
    return frame["method"] == REFERENCE_METHOD


def _text(value, missing: str = DASH) -> str:
    return missing if pd.isna(value) else str(value)


def _group_text(method: str, group_size) -> str:
    # Missing group size means per-channel for a quantized method and "not applicable" for fp.
    if method == REFERENCE_METHOD:
        return DASH
    return "per-channel" if pd.isna(group_size) else str(group_size)


def label_columns(frame: pd.DataFrame, extra: list[str]) -> pd.DataFrame:
    """Display columns (Method, Bits, Group, then each varying key) as strings, in a paper-friendly row order."""
    labels = pd.DataFrame({
        "Method": frame["method"],
        "Bits": frame["bits"].map(_text),
        "Group": [_group_text(m, g) for m, g in zip(frame["method"], frame["group_size"])],
    }, index=frame.index)
    for key in extra:
        labels[DISPLAY[key]] = frame[key].map(_text)
    # fp first, then method name, more bits first, per-channel before grouped, larger groups first.
    sort = pd.DataFrame({
        "ref": ~is_reference(frame), "method": frame["method"],
        "bits": -frame["bits"].astype("Float64").fillna(99), "gs": -frame["group_size"].astype("Float64").fillna(1e9),
    }, index=frame.index)
    for key in extra:
        sort[key] = labels[DISPLAY[key]]
    return labels.loc[sort.sort_values(list(sort.columns), kind="stable").index]


def config_label(frame: pd.DataFrame, extra: list[str]) -> pd.Series:
    """One short string per row naming its config, e.g. 'awq w4 g128' or 'fp'."""
    labels = label_columns(frame, extra)
    text = labels["Method"].where(labels["Bits"] == DASH, labels["Method"] + " w" + labels["Bits"])
    grouped = labels["Group"] != DASH
    text = text.where(~grouped, text + " " + labels["Group"].where(labels["Group"] == "per-channel",
                                                                  "g" + labels["Group"]))
    for key in extra:
        shown = labels[DISPLAY[key]]
        text = text.where(shown == DASH, text + f" {DISPLAY[key].lower()}=" + shown)
    return text


def pivot_unique(frame: pd.DataFrame, index: list[str], columns: str | list[str]) -> pd.DataFrame:
    """pivot_table of `value` that refuses to aggregate: each cell must come from exactly one row."""
    counts = frame.pivot_table(index=index, columns=columns, values="value", aggfunc="size", sort=False)
    if (counts > 1).to_numpy().any():
        raise ValueError("several rows fall into one table cell; deduplicate by key first")
    return frame.pivot_table(index=index, columns=columns, values="value", aggfunc="first", sort=False)


# ---------------------------------------------------------------------------------------------
# Tables: numbers -> cell text + bold mask
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# Provenance
# ---------------------------------------------------------------------------------------------

def _distinct(series: pd.Series) -> list[str]:
    return sorted({str(v) for v in series.dropna()})


def merged_versions(frame: pd.DataFrame) -> dict[str, list[str]]:
    """Package -> every version seen across runs (more than one means the runs are not comparable as-is)."""
    seen: dict[str, set[str]] = {}
    for blob in frame["versions"].dropna().unique():
        try:
            parsed = json.loads(blob)
        except (TypeError, ValueError):
            parsed = {"(unparsed)": blob}
        for pkg, ver in (parsed or {}).items():
            seen.setdefault(pkg, set()).add(str(ver))
    return {pkg: sorted(v) for pkg, v in sorted(seen.items())}


def calibration_text(frame: pd.DataFrame) -> list[str]:
    """'wiki: 128 samples x 2048 tokens' for every calibration setting used."""
    calib = frame[frame["calib_source"].notna()][["calib_source", "calib_samples", "calib_seqlen"]].drop_duplicates()
    return sorted(f"{r.calib_source}: {_text(r.calib_samples, '?')} samples x {_text(r.calib_seqlen, '?')} tokens"
                  for r in calib.itertuples())


def provenance(frame: pd.DataFrame, superseded: pd.DataFrame) -> list[tuple[str, str]]:
    """(field, text) pairs describing where the numbers of one model come from."""
    model = frame["model"].iloc[0]
    versions = merged_versions(frame)
    fields = [
        ("model", str(model)),
        ("runs", str(frame["run_id"].nunique())),
        ("methods", ", ".join(_distinct(frame["method"]))),
        ("calibration", "; ".join(calibration_text(frame)) or "none"),
        ("commits", ", ".join(_distinct(frame["git_sha"])) or "unknown"),
        ("versions", "; ".join(f"{p} {'/'.join(v)}" for p, v in versions.items()) or "unknown"),
        ("devices", ", ".join(_distinct(frame["device"])) or "unknown"),
        ("seeds", ", ".join(_distinct(frame["seed"])) or "none"),
        ("model fingerprints", ", ".join(_distinct(frame["model_fingerprint"])) or "unknown"),
        ("data fingerprints", ", ".join(_distinct(frame["data_fingerprint"])) or "unknown"),
        ("started", f"{min(_distinct(frame['started_at']), default='?')} .. {max(_distinct(frame['started_at']), default='?')}"),
    ]
    if any(len(v) > 1 for v in versions.values()):
        fields.append(("warning", "runs used different package versions (listed above)"))
    if model in MODEL_NOTES:
        fields.append(("note", MODEL_NOTES[model]))
    mine = superseded[superseded["model"] == model]
    if not mine.empty:
        fields.append(("duplicates", duplicates_text(mine)))
    return fields


def duplicates_text(superseded: pd.DataFrame) -> str:
    """Which runs were superseded by a later run of the same config (latest started_at wins)."""
    runs = superseded.groupby("run_id", sort=True).agg(rows=("value", "size"), method=("method", "first"),
                                                       started_at=("started_at", "first"))
    parts = [f"{rid} ({r.method}, started {r.started_at}, {r.rows} rows)" for rid, r in runs.iterrows()]
    return f"{len(superseded)} rows superseded by a later run of the same key (latest started_at wins): " + "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------

def numeric_columns(text: pd.DataFrame) -> list[bool]:
    """Per column: every cell is a number or the dash, so it is right-aligned."""
    pattern = r"^[-+]?\d"
    return [bool(text[c].astype(str).str.match(pattern).where(text[c] != DASH, True).all()) for c in text.columns]


def render_markdown(text: pd.DataFrame, bold: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table; bold cells wrapped in ** **."""
    cells = [[f"**{t}**" if b else str(t) for t, b in zip(row_t, row_b)]
             for row_t, row_b in zip(text.itertuples(index=False), bold.itertuples(index=False))]
    header = "| " + " | ".join(str(c) for c in text.columns) + " |"
    rule = "|" + "|".join("---:" if num else "---" for num in numeric_columns(text)) + "|"
    return "\n".join([header, rule] + ["| " + " | ".join(r) + " |" for r in cells])


def latex_escape(text: str) -> str:
    """Escape LaTeX special characters in free text (model and task names have underscores)."""
    table = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
             "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "—": "---"}
    return "".join(table.get(ch, ch) for ch in str(text))


def render_latex(text: pd.DataFrame, bold: pd.DataFrame, caption: str) -> str:
    """A booktabs table; bold cells wrapped in \\textbf{}."""
    align = "".join("r" if num else "l" for num in numeric_columns(text))
    rows = []
    for row_t, row_b in zip(text.itertuples(index=False), bold.itertuples(index=False)):
        cells = [rf"\textbf{{{latex_escape(t)}}}" if b else latex_escape(t) for t, b in zip(row_t, row_b)]
        rows.append(" & ".join(cells) + r" \\")
    return "\n".join([
        r"\begin{table}[t]", r"\centering", r"\small", rf"\caption{{{latex_escape(caption)}}}",
        rf"\begin{{tabular}}{{{align}}}", r"\toprule",
        " & ".join(latex_escape(c) for c in text.columns) + r" \\", r"\midrule",
        *rows, r"\bottomrule", r"\end{tabular}", r"\end{table}",
    ])


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------

def _pyplot():
    # Agg: reports are written on headless machines; chosen at first use so importing stays side-effect free.
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, out_dir: Path, stem: str) -> list[Path]:
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.pdf"]
    for path in paths:
        fig.savefig(path, dpi=150)  # constrained layout already fits labels; "tight" would draw twice
    _pyplot().close(fig)
    return paths


def _panels(n: int, width: float = 4.0, height: float = 3.2):
    plt = _pyplot()
    ncols = min(n, 3)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _safe_stem(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(text))


def plot_ppl_vs_bits(frame: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Perplexity vs bits, one line per method (and group size), one panel per eval set; fp as a dashed line."""
    ppl = frame[(frame["suite"] == "ppl") & (frame["metric"] == "ppl")]
    quant = ppl[~is_reference(ppl) & ppl["bits"].notna()]
    if quant.empty:
        return []
    extra = varying_keys(quant)
    series = config_label(quant.assign(bits=pd.NA), extra)  # label without bits: bits is the x axis
    quant = quant.assign(series=series.reindex(quant.index))
    tasks = sorted(ppl["task"].unique())
    fig, axes = _panels(len(tasks))
    for ax, task in zip(axes, tasks):
        for name, line in quant[quant["task"] == task].groupby("series", sort=True):
            line = line.sort_values("bits")
            ax.plot(line["bits"].astype(float), line["value"], marker="o", label=name)
        ref = ppl[is_reference(ppl) & (ppl["task"] == task)]["value"]
        if not ref.empty:
            ax.axhline(ref.iloc[0], color="black", linestyle="--", linewidth=1, label="fp")
        ax.set(title=f"{task}", xlabel="bits", ylabel="perplexity")
        ax.set_xticks(sorted(quant["bits"].dropna().astype(int).unique()))
        ax.legend(fontsize=7)
    fig.suptitle(f"{frame['model'].iloc[0]}: perplexity vs bits")
    return _save(fig, out_dir, f"ppl_vs_bits_{_safe_stem(frame['model'].iloc[0])}")


def model_size(frame: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Per config: storage size (MB if a parameter count is recorded for every config, else bits/weight) and its axis name."""
    bpw = frame[(frame["suite"] == "quant") & (frame["metric"] == "storage_bits_per_weight")]
    params = bpw["detail"].map(_params_from_detail)
    if not bpw.empty and params.notna().all():
        # bits/weight x parameters / 8 bits per byte / 1e6 -> MB
        return bpw.assign(size=bpw["value"] * params / 8e6), "model size (MB)"
    return bpw.assign(size=bpw["value"]), "storage bits per weight"


def _params_from_detail(detail) -> float:
    try:
        return float(json.loads(detail)[PARAMS_DETAIL_KEY])
    except (TypeError, ValueError, KeyError):
        return float("nan")


def pareto_front(points: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Points not dominated by any other (smaller or equal x with strictly lower y), sorted by x."""
    ordered = points.sort_values([x, y], kind="stable")
    keep = ordered[y] < ordered[y].cummin().shift(fill_value=float("inf"))
    return ordered[keep]


def plot_size_vs_ppl(frame: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Model size vs perplexity per eval set, with the Pareto front of the quantized configs."""
    sizes, axis = model_size(frame)
    ppl = frame[(frame["suite"] == "ppl") & (frame["metric"] == "ppl")]
    if sizes.empty or ppl.empty:
        return []
    points = ppl.merge(sizes[CONFIG_KEYS + ["size"]], on=CONFIG_KEYS, how="inner")
    if points.empty:
        return []
    points = points.assign(label=config_label(points, varying_keys(points)).reindex(points.index))
    tasks = sorted(points["task"].unique())
    fig, axes = _panels(len(tasks))
    for ax, task in zip(axes, tasks):
        here = points[points["task"] == task]
        ax.scatter(here["size"], here["value"], s=18)
        for row in here.itertuples():
            ax.annotate(row.label, (row.size, row.value), fontsize=6, xytext=(3, 3), textcoords="offset points")
        front = pareto_front(here, "size", "value")
        ax.step(front["size"], front["value"], where="post", color="tab:red", marker="o", markerfacecolor="none",
                markersize=9, label="Pareto front")
        ref = ppl[is_reference(ppl) & (ppl["task"] == task)]["value"]
        if not ref.empty:
            ax.axhline(ref.iloc[0], color="black", linestyle="--", linewidth=1, label="fp")
        ax.set(title=task, xlabel=axis, ylabel="perplexity")
        ax.legend(fontsize=7)
    fig.suptitle(f"{frame['model'].iloc[0]}: size vs perplexity")
    return _save(fig, out_dir, f"size_vs_ppl_{_safe_stem(frame['model'].iloc[0])}")


def plot_timing(frame: pd.DataFrame, out_dir: Path) -> list[Path]:
    """One bar panel per timing (task, metric), one bar per config."""
    timing = frame[frame["suite"] == "timing"]
    if timing.empty:
        return []
    timing = timing.assign(config=config_label(timing, varying_keys(timing)).reindex(timing.index))
    panels = timing.groupby(["task", "metric"], sort=True)
    fig, axes = _panels(panels.ngroups, width=4.5)
    for ax, ((task, metric), bars) in zip(axes, panels):
        ax.bar(bars["config"], bars["value"], color="tab:blue")
        ax.set(title=task, ylabel=metric)
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    fig.suptitle(f"{frame['model'].iloc[0]}: timing")
    return _save(fig, out_dir, f"timing_{_safe_stem(frame['model'].iloc[0])}")


# ---------------------------------------------------------------------------------------------
# Assembling the report
# ---------------------------------------------------------------------------------------------

def main_rows(frame: pd.DataFrame, main_calib: str | None) -> pd.DataFrame:
    """Rows for the main table: all, or only runs calibrated on `main_calib` plus runs needing no calibration."""
    if main_calib is None:
        return frame
    return frame[frame["calib_source"].isna() | (frame["calib_source"] == main_calib)]


def model_sections(frame: pd.DataFrame, acc_metric: str, main_calib: str | None = None
                   ) -> list[tuple[str, pd.DataFrame, pd.DataFrame]]:
    """(title, text, bold) for every table of one model, in report order."""
    model = frame["model"].iloc[0]
    sections = []
    text, bold = main_table(main_rows(frame, main_calib), acc_metric)
    if not text.empty:
        sections.append((f"{model}: perplexity and accuracy (delta vs fp; best quantized value in bold)", text, bold))
    text, bold = quant_table(frame)
    if not text.empty:
        sections.append((f"{model}: quantization cost", text, bold))
    text, bold = timing_table(frame)
    if not text.empty:
        sections.append((f"{model}: timing", text, bold))
    for label, matrix in robustness_matrices(frame):
        text, bold = robustness_tables(matrix)
        sections.append((f"{model}: calibration robustness of {label} (perplexity; in parentheses the "
                         "out-of-domain penalty vs calibrating in-domain; in-domain in bold)", text, bold))
    return sections


def _markdown_model(title_model: str, sections, prov, figures: list[Path]) -> list[str]:
    lines = [f"## {title_model}", ""]
    for title, text, bold in sections:
        lines += [f"### {title}", "", render_markdown(text, bold), ""]
    for fig in figures:
        if fig.suffix == ".png":
            lines += [f"![{fig.stem}]({fig.name})", ""]
    lines += ["### Provenance", ""] + [f"- **{k}**: {v}" for k, v in prov] + [""]
    return lines


def _latex_model(title_model: str, sections, prov, figures: list[Path]) -> list[str]:
    lines = [rf"\section*{{{latex_escape(title_model)}}}", ""]
    for title, text, bold in sections:
        lines += [render_latex(text, bold, title), ""]
    for fig in figures:
        if fig.suffix == ".pdf":
            lines += [r"\begin{figure}[t]\centering", rf"\includegraphics[width=\linewidth]{{{fig.name}}}",
                      r"\end{figure}", ""]
    lines += [r"\paragraph{Provenance}", r"\begin{itemize}"]
    lines += [rf"\item \textbf{{{latex_escape(k)}}}: {latex_escape(v)}" for k, v in prov]
    lines += [r"\end{itemize}", ""]
    return lines


def make_report(frame: pd.DataFrame, out_dir: Path, acc_metric: str = "acc", plots: bool = True,
                main_calib: str | None = None) -> list[Path]:
    """Write report.md, report.tex and (if `plots`) the plots (PNG + PDF) for every model in `frame`; return the paths."""
    if frame.empty:
        raise ValueError("no result rows to report")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, superseded = latest_per_key(frame)
    md = ["# Quantization comparison", ""]
    tex = [r"\documentclass{article}", r"\usepackage{booktabs}", r"\usepackage{graphicx}",
           r"\usepackage[margin=2cm]{geometry}", r"\begin{document}", ""]
    written: list[Path] = []
    for model, model_rows in rows.groupby("model", sort=True):
        sections = model_sections(model_rows, acc_metric, main_calib)
        figures = (plot_ppl_vs_bits(model_rows, out_dir) + plot_size_vs_ppl(model_rows, out_dir)
                   + plot_timing(model_rows, out_dir)) if plots else []
        prov = provenance(model_rows, superseded)
        md += _markdown_model(str(model), sections, prov, figures)
        tex += _latex_model(str(model), sections, prov, figures)
        written += figures
    tex.append(r"\end{document}")
    (out_dir / "report.md").write_text("\n".join(md) + "\n")
    (out_dir / "report.tex").write_text("\n".join(tex) + "\n")
    return [out_dir / "report.md", out_dir / "report.tex"] + written


def main(argv: list[str] | None = None) -> int:
    """CLI: python -m harness.report <results dirs or globs...> --out <dir>."""
    parser = argparse.ArgumentParser(prog="python -m harness.report", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="results directories or globs (finished runs are found recursively)")
    parser.add_argument("--out", required=True, type=Path, help="output directory for report.md/.tex and plots")
    parser.add_argument("--main-calib", default=None, metavar="SOURCE",
                        help="main table: only runs calibrated on SOURCE (plus uncalibrated ones); default all")
    parser.add_argument("--no-plots", action="store_true", help="tables only (skips matplotlib)")
    parser.add_argument("--acc-metric", default="acc", help="lm-eval metric for the main table (default: acc)")
    args = parser.parse_args(argv)
    frame = load_results(args.paths)
    if frame.empty:
        print(f"error: no finished runs under {' '.join(args.paths)}", file=sys.stderr)
        return 2
    try:
        paths = make_report(frame, args.out, args.acc_metric, plots=not args.no_plots,
                            main_calib=args.main_calib)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _, superseded = latest_per_key(frame)
    if not superseded.empty:
        print(f"note: {len(superseded)} duplicate rows superseded (latest started_at wins); see Provenance",
              file=sys.stderr)
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
