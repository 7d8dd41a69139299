"""Paired comparisons of finished runs, from their records alone (no model is run).

    python -m analysis.compare RUN_A RUN_B            # two run directories: A is the first, B the second
    python -m analysis.compare results/ [--level 0.9] # every pair of runs under a directory (a sweep), sorted
    python -m analysis.compare RUN_A RUN_B --allow-cross-model   # two models: ppl and accuracy only, no KLD

Per eval set both runs measured on identical tokens (same token fingerprint, same blocks): ppl A and B, Δppl and
the ratio A/B with a paired interval over token blocks, ΔKLD with its paired interval, each with a paired t-test
over blocks; per lm-eval task both ran on the same documents: Δaccuracy with McNemar's exact test. A verdict per
cell: "A better", "B better" or "no significant difference", after Holm's correction over every test in the
printed table. Sets or tasks that were not measured on identical data are refused, with the reason. So is a pair of
runs of different models (other `model_fingerprint`, or none recorded): KLD is measured against each run's own
unquantized model, so ΔKLD across models compares two different baselines. `--allow-cross-model` compares such a
pair on perplexity and accuracy (still only on identical tokens and documents) and drops every KLD cell.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import stats
from analysis.labels import method_label
from analysis.results import BLOCKS_FILE, DOCS_FILE, find_run_dirs, read_run


@dataclass
class Run:
    path: Path
    label: str
    rows: pd.DataFrame
    blocks: pd.DataFrame
    docs: pd.DataFrame
    prints: dict
    model: str = ""
    model_print: str = ""  # fingerprint of the unquantized weights, the baseline of KLD; "" when none was recorded


def _text(value) -> str:
    """A row value as text, "" for a missing one."""
    return "" if value is None or pd.isna(value) else str(value)


def load_run(path: Path) -> Run:
    rows = read_run(path)
    first = rows.iloc[0]
    read = lambda name: pd.read_parquet(path / name) if (path / name).exists() else pd.DataFrame()  # noqa: E731
    label = f"{method_label(first['method'], first['bits'], first['group_size'])} ({first['run_id']})"
    try:
        prints = json.loads(first["data_fingerprint"] or "{}")
    except (TypeError, ValueError):  # not a fingerprint map: nothing can be shown to be the same tokens
        prints = {}
    return Run(path, label, rows, read(BLOCKS_FILE), read(DOCS_FILE), prints if isinstance(prints, dict) else {},
               _text(first["model"]), _text(first["model_fingerprint"]))


def model_mismatch(a: Run, b: Run) -> str | None:
    """Why two runs cannot be shown to share an unquantized model (the baseline of their KLD), or None."""
    if a.model_print and a.model_print == b.model_print:
        return None
    shown = (f"{r.model or '?'} (model_fingerprint {r.model_print or 'missing'})" for r in (a, b))
    return "different models: " + " vs ".join(shown)


def run_dirs_in_order(paths: list[str]) -> list[Path]:
    """Finished runs in the order given, so that A is the first argument; a directory holding several runs adds
    them in sorted order. A run named twice counts once."""
    found: dict[Path, Path] = {}
    for path in paths:
        for run in find_run_dirs(path):
            found.setdefault(run.resolve(), run)
    return list(found.values())


def level_arg(text: str) -> float:
    """--level: a confidence level strictly inside (0, 1); 95 (a percentage) or 1 would print nonsense intervals."""
    try:
        level = float(text)
    except ValueError:
        level = float("nan")
    if not 0 < level < 1:  # also false for nan
        raise argparse.ArgumentTypeError(f"must lie strictly in (0, 1), e.g. 0.95; got {text!r}")
    return level


def _same_blocks(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    keys = ["window", "block", "tokens"]
    return len(a) == len(b) and (a[keys].to_numpy() == b[keys].to_numpy()).all()


def _other_tokens(pa, pb, ba: pd.DataFrame, bb: pd.DataFrame) -> str | None:
    """Why two runs' blocks of one eval set are not the same tokens, or None when they are."""
    missing = [side for side, p in (("A", pa), ("B", pb)) if p is None]
    if missing:
        return f"no token fingerprint recorded by {' and '.join(missing)}"
    if pa != pb:
        return f"token fingerprint {pa} (A) vs {pb} (B)"
    if not _same_blocks(ba, bb):
        return f"other windows/blocks ({len(ba)} vs {len(bb)} blocks)"
    return None


def ppl_cells(a: Run, b: Run, level: float, kld: bool = True) -> tuple[list[dict], list[str]]:
    """One cell per eval set measured by both runs on identical tokens (and one for KLD where both have it, unless
    `kld` is false)."""
    cells, refused = [], []
    for task in sorted(set(a.blocks.get("task", [])) & set(b.blocks.get("task", []))):
        pa, pb = a.prints.get(f"eval:{task}"), b.prints.get(f"eval:{task}")
        ba, bb = (r.blocks[r.blocks.task == task].sort_values(["window", "block"]) for r in (a, b))
        why = _other_tokens(pa, pb, ba, bb)
        if why:
            refused.append(f"{task}: not the same tokens: {why}")
            continue
        tokens = ba.tokens.to_numpy()
        na, nb = ba.nll_sum.to_numpy(), bb.nll_sum.to_numpy()
        ratio = stats.paired_ratio(na, nb, tokens, level)
        ppl_a, ppl_b = np.exp(na.sum() / tokens.sum()), np.exp(nb.sum() / tokens.sum())
        cells.append({"kind": "ppl", "task": task, "A": ppl_a, "B": ppl_b, "delta": ppl_a - ppl_b,
                      "ratio": ratio.value, "ci_low": ratio.ci_low, "ci_high": ratio.ci_high,
                      "p": stats.paired_p_value(na / tokens, nb / tokens), "lower_is_better": True,
                      "note": ratio.note})
        if kld and "kld_sum" in ba and "kld_sum" in bb:
            ka, kb = ba.kld_sum.to_numpy(), bb.kld_sum.to_numpy()
            diff = stats.paired_difference(ka, kb, tokens, level)
            cells.append({"kind": "kld", "task": task, "A": ka.sum() / tokens.sum(), "B": kb.sum() / tokens.sum(),
                          "delta": diff.value, "ratio": None, "ci_low": diff.ci_low, "ci_high": diff.ci_high,
                          "p": stats.paired_p_value(ka / tokens, kb / tokens), "lower_is_better": True,
                          "note": diff.note})
    return cells, refused


def accuracy_cells(a: Run, b: Run, level: float) -> tuple[list[dict], list[str]]:
    """One cell per lm-eval task and 0/1 metric both runs evaluated on the same documents."""
    cells, refused = [], []
    if a.docs.empty or b.docs.empty:
        return cells, refused
    for task in sorted(set(a.docs.task) & set(b.docs.task)):
        da, db = (r.docs[r.docs.task == task].sort_values("doc_id") for r in (a, b))
        if list(da.doc_id) != list(db.doc_id):
            refused.append(f"{task}: not the same documents ({len(da)} vs {len(db)})")
            continue
        for metric in ("acc", "acc_norm"):
            if metric not in da or da[metric].isna().any() or db[metric].isna().any():
                continue
            ca, cb = da[metric].to_numpy() > 0.5, db[metric].to_numpy() > 0.5
            est_a, est_b = (stats.proportion(int(c.sum()), len(c), level) for c in (ca, cb))
            cells.append({"kind": metric, "task": task, "A": est_a.value, "B": est_b.value,
                          "delta": est_a.value - est_b.value, "ratio": None, "ci_low": None, "ci_high": None,
                          "p": stats.mcnemar_p_value(ca, cb), "lower_is_better": False, "note": None})
    return cells, refused


def compare(a: Run, b: Run, level: float = stats.LEVEL,
            allow_cross_model: bool = False) -> tuple[pd.DataFrame, list[str]]:
    """The cells of one pair (without verdicts) and the reasons for any refused set or task. A pair of different
    models is refused as a whole, or with `allow_cross_model` compared without KLD (each run's KLD is against its
    own baseline)."""
    mismatch = model_mismatch(a, b)
    if mismatch and not allow_cross_model:
        return pd.DataFrame(), [f"{mismatch}; KLD is measured against each run's own unquantized model, so the pair "
                                "is refused (--allow-cross-model compares ppl and accuracy only)"]
    ppl, refused_ppl = ppl_cells(a, b, level, kld=mismatch is None)
    acc, refused_acc = accuracy_cells(a, b, level)
    table = pd.DataFrame(ppl + acc)
    if not table.empty:
        table.insert(0, "B_run", b.label)
        table.insert(0, "A_run", a.label)
    return table, refused_ppl + refused_acc


def with_verdicts(table: pd.DataFrame, level: float) -> pd.DataFrame:
    """Holm's correction over every test of the table, then 'A better' / 'B better' / 'no significant difference'."""
    reject = stats.holm(table["p"].tolist(), alpha=1 - level)
    better_a = np.where(table["lower_is_better"], table["delta"] < 0, table["delta"] > 0)
    verdict = np.where(~np.array(reject, bool), "no significant difference", np.where(better_a, "A better", "B better"))
    return table.assign(verdict=verdict).drop(columns=["lower_is_better"])


def render(table: pd.DataFrame, level: float, notes: dict[tuple[str, str], str] | None = None) -> str:
    """The table per pair of runs, each headed by A and B and its note in `notes` (keyed by (A_run, B_run))."""
    def fmt(v, spec=".4g"):
        return "-" if v is None or pd.isna(v) else format(v, spec)

    ci_header = f"{level * 100:.4g}% CI"  # 0.975 reads 97.5%, not 98%
    lines = []
    for (a, b), group in table.groupby(["A_run", "B_run"], sort=False):
        lines.append(f"A = {a}\nB = {b}")
        if (notes or {}).get((a, b)):
            lines.append(notes[(a, b)])
        body = pd.DataFrame({
            "what": group["kind"] + " " + group["task"], "A": group["A"].map(fmt), "B": group["B"].map(fmt),
            "A - B": group["delta"].map(lambda v: fmt(v, "+.4g")), "A / B": group["ratio"].map(fmt),
            ci_header: [f"[{fmt(lo)}, {fmt(hi)}]" if lo is not None and not pd.isna(lo) else
                        ("(too little data)" if note else "-")
                        for lo, hi, note in zip(group["ci_low"], group["ci_high"], group["note"])],
            "p": group["p"].map(lambda v: fmt(v, ".3g")), "verdict": group["verdict"]})
        lines.append(body.to_string(index=False))
        lines.append("")
    n = len(table)
    lines.append(f"{n} tests; verdicts after Holm's correction over all {n} at family-wise level {1 - level:.2g}. "
                 "Intervals: ppl ratio and ΔKLD per token, Student-t over paired token blocks; p: paired t-test over "
                 "blocks (ppl, KLD), McNemar's exact test (accuracy).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", help="two run directories (A first, then B), or one directory holding "
                                             "several runs (every pair, in sorted order)")
    ap.add_argument("--level", type=level_arg, default=stats.LEVEL,
                    help="confidence level, strictly in (0, 1) (default 0.95)")
    ap.add_argument("--allow-cross-model", action="store_true",
                    help="compare runs of different models (other model_fingerprint) on ppl and accuracy; "
                         "their KLD cells are dropped (each is against its own baseline)")
    ap.add_argument("--csv", type=Path, help="also write the table here")
    args = ap.parse_args(argv)
    dirs = run_dirs_in_order(args.paths)
    if len(dirs) < 2:
        print(f"compare: need at least two finished runs; found {len(dirs)} under {args.paths}", file=sys.stderr)
        return 2
    runs = [load_run(d) for d in dirs]
    tables, refused, notes = [], [], {}
    for a, b in itertools.combinations(runs, 2):
        table, why = compare(a, b, args.level, args.allow_cross_model)
        tables.append(table)
        refused += [f"{a.label} vs {b.label}: {w}" for w in why]
        mismatch = model_mismatch(a, b)
        if mismatch and not table.empty:
            notes[(a.label, b.label)] = f"{mismatch} (--allow-cross-model): KLD not compared, each run's KLD is " \
                                        "against its own unquantized model"
    table = pd.concat([t for t in tables if not t.empty], ignore_index=True) if any(
        not t.empty for t in tables) else pd.DataFrame()
    for line in refused:
        print(f"refused: {line}", file=sys.stderr)
    if table.empty:
        print("compare: nothing to compare: no pair of runs measured an eval set or task on identical data with the "
              "same model (reasons above)", file=sys.stderr)
        return 2
    table = with_verdicts(table, args.level)
    print(render(table, args.level, notes))
    if args.csv:
        table.to_csv(args.csv, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
