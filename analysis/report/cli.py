"""Paper-ready comparison reports (Markdown, LaTeX booktabs, plots) built from tidy result rows.

The command line of analysis.report; `python -m analysis.report` runs main() through __main__.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from analysis.labels import latest_per_key
from analysis.report.render import make_report
from analysis.report.select import run_directories
from analysis.results import load_results


def main(argv: list[str] | None = None) -> int:
    """CLI: python -m analysis.report <results dirs or globs...> --out <dir>."""
    parser = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="results directories or globs (finished runs are found recursively)")
    parser.add_argument("--out", required=True, type=Path, help="output directory for report.md/.tex and plots")
    parser.add_argument("--main-calib", default=None, metavar="SOURCE",
                        help="main table: only runs calibrated on SOURCE (plus uncalibrated ones); default all")
    parser.add_argument("--no-plots", action="store_true", help="tables only (skips matplotlib)")
    parser.add_argument("--speed", type=Path, default=None, metavar="CSV",
                        help="benchmarks/bench_runtimes.py --csv output: a speed table and KLD vs decode tok/s plot")
    parser.add_argument("--acc-metric", default="acc", help="lm-eval metric for the main table (default: acc)")
    args = parser.parse_args(argv)
    frame = load_results(args.paths)
    if frame.empty:
        print(f"error: no finished runs under {' '.join(args.paths)}", file=sys.stderr)
        return 2
    try:
        paths = make_report(frame, args.out, args.acc_metric, plots=not args.no_plots,
                            main_calib=args.main_calib, run_dirs=run_directories(args.paths),
                            speed=None if args.speed is None else pd.read_csv(args.speed))
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
