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
from analysis.results import find_run_dirs, load_results, no_run_there


def main(argv: list[str] | None = None) -> int:
    """CLI: python -m analysis.report <results dirs or globs...> --out <dir>."""
    parser = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="results directories or globs (finished runs are found recursively)")
    parser.add_argument("--out", required=True, type=Path, help="output directory for report.md/.tex and plots")
    parser.add_argument("--main-calib", default=None, metavar="SOURCE",
                        help="main table: only runs calibrated on SOURCE (plus uncalibrated ones); default all")
    parser.add_argument("--no-plots", action="store_true", help="tables only (skips matplotlib)")
    parser.add_argument("--speed", type=Path, nargs="+", default=None, metavar="CSV",
                        help="benchmarks/bench_runtimes.py --csv output(s), e.g. a slow runtime timed apart on "
                             "shorter lengths: a speed table and KLD vs decode tok/s plot")
    parser.add_argument("--acc-metric", default="acc", help="lm-eval metric for the main table (default: acc)")
    args = parser.parse_args(argv)
    for path in args.paths:  # a mistyped path must not silently leave its runs out of the report
        if not find_run_dirs(path):
            print(f"error: {no_run_there(path)}", file=sys.stderr)
            return 2
    for csv in args.speed or []:  # checked before any run is loaded
        if not csv.is_file():
            print(f"error: --speed {csv}: no such file (benchmarks/bench_runtimes.py --csv writes it)", file=sys.stderr)
            return 2
    frame = load_results(args.paths)
    if frame.empty:
        print(f"error: no finished runs under {' '.join(args.paths)}", file=sys.stderr)
        return 2
    try:
        paths = make_report(frame, args.out, args.acc_metric, plots=not args.no_plots,
                            main_calib=args.main_calib, run_dirs=run_directories(args.paths),
                            speed=None if args.speed is None else pd.concat(map(pd.read_csv, args.speed)))
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
