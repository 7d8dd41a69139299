"""Calibration-set robustness with intervals over eval tokens and calibration draws.

    python -m analysis.robustness results/calib_study --where bits=3 --where calib_samples=8

For each method (and bits, group size, budget) calibrated on several sources, each with its replicate draws
(calib.seed): per eval set E and calibration source C, the perplexity (geometric mean over draws) and the
out-of-domain penalty, ppl(calibrated on C, evaluated on E) / ppl(calibrated on E, evaluated on E), with its
interval (analysis.replicates: blocks of E x the draws of both configurations). Then, for every pair of methods,
the ratio of their penalties on each (C, E): below 1, the first method loses less when calibrated off-domain (the AWQ
paper's claim about AWQ against GPTQ), with its interval (a contrast of four configurations). Each table is one
family: its intervals are simultaneous (Bonferroni over the table's tests), and each verdict reads its own interval.
"""
from __future__ import annotations

import argparse
import itertools
import math
import sys

import numpy as np
import pandas as pd

from analysis import replicates, stats
from analysis.compare import (Config, RunPathError, _tokens_refused, group_runs, level_arg, load_run,
                              run_dirs_in_order, select_runs, side, where_arg)
from analysis.labels import method_label


def _key(config: Config) -> tuple:
    first = config.runs[0].rows.iloc[0]
    return (first["method"], first["bits"], first["group_size"], first["calib_samples"], first["calib_seqlen"])


def by_method(configs: list[Config]) -> dict[tuple, dict[str, Config]]:
    """{(method, bits, group, samples, seqlen): {calibration source: configuration}} for calibrating configurations
    measured with two or more calibration sources."""
    found: dict[tuple, dict[str, Config]] = {}
    for config in configs:
        if not config.calibrates:
            continue
        source = str(config.runs[0].rows.iloc[0]["calib_source"])
        found.setdefault(_key(config), {})[source] = config
    return {k: v for k, v in found.items() if len(v) > 1}


def _estimate(diff: replicates.Difference) -> dict:
    """The ratio of a log-scale difference with what with_family_intervals needs to put its interval in a family."""
    return {"ratio": math.exp(diff.value), "p": diff.p, "_estimate": diff.value, "_stderr": diff.stderr,
            "_df": diff.df}


def with_family_intervals(table: pd.DataFrame, level: float) -> pd.DataFrame:
    """Every row with a test is one family of m: each ratio gets its simultaneous interval (Bonferroni, each at
    1 - (1 - level) / m), `p_adj` = m p, and `differs` whether the interval excludes 1 (exactly where p_adj < 1 -
    level), so the verdicts read off it cannot disagree with the intervals printed."""
    if "_estimate" not in table:
        return table
    tested = table["p"].notna()
    each = stats.simultaneous_level(level, int(tested.sum()))
    ci = [stats.t_interval(v, None if pd.isna(se) else se, None if pd.isna(df) else df, each) if t else None
          for v, se, df, t in zip(table["_estimate"], table["_stderr"], table["_df"], tested)]
    table = table.assign(ci_low=[math.exp(c[0]) if c else None for c in ci],
                         ci_high=[math.exp(c[1]) if c else None for c in ci],
                         p_adj=(table["p"] * int(tested.sum())).clip(upper=1.0),
                         differs=[None if c is None else bool(c[0] > 0 or c[1] < 0) for c in ci])
    return table.drop(columns=["_estimate", "_stderr", "_df"])


def penalty_table(methods: dict[tuple, dict[str, Config]], level: float) -> pd.DataFrame:
    rows = []
    for key, sources in methods.items():
        label = method_label(key[0], key[1], key[2]) + f" calib {key[3]}x{key[4]}"
        for calib, config in sorted(sources.items()):
            for task in sorted(sources):
                if task not in sources or _tokens_refused(config, sources[task], task):
                    continue
                measured = side(config, task, "nll_sum")
                row = {"config": label, "calibrated on": calib, "eval set": task, "draws": measured.draws,
                       "ppl": float(np.exp(measured.ratio()))}
                if calib != task:
                    row.update(_estimate(replicates.difference(measured, side(sources[task], task, "nll_sum"), level)))
                rows.append(row)
    table = with_family_intervals(pd.DataFrame(rows), level)
    return table.rename(columns={"differs": "significant"})


def sensitivity_table(methods: dict[tuple, dict[str, Config]], level: float) -> pd.DataFrame:
    """Per pair of methods with the same bits, group and budget, per off-domain (C, E) both measured: the ratio of
    their penalties (first / second) with its interval."""
    rows = []
    for (ka, a), (kb, b) in itertools.combinations(sorted(methods.items(), key=lambda kv: str(kv[0])), 2):
        if ka[1:] != kb[1:]:
            continue
        for calib in sorted(set(a) & set(b)):
            for task in sorted(set(a) & set(b)):
                if calib == task:
                    continue
                sides = [side(c, task, "nll_sum") for c in (a[calib], a[task], b[calib], b[task])]
                diff = replicates.contrast(sides, [1.0, -1.0, -1.0, 1.0], level)
                rows.append({"A": ka[0], "B": kb[0], "bits": ka[1], "calibrated on": calib, "eval set": task,
                             "draws": "/".join(str(s.draws) for s in sides), **_estimate(diff)})
    table = with_family_intervals(pd.DataFrame(rows), level)
    if not table.empty:
        table["verdict"] = ["A less sensitive" if r and v < 1 else "B less sensitive" if r else "cannot tell"
                            for r, v in zip(table.pop("differs"), table["ratio"])]
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.robustness", description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", help="results directories holding the runs")
    ap.add_argument("--where", type=where_arg, action="append", default=[], metavar="KEY=V1[,V2]",
                    help="only runs whose run-level column KEY is one of the values; repeatable")
    ap.add_argument("--level", type=level_arg, default=stats.LEVEL, help="confidence level (default 0.95)")
    args = ap.parse_args(argv)
    try:
        dirs = run_dirs_in_order(args.paths)
    except RunPathError as err:
        print(f"robustness: {err}", file=sys.stderr)
        return 2
    runs = select_runs([load_run(d) for d in dirs], args.where)
    methods = by_method(group_runs(runs))
    if not methods:
        print("robustness: no configuration calibrated on two or more sources under "
              f"{args.paths} (+experiment=calib_robustness, with calib.seed draws)", file=sys.stderr)
        return 2
    pd.set_option("display.width", 200)
    fmt = lambda v: f"{v:.4g}"  # noqa: E731
    penalty = penalty_table(methods, args.level)
    print(f"Out-of-domain penalty: ppl calibrated on C / ppl calibrated on E, on eval set E. Family: its "
          f"{int(penalty['p'].notna().sum()) if 'p' in penalty else 0} off-domain cells; intervals over token blocks "
          f"and calibration draws, simultaneous at {args.level:.0%} (Bonferroni); significant: the interval excludes 1")
    print(penalty.to_string(index=False, float_format=fmt))
    sensitivity = sensitivity_table(methods, args.level)
    if not sensitivity.empty:
        print("\nRatio of penalties, A / B, per (C, E): below 1 A loses less off-domain. Family: its "
              f"{len(sensitivity)} cells; intervals over blocks and the draws of all four configurations, "
              f"simultaneous at {args.level:.0%} (Bonferroni); a verdict where the interval excludes 1")
        print(sensitivity.to_string(index=False, float_format=fmt))
    return 0


if __name__ == "__main__":
    sys.exit(main())
