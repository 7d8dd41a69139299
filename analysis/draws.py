"""How much of a result is the calibration draw, and how much data a verdict needs.

    python -m analysis.draws results/calib_study                       # variance components per configuration
    python -m analysis.draws RUNS_OF_A... --vs RUNS_OF_B... --target ppl=1% --target kld=0.01 --target acc=1pt
    python -m analysis.draws results/calib_study --where bits=3 --split method=gptq,awq --target ppl=1%

Without `--vs`: for every configuration with two or more replicate draws (runs that differ only in calib.seed), per
eval set, the spread of its ppl and KLD between draws against the token noise of one run, and the draw's share of
one run's variance. With `--vs`: for the pair A (the positional runs) and B, per eval set and metric, the eval
windows (or lm-eval documents) needed to resolve a true difference of `--target` at `--level` with `--power`, for
1, 3, 5 and 10 draws per side, from the variance components measured here (printed beside it). "—" means no
amount of eval text is enough at that many draws: the draws' own noise already exceeds the budget; "min draws"
is the fewest draws per side for which some amount of eval text is.
"""
from __future__ import annotations

import argparse
import math
import sys

import numpy as np
import pandas as pd

from analysis import replicates, stats
from analysis.compare import (Config, RunPathError, _tokens_refused, group_runs, level_arg, load_run, margin_arg,
                              margins_by_kind, run_dirs_in_order, select_runs, side, where_arg)

DRAW_COUNTS = (1, 3, 5, 10)


def _sets(config: Config) -> list[str]:
    return sorted(set.intersection(*(set(r.blocks.get("task", [])) for r in config.runs)))


def decomposition_table(configs: list[Config]) -> pd.DataFrame:
    """One row per configuration with >= 2 draws, eval set and metric (ppl on the log scale, KLD per token)."""
    rows = []
    for config in configs:
        if len(config.runs) < 2 or not config.calibrates:
            continue
        for task in _sets(config):
            if _tokens_refused(config, config, task):
                continue
            for metric, column in (("log ppl", "nll_sum"), ("kld", "kld_sum")):
                if not all(column in r.blocks for r in config.runs):
                    continue
                measured = side(config, task, column)
                parts = replicates.decomposition(measured)
                per_draw = measured.num.sum(axis=0) / measured.den.sum()
                rows.append({"config": config.label, "set": task, "metric": metric, "draws": parts["draws"],
                             "units": parts["units"], "mean": float(per_draw.mean()),
                             "min draw": float(per_draw.min()), "max draw": float(per_draw.max()),
                             "sd between draws": math.sqrt(parts["draw"]),
                             "draw var estimate": parts["draw_estimate"],
                             "token se of one run": math.sqrt(parts["unit"] / parts["units"]),
                             "draw share": parts["draw_share"]})
    return pd.DataFrame(rows)


def needed_table(a: Config, b: Config, targets: dict[str, float], level: float, power: float) -> pd.DataFrame:
    """Eval windows / documents needed per set and metric at 1, 3, 5, 10 draws per side."""
    rows = []
    for task in sorted(set(_sets(a)) & set(_sets(b))):
        if _tokens_refused(a, b, task):
            continue
        blocks = a.runs[0].blocks
        per_window = blocks[blocks.task == task].groupby("window").size().mean()
        for kind, column in (("ppl", "nll_sum"), ("kld", "kld_sum")):
            if kind not in targets or not all(column in r.blocks for r in a.runs + b.runs):
                continue
            sa, sb = side(a, task, column), side(b, task, column)
            diff = replicates.difference(sa, sb, level)
            row = {"set": task, "metric": kind, "target": targets[kind], "measured": diff.value,
                   "measured windows": int(round(sa.num.shape[0] / per_window)), "draws": f"{sa.draws} vs {sb.draws}"}
            for k in DRAW_COUNTS:
                got = replicates.units_needed(diff, sa, sb, targets[kind], level, power, draws=k)
                row[f"windows at {k} draws"] = None if got["units"] is None else math.ceil(got["units"] / per_window)
            got = replicates.units_needed(diff, sa, sb, targets[kind], level, power)
            row.update(_variances(got))
            rows.append(row)
    docs_a, docs_b = (pd.concat([r.docs for r in c.runs]) if all(not r.docs.empty for r in c.runs) else None
                      for c in (a, b))
    if "acc" in targets and docs_a is not None and docs_b is not None:
        for task in sorted(set(docs_a.task) & set(docs_b.task)):
            cols = []
            for config in (a, b):
                docs = [r.docs[r.docs.task == task].sort_values("doc_id") for r in config.runs]
                cols.append(np.column_stack([d["acc"].to_numpy() > 0.5 for d in docs]).astype(float))
            if cols[0].shape[0] != cols[1].shape[0]:
                continue
            ones = np.ones(cols[0].shape[0])
            sa, sb = replicates.Side(cols[0], ones, a.calibrates), replicates.Side(cols[1], ones, b.calibrates)
            diff = replicates.difference(sa, sb, level)
            row = {"set": task, "metric": "acc", "target": targets["acc"], "measured": diff.value,
                   "measured documents": sa.num.shape[0], "draws": f"{sa.draws} vs {sb.draws}"}
            for k in DRAW_COUNTS:
                got = replicates.units_needed(diff, sa, sb, targets["acc"], level, power, draws=k)
                row[f"documents at {k} draws"] = got["units"]
            got = replicates.units_needed(diff, sa, sb, targets["acc"], level, power)
            row.update(_variances(got))
            rows.append(row)
    return pd.DataFrame(rows)


def _variances(needed: dict) -> dict:
    """The variance components an advice row used; a draw variance estimated below zero is named with its estimate
    (it was taken as 0)."""
    below = needed["draw_var_below_zero"]
    return {"min draws": _min_draws(needed), "unit var": needed["unit_var"],
            **{f"draw var {n}": needed["draw_var"][n] for n in ("A", "B")},
            "draw var < 0": "; ".join(f"{n}: {v:.3g} -> 0" for n, v in below.items())}


def _min_draws(needed: dict) -> int:
    """The fewest draws per side for which some amount of eval text resolves the target: the draws' own variance,
    sum of sigma2_draw / K, must fall below the budget (with infinitely many windows)."""
    draws = sum(needed["draw_var"].values())
    return 1 if draws == 0 else math.floor(draws / needed["budget_var"]) + 1


def _configs(paths: list[str], where: list | None = None) -> list[Config]:
    """The configurations under `paths`; a path with no finished run raises RunPathError."""
    return group_runs(select_runs([load_run(d) for d in run_dirs_in_order(paths)], where or []))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.draws", description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", help="run directories or directories holding runs (configuration A with --vs)")
    ap.add_argument("--vs", nargs="+", metavar="PATH", help="the runs of configuration B: print the data needed")
    ap.add_argument("--split", type=where_arg, metavar="KEY=A,B",
                    help="instead of --vs: A and B are the runs (after --where) whose KEY is the first / second "
                         "value, e.g. --split method=gptq,awq")
    ap.add_argument("--target", type=margin_arg, action="append", default=[], metavar="KIND=VALUE",
                    help="the true difference to resolve: ppl=1%% (ratio), kld=0.01 (nats/token), acc=1pt "
                         "(default: ppl=1%%)")
    ap.add_argument("--level", type=level_arg, default=stats.LEVEL, help="confidence level (default 0.95)")
    ap.add_argument("--power", type=level_arg, default=0.8, help="power to detect the target (default 0.8)")
    ap.add_argument("--where", type=where_arg, action="append", default=[], metavar="KEY=V1[,V2]",
                    help="only runs whose run-level column KEY is one of the values (A's and B's); repeatable")
    args = ap.parse_args(argv)
    pd.set_option("display.width", 200)
    if args.split is not None and (args.vs is not None or len(args.split[1]) != 2):
        ap.error("--split KEY=A,B takes exactly two values, and replaces --vs")
    try:
        return _draws(args)
    except (RunPathError, ValueError) as err:  # a path with no finished run; a metric given twice
        print(f"draws: {err}", file=sys.stderr)
        return 2


def _draws(args) -> int:
    targets = margins_by_kind(args.target, "--target") or {"ppl": math.log1p(0.01)}
    if args.vs is None and args.split is None:
        table = decomposition_table(_configs(args.paths, args.where))
        if table.empty:
            print("draws: no configuration with two or more calibration draws under "
                  f"{args.paths} (sweep calib.seed=0,1,2,...)", file=sys.stderr)
            return 2
        below = table["draw var estimate"] < 0
        shown = table.astype(object)
        shown["sd between draws"] = [f"{v:.4g}" + (" *" if b else "") for v, b in zip(table["sd between draws"], below)]
        print(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        print("\nlog ppl: per token NLL (the log of ppl); sd between draws: of one draw's value, beyond token noise "
              "(the square root of the draw var estimate, (MS_draws - MS_residual) / blocks); token se of one run: its "
              "interval's standard error over blocks; draw share: of one run's variance.")
        if below.any():
            print(f"* {int(below.sum())} row(s): the draws spread less than their token noise predicts, so the draw "
                  "variance is estimated below zero (draw var estimate < 0) and shown as 0: these draws cannot tell "
                  "the draw effect from none. --vs then takes the draw term as 0: its windows needed rest on the eval "
                  "text alone and its min draws is 1 (docs/statistics.md).")
        return 0
    if args.split is not None:
        key, (value_a, value_b) = args.split
        a, b = (_configs(args.paths, [*args.where, (key, [v])]) for v in (value_a, value_b))
    else:
        a, b = _configs(args.paths, args.where), _configs(args.vs, args.where)
    for name, found in (("A", a), ("B (--vs)", b)):
        if len(found) != 1:
            print(f"draws: {name} must be one configuration (its draws); found {len(found)}: "
                  f"{[c.label for c in found]}", file=sys.stderr)
            return 2
    table = needed_table(a[0], b[0], targets, args.level, args.power)
    if table.empty:
        print("draws: A and B share no eval set or task measured on identical data", file=sys.stderr)
        return 2
    print(f"A = {a[0].label}\nB = {b[0].label}")
    counts = [c for c in table.columns if " at " in c]
    shown = table.astype(object)
    for column in counts:  # a count, or the dash where no amount of eval text is enough at that many draws
        shown[column] = ["—" if v is None or pd.isna(v) else str(int(v)) for v in table[column]]
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"\nEval windows (or documents) needed for a {args.level:.0%} interval to exclude 0 with power "
          f"{args.power:.0%} when the true difference is the target (ppl on the log ratio scale), per number of "
          "calibration draws per side; from the variance components above (unit var: per block or document; draw "
          "var: of one draw's effect). —: not with that many draws.")
    if (table["draw var < 0"] != "").any():
        print("draw var < 0: that side's draws spread less than their token noise predicts; its draw variance was "
              "estimated below zero and taken as 0, so the windows needed above assume the draws add no variance "
              "(docs/statistics.md).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
