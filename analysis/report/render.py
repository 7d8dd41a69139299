"""Text output: Markdown and LaTeX tables, the provenance of each model's numbers, and make_report's assembly."""
from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from analysis.labels import DASH, distinct_model_names, latest_per_key, rate_text, value_text
from analysis.report.plots import (plot_kld_vs_bits, plot_kld_vs_decode, plot_kld_vs_storage_bits, plot_ppl_vs_bits,
                                   plot_routing, plot_size_vs_ppl, plot_timing, speed_points)
from analysis.report.select import collapse_draws, main_rows, with_variants
from analysis.report.significance import PairedEvidence
from analysis.report.tables import (Table, main_table_with_note, quant_table, robustness_matrices,
                                   robustness_tables, timing_table, wins_table)

MODEL_NOTES = {
    "smollm2_135m": "weights dequantized from a 4-bit GGUF (Q4_1) file; "
                    "the fp baseline is not a true full-precision model",
}


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
    return sorted(f"{r.calib_source}: {value_text(r.calib_samples, '?')} samples x "
                  f"{value_text(r.calib_seqlen, '?')} tokens" for r in calib.itertuples())


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
    """Which runs were superseded by a later run of the same config and run hash (latest started_at wins)."""
    runs = superseded.groupby("run_id", sort=True).agg(rows=("value", "size"), method=("method", "first"),
                                                       started_at=("started_at", "first"))
    parts = [f"{rid} ({r.method}, started {r.started_at}, {r.rows} rows)" for rid, r in runs.iterrows()]
    return (f"{len(superseded)} rows superseded by a later run of the same configuration and run hash (latest "
            "started_at wins): " + "; ".join(parts))


# ---------------------------------------------------------------------------------------------
# Markdown and LaTeX tables
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


def render_latex(text: pd.DataFrame, bold: pd.DataFrame, caption: str, note: str = "",
                 latex: pd.DataFrame | None = None) -> str:
    """A booktabs table (shrunk to the line width when wider), bold cells wrapped in \\textbf{}, `note` below it;
    a cell of `latex` (same shape as `text`) that is not missing is used as is instead of the escaped text."""
    align = "".join("r" if num else "l" for num in numeric_columns(text))
    latex = pd.DataFrame(None, index=text.index, columns=text.columns) if latex is None else latex
    rows = []
    for row_t, row_b, row_l in zip(text.itertuples(index=False), bold.itertuples(index=False),
                                   latex.itertuples(index=False)):
        cells = [latex_escape(t) if pd.isna(tex) else str(tex) for t, tex in zip(row_t, row_l)]
        # \boldmath: an interval typeset in math mode is bold along with its value
        cells = [(rf"\textbf{{\boldmath {c}}}" if "$" in c else rf"\textbf{{{c}}}") if b else c
                 for c, b in zip(cells, row_b)]
        rows.append(" & ".join(cells) + r" \\")
    below = [r"\par\smallskip", rf"{{\footnotesize\raggedright {latex_escape(note)}\par}}"] if note else []
    return "\n".join([
        r"\begin{table}[htbp]", r"\centering", r"\small", rf"\caption{{{latex_escape(caption)}}}",
        # graphicx only: natural width, or the line width when the table is wider
        r"\resizebox{\ifdim\width>\linewidth\linewidth\else\width\fi}{!}{%",
        rf"\begin{{tabular}}{{{align}}}", r"\toprule",
        " & ".join(latex_escape(c) for c in text.columns) + r" \\", r"\midrule",
        *rows, r"\bottomrule", r"\end{tabular}}", *below, r"\end{table}",
    ])


# ---------------------------------------------------------------------------------------------
# Assembling the report
# ---------------------------------------------------------------------------------------------

def model_sections(frame: pd.DataFrame, acc_metric: str, main_calib: str | None = None,
                   evidence: PairedEvidence | None = None) -> list[tuple[str, Table]]:
    """(title, table) for every table of one model, in report order; `evidence` (the runs' paired records) decides
    the main table's bold set and the wins/ties/losses matrix."""
    model = frame["model"].iloc[0]
    sections = []
    main = main_rows(frame, main_calib)
    table = main_table_with_note(main, acc_metric, evidence)
    draws = sorted({str(r) for r in main["run_id"].dropna() if str(r).endswith(" draws)")})
    if draws and not table.text.empty:
        table = table._replace(note=(table.note + " " if table.note else "") + (
            f"{len(draws)} configurations have replicate calibration draws ({', '.join(d.split(' (')[1][:-1] for d in draws)}"
            "): each is one row, the mean over its draws, with an interval that includes the draws; its paired tests "
            "use every draw (docs/statistics.md)."))
    if not table.text.empty:
        title = (f"{model}: perplexity, KLD vs fp and accuracy (95% intervals where recorded; delta vs fp; "
                 "bold: not significantly worse than the best quantized value, by paired tests with Holm's correction "
                 "within each column)")
        sections.append((title, table))
    table = wins_table(main, acc_metric, evidence)
    if not table.text.empty:
        sections.append((f"{model}: wins/ties/losses of each config (row) against each other (column), Holm's "
                         "correction over every test of the matrix", table))
    table = Table(*quant_table(frame))
    if not table.text.empty:
        sections.append((f"{model}: quantization cost", table))
    table = Table(*timing_table(frame))
    if not table.text.empty:
        sections.append((f"{model}: timing", table))
    for label, matrix, runs in robustness_matrices(frame, with_runs=True):
        title = (f"{model}: calibration robustness of {label} (perplexity; in parentheses the out-of-domain "
                 "penalty vs calibrating in-domain: the ratio with its 95% interval over token blocks and "
                 "calibration draws where the runs kept their records, else the difference; in-domain in bold)")
        sections.append((title, Table(*robustness_tables(matrix, runs, evidence))))
    return sections


def _markdown_model(title_model: str, sections, prov, figures: list[Path]) -> list[str]:
    lines = [f"## {title_model}", ""]
    for title, table in sections:
        lines += [f"### {title}", "", render_markdown(table.text, table.bold), ""]
        lines += [table.note, ""] if table.note else []
    for fig in figures:
        if fig.suffix == ".png":
            lines += [f"![{fig.stem}]({fig.name})", ""]
    lines += ["### Provenance", ""] + [f"- **{k}**: {v}" for k, v in prov] + [""]
    return lines


def _latex_model(title_model: str, sections, prov, figures: list[Path]) -> list[str]:
    lines = [rf"\section*{{{latex_escape(title_model)}}}", ""]
    for title, table in sections:
        lines += [render_latex(table.text, table.bold, title, table.note, table.latex), ""]
    for fig in figures:
        if fig.suffix == ".pdf":
            lines += [r"\begin{figure}[t]\centering", rf"\includegraphics[width=\linewidth]{{{fig.name}}}",
                      r"\end{figure}", ""]
    lines += [r"\paragraph{Provenance}", r"\begin{itemize}"]
    lines += [rf"\item \textbf{{{latex_escape(k)}}}: {latex_escape(v)}" for k, v in prov]
    lines += [r"\end{itemize}", r"\clearpage", ""]  # flush this model's floats before the next model
    return lines


def speed_section(frame: pd.DataFrame, speed: pd.DataFrame) -> list[str]:
    """Markdown: each timed checkpoint's decode speed beside its runtime's baseline, the fraction of the bandwidth
    bound, and its KLD per eval set."""
    points = speed_points(frame, speed)
    if points.empty:
        return []
    index = ["method", "runtime", "prompt", "decode", "decode_tps", "base_decode_tps", "bound_tps"]
    table = points.pivot_table(index=index, columns="task", values="value").reset_index()
    lines = ["### Speed in each checkpoint's own CPU runtime", "",
             "| checkpoint | runtime | tokens timed (prompt + decode) | decode tok/s (ckpt / baseline) | "
             "fraction of bandwidth bound | " + " | ".join(f"KLD {t}" for t in table.columns[len(index):]) + " |",
             "|---|---|---|---|---:|" + "---:|" * (len(table.columns) - len(index))]
    for row in table.itertuples(index=False):
        method, runtime, prompt, decode, decode_tps, base_tps, bound_tps, *klds = row
        lines.append(f"| {method} | {runtime} | {prompt:.0f} + {decode:.0f} | {rate_text(decode_tps)} / {rate_text(base_tps)} | "
                     f"{rate_text(decode_tps / bound_tps)} | " + " | ".join(f"{v:.3f}" for v in klds) + " |")
    return lines + [""]


def make_report(frame: pd.DataFrame, out_dir: Path, acc_metric: str = "acc", plots: bool = True,
                main_calib: str | None = None, run_dirs: Mapping[str, Path] | None = None,
                speed: pd.DataFrame | None = None) -> list[Path]:
    """Write report.md, report.tex and (if `plots`) the plots (PNG + PDF) for every model in `frame`; return the paths.

    `run_dirs` (run_id -> run directory, see select.run_directories) gives the paired tests their per-block and
    per-document records; without it (or for runs that kept none) bold falls back to intervals, then to the best.
    `speed` (benchmarks/bench_runtimes.py --csv): each checkpoint's speed in its own CPU runtime, plotted against its
    KLD (kld_vs_decode) and tabled beside it."""
    if frame.empty:
        raise ValueError("no result rows to report")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame, name_warnings = distinct_model_names(frame)  # before superseding: a name may cover several models
    for text in dict.fromkeys(name_warnings.values()):
        print(f"warning: {text}", file=sys.stderr)
    rows, superseded = latest_per_key(frame)
    rows = with_variants(rows, run_dirs)  # runs of one config that differ in anything else (an export) stay apart
    routing = rows[rows["suite"] == "routing"]  # per draw: a mixture's routing is plotted for one draw, not averaged
    rows, draws = collapse_draws(rows)  # a configuration's calibration draws: one row, intervals include them
    evidence = PairedEvidence(run_dirs, draws=draws)
    md = ["# Quantization comparison", ""]
    tex = [r"\documentclass{article}", r"\usepackage{booktabs}",
           r"\usepackage{graphicx}", r"\usepackage[margin=2cm]{geometry}", r"\begin{document}", ""]
    written: list[Path] = []
    for model, model_rows in rows.groupby("model", sort=True):
        sections = model_sections(model_rows, acc_metric, main_calib, evidence)
        figures = (plot_ppl_vs_bits(model_rows, out_dir) + plot_kld_vs_bits(model_rows, out_dir)
                   + plot_kld_vs_storage_bits(model_rows, out_dir) + plot_size_vs_ppl(model_rows, out_dir)
                   + plot_timing(model_rows, out_dir)
                   + plot_routing(routing[routing["model"] == model], out_dir)) if plots else []
        if plots and speed is not None:
            figures += plot_kld_vs_decode(model_rows, speed, out_dir)
        prov = provenance(model_rows, superseded)
        prov += [("warning", name_warnings[model])] if model in name_warnings else []
        md += _markdown_model(str(model), sections, prov, figures)
        if speed is not None:
            md += speed_section(model_rows, speed)
        tex += _latex_model(str(model), sections, prov, figures)
        written += figures
    tex.append(r"\end{document}")
    (out_dir / "report.md").write_text("\n".join(md) + "\n")
    (out_dir / "report.tex").write_text("\n".join(tex) + "\n")
    return [out_dir / "report.md", out_dir / "report.tex"] + written
