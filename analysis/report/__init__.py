"""Paper-ready comparison reports (Markdown, LaTeX booktabs, plots) built from tidy result rows.

Reads results only and never runs a model. Every number printed is read from the rows; the only
arithmetic is the requested deltas (vs the fp row, and the out-of-domain penalty) and unit
changes for display (accuracy shown in percent).

Modules: select (which rows and runs a report shows), significance (paired tests on the runs' per-block and
per-document records, Holm's correction, fallbacks), tables (pivot tables as cell text + bold mask + note),
plots (matplotlib figures), render (Markdown/LaTeX, provenance, make_report), cli (main, run by
`python -m analysis.report`). Row keys and config labels live in analysis.labels.
"""
from analysis.labels import (CONFIG_KEYS, DASH, DISPLAY, OBS_KEYS, REFERENCE_METHOD, ROW_KEYS, SECONDARY_KEYS,
                            config_label, is_reference, label_columns, latest_per_key)
from analysis.report.cli import main
from analysis.report.plots import (PARAMS_DETAIL_KEY, model_size, pareto_front, plot_kld_vs_bits, plot_ppl_vs_bits,
                                  plot_size_vs_ppl, plot_timing)
from analysis.report.render import (MODEL_NOTES, calibration_text, duplicates_text, latex_escape, make_report,
                                   merged_versions, model_sections, numeric_columns, provenance, render_latex,
                                   render_markdown)
from analysis.report.select import main_rows, run_directories, varying_keys
from analysis.report.significance import (ALPHA, CellSpec, ColumnDecision, PairedEvidence, not_worse_than_best,
                                         wins_ties_losses)
from analysis.report.tables import (ROBUSTNESS_GROUP, MainGrid, Table, main_grid, main_observations, main_table,
                                   main_table_with_note, pivot_unique, quant_table, robustness_matrices,
                                   robustness_penalty, robustness_tables, significance_note, simple_table,
                                   timing_table, wins_table)

__all__ = [
    "ALPHA", "CONFIG_KEYS", "DASH", "DISPLAY", "MODEL_NOTES", "OBS_KEYS", "PARAMS_DETAIL_KEY", "REFERENCE_METHOD",
    "ROBUSTNESS_GROUP", "ROW_KEYS", "SECONDARY_KEYS", "CellSpec", "ColumnDecision", "MainGrid", "PairedEvidence",
    "Table", "calibration_text", "config_label", "duplicates_text", "is_reference", "label_columns",
    "latest_per_key", "latex_escape", "main", "main_grid", "main_observations", "main_rows", "main_table",
    "main_table_with_note", "make_report", "merged_versions", "model_sections", "model_size", "not_worse_than_best",
    "numeric_columns", "pareto_front", "pivot_unique", "plot_kld_vs_bits", "plot_ppl_vs_bits", "plot_size_vs_ppl",
    "plot_timing", "provenance", "quant_table", "render_latex", "render_markdown", "robustness_matrices",
    "robustness_penalty", "robustness_tables", "run_directories", "significance_note", "simple_table",
    "timing_table", "varying_keys", "wins_table", "wins_ties_losses",
]
