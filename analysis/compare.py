"""Paired comparisons of finished runs, from their records alone (no model is run).

    python -m analysis.compare RUN_A RUN_B            # two run directories: A is the first, B the second
    python -m analysis.compare results/ [--level 0.9] # every pair of configurations under a directory, sorted
    python -m analysis.compare RUN_A RUN_B --allow-cross-model   # two models: ppl and accuracy only, no KLD
    python -m analysis.compare results/calib_study --margin ppl=1% --margin kld=0.01   # with equivalence tests

Runs that differ only in `calib.seed` are replicate draws of one configuration (their `replicate_of` is equal) and
are compared as one: the interval then covers both which eval text was measured and which calibration windows were
drawn (a crossed design, analysis/replicates.py), and the per-draw wins, ties and losses are counted. A comparison
with a single draw of a calibrating method is marked "conditional on one calibration draw".

Per eval set every run measured on identical tokens (same token fingerprint, same blocks): ppl A and B, Δppl and
the ratio A/B with its interval over token blocks (and draws), ΔKLD likewise; per lm-eval task all ran on the same
documents: Δaccuracy (McNemar's exact test with one draw per side). A verdict per cell: "A better", "B better" or
"no significant difference", after Holm's correction over every test in the printed table; with `--margin`, TOST
equivalence tests make it "equivalent within the margin", "A better", "B better" or "inconclusive". Sets or tasks
that were not measured on identical data are refused, with the reason. So is a pair of runs of different models
(other `model_fingerprint`, or none recorded): KLD is measured against each run's own unquantized model, so ΔKLD
across models compares two different baselines. `--allow-cross-model` compares such a pair on perplexity and
accuracy (still only on identical tokens and documents) and drops every KLD cell.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import replicates, stats
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
    calib_seed: int | None = None  # the calibration draw; None: the run does not calibrate
    replicate_of: str = ""  # the configuration it is a draw of ("" in runs written before replicates)
    started_at: str = ""


@dataclass
class Config:
    """One configuration and its replicate calibration draws (runs that differ only in `calib.seed`), sorted by
    draw. A run of a method that does not calibrate is a configuration with no draw noise."""

    runs: list[Run]
    label: str

    @property
    def calibrates(self) -> bool:
        return self.runs[0].calib_seed is not None

    @property
    def model(self) -> str:
        return self.runs[0].model

    @property
    def model_print(self) -> str:
        return self.runs[0].model_print

    @property
    def seeds(self) -> list[int | None]:
        return [r.calib_seed for r in self.runs]


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
    seed = first["calib_seed"]
    return Run(path, label, rows, read(BLOCKS_FILE), read(DOCS_FILE), prints if isinstance(prints, dict) else {},
               _text(first["model"]), _text(first["model_fingerprint"]), None if pd.isna(seed) else int(seed),
               _text(first["replicate_of"]), _text(first["started_at"]))


def _seeds_text(seeds: list[int]) -> str:
    seeds = sorted(seeds)
    if seeds == list(range(seeds[0], seeds[-1] + 1)) and len(seeds) > 2:
        return f"{seeds[0]}-{seeds[-1]}"
    return ",".join(map(str, seeds))


def group_runs(runs: list[Run]) -> list[Config]:
    """Runs grouped into configurations, in the order of their first run: runs of one `replicate_of` and one model
    fingerprint are replicate draws of it. Two runs of the same draw keep the later one. A run written before
    replicates existed is a configuration of its own."""
    groups: dict[tuple, dict] = {}
    for run in runs:
        key = (run.replicate_of or str(run.path), run.model_print)
        draws = groups.setdefault(key, {})
        held = draws.get(run.calib_seed)
        if held is None or (run.started_at, run.path.name) > (held.started_at, held.path.name):
            draws[run.calib_seed] = run
    configs = []
    for draws in groups.values():
        members = sorted(draws.values(), key=lambda r: (r.calib_seed is None, r.calib_seed or 0))
        if len(members) == 1:
            label = members[0].label
        else:
            first = members[0].rows.iloc[0]
            label = (f"{method_label(first['method'], first['bits'], first['group_size'])} calib "
                     f"{first['calib_source']} {first['calib_samples']}x{first['calib_seqlen']} "
                     f"({len(members)} draws, seeds {_seeds_text([r.calib_seed for r in members])}) "
                     f"[{members[0].replicate_of}]")
        configs.append(Config(members, label))
    return configs


def as_config(x: Run | Config) -> Config:
    return x if isinstance(x, Config) else Config([x], x.label)


def model_mismatch(a: Run | Config, b: Run | Config) -> str | None:
    """Why two runs (or configurations) cannot be shown to share an unquantized model (the baseline of their KLD),
    or None."""
    if a.model_print and a.model_print == b.model_print:
        return None
    shown = (f"{r.model or '?'} (model_fingerprint {r.model_print or 'missing'})" for r in (a, b))
    text = "different models: " + " vs ".join(shown)
    if a.model and a.model == b.model and a.model_print and b.model_print:
        text += (" (one name, two fingerprints: other weights, or one run predates the fingerprint of every "
                 "weight's bytes, commit a1b705e, and must be re-run with force=true to be compared)")
    return text


def run_dirs_in_order(paths: list[str]) -> list[Path]:
    """Finished runs in the order given, so that A is the first argument; a directory holding several runs adds
    them in sorted order. A run named twice counts once."""
    found: dict[Path, Path] = {}
    for path in paths:
        for run in find_run_dirs(path):
            found.setdefault(run.resolve(), run)
    return list(found.values())


def where_arg(text: str) -> tuple[str, list[str]]:
    """--where KEY=V1[,V2...]: keep runs whose run-level column KEY (method, bits, calib_samples, ...) is one of the
    values."""
    from analysis.results import RUN_COLUMNS

    key, _, values = text.partition("=")
    if key not in RUN_COLUMNS or not values:
        raise argparse.ArgumentTypeError(f"--where {text!r}: expected KEY=VALUE[,VALUE...] with KEY one of "
                                         f"{RUN_COLUMNS}")
    return key, values.split(",")


def select_runs(runs: list[Run], where: list[tuple[str, list[str]]]) -> list[Run]:
    """The runs whose first row matches every --where condition (values compared as text; "none" matches a missing
    value)."""
    def text(value) -> str:
        return "none" if value is None or pd.isna(value) else str(value)

    return [r for r in runs if all(text(r.rows.iloc[0][key]) in values for key, values in where)]


def level_arg(text: str) -> float:
    """--level: a confidence level strictly inside (0, 1); 95 (a percentage) or 1 would print nonsense intervals."""
    try:
        level = float(text)
    except ValueError:
        level = float("nan")
    if not 0 < level < 1:  # also false for nan
        raise argparse.ArgumentTypeError(f"must lie strictly in (0, 1), e.g. 0.95; got {text!r}")
    return level


MARGIN_KINDS = {"ppl": "ppl=1% (ppl ratio within 1/1.01 and 1.01)", "kld": "kld=0.01 (nats per token)",
                "acc": "acc=1pt (accuracy points; also acc_norm)"}


def margin_arg(text: str) -> tuple[str, float]:
    """--margin KIND=VALUE -> (kind, margin on the scale the comparison is made on): ppl=1% is log(1.01) on the log
    ppl ratio, kld=0.01 nats per token, acc=1pt (or 0.01) accuracy."""
    kind, _, value = text.partition("=")
    allowed = "; ".join(MARGIN_KINDS.values())
    if kind not in MARGIN_KINDS or not value:
        raise argparse.ArgumentTypeError(f"unknown margin {text!r}; allowed: {allowed}")
    try:
        if kind == "ppl":
            if not value.endswith("%"):
                raise ValueError
            margin = math.log1p(float(value[:-1]) / 100)
        elif kind == "acc" and value.endswith("pt"):
            margin = float(value[:-2]) / 100
        else:
            margin = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"margin {text!r} does not parse; allowed: {allowed}") from None
    if not margin > 0 or (kind == "acc" and margin >= 1):
        raise argparse.ArgumentTypeError(f"margin {text!r} must be positive (and below 100pt); allowed: {allowed}")
    return kind, margin


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


def _draw_pairs(a: Config, b: Config) -> list[tuple[int, int]]:
    """Which draws of A meet which of B at the per-draw level: the same seed where both sides drew the same seeds
    (the same calibration windows), else every pair."""
    if a.calibrates and b.calibrates and sorted(a.seeds) == sorted(b.seeds):
        return [(i, b.seeds.index(seed)) for i, seed in enumerate(a.seeds)]
    return [(i, j) for i in range(len(a.runs)) for j in range(len(b.runs))]


def _per_draw(a: Config, b: Config, better_a: list[bool | None]) -> str | None:
    """'wins/ties/losses' of A over the per-draw comparisons (None for a single pair: the main cell says it)."""
    if len(better_a) < 2:
        return None
    return f"{sum(x is True for x in better_a)}/{sum(x is None for x in better_a)}/{sum(x is False for x in better_a)}"


def _cell(kind: str, task: str, a_value: float, b_value: float, diff: replicates.Difference, a: Config, b: Config,
          per_draw: str | None, lower_is_better: bool, ratio: bool) -> dict:
    f = np.exp if ratio else (lambda v: v)
    none = diff.ci_low is None
    return {"kind": kind, "task": task, "A": a_value, "B": b_value, "delta": a_value - b_value,
            "ratio": float(f(diff.value)) if ratio else None,
            "ci_low": None if none else float(f(diff.ci_low)), "ci_high": None if none else float(f(diff.ci_high)),
            "p": diff.p, "estimate": diff.value, "stderr": diff.stderr, "df": diff.df,
            "draws": f"{len(a.runs)} vs {len(b.runs)}", "draw_share": diff.draw_share(), "per_draw": per_draw,
            "conditional": diff.conditional, "lower_is_better": lower_is_better, "note": diff.note}


def _tokens_refused(a: Config, b: Config, task: str) -> str | None:
    """Why some run of either configuration did not measure `task` on the tokens of A's first run, or None."""
    ref = a.runs[0]
    ref_blocks = ref.blocks[ref.blocks.task == task].sort_values(["window", "block"])
    for side, config in (("A", a), ("B", b)):
        for run in config.runs:
            if run is ref:
                continue
            blocks = run.blocks[run.blocks.task == task].sort_values(["window", "block"])
            why = _other_tokens(ref.prints.get(f"eval:{task}"), run.prints.get(f"eval:{task}"), ref_blocks, blocks)
            if why:  # a pair of single runs: B is the only run it can be
                return why if len(a.runs) == len(b.runs) == 1 else f"{why} (run {run.path.name} of {side})"
    return None


def side(config: Config, task: str, column: str) -> replicates.Side:
    """The per-block sums of `column` (nll_sum, kld_sum) on eval set `task`, one column per draw, with the tokens per
    block: a configuration as the crossed design sees it (its runs measured the same blocks: _tokens_refused)."""
    blocks = [r.blocks[r.blocks.task == task].sort_values(["window", "block"]) for r in config.runs]
    return replicates.Side(np.column_stack([b[column].to_numpy(float) for b in blocks]),
                           blocks[0].tokens.to_numpy(float), config.calibrates)


def ppl_cells(a: Run | Config, b: Run | Config, level: float, kld: bool = True) -> tuple[list[dict], list[str]]:
    """One cell per eval set every run of both configurations measured on identical tokens (and one for KLD where
    all have it, unless `kld` is false)."""
    a, b = as_config(a), as_config(b)
    cells, refused = [], []
    tasks = set.intersection(*(set(r.blocks.get("task", [])) for r in a.runs + b.runs))
    alpha = 1 - level
    for task in sorted(tasks):
        why = _tokens_refused(a, b, task)
        if why:
            refused.append(f"{task}: not the same tokens: {why}")
            continue
        columns = [("ppl", "nll_sum", True)]
        if kld and all("kld_sum" in r.blocks for r in a.runs + b.runs):
            columns.append(("kld", "kld_sum", False))
        for kind, column, ratio in columns:
            side_a, side_b = side(a, task, column), side(b, task, column)
            diff = replicates.difference(side_a, side_b, level)
            tokens, na, nb = side_a.den, side_a.num, side_b.num
            better = []
            for i, j in _draw_pairs(a, b):
                one = replicates.difference(replicates.Side(na[:, [i]], tokens, False),
                                            replicates.Side(nb[:, [j]], tokens, False), level)
                better.append(None if not one.p < alpha else bool(one.value < 0))
            value = (lambda s: float(np.exp(s.ratio()))) if ratio else (lambda s: s.ratio())
            cells.append(_cell(kind, task, value(side_a), value(side_b), diff, a, b, _per_draw(a, b, better),
                               True, ratio))
    return cells, refused


def accuracy_cells(a: Run | Config, b: Run | Config, level: float) -> tuple[list[dict], list[str]]:
    """One cell per lm-eval task and 0/1 metric every run of both configurations evaluated on the same documents.
    A single draw on each side keeps McNemar's exact test; replicates use the crossed design over documents."""
    a, b = as_config(a), as_config(b)
    cells, refused = [], []
    runs = a.runs + b.runs
    if any(r.docs.empty for r in runs):
        return cells, refused
    alpha = 1 - level
    for task in sorted(set.intersection(*(set(r.docs.task) for r in runs))):
        docs = [r.docs[r.docs.task == task].sort_values("doc_id") for r in runs]
        if any(list(d.doc_id) != list(docs[0].doc_id) for d in docs):
            counts = " vs ".join(str(len(d)) for d in docs)
            refused.append(f"{task}: not the same documents ({counts})")
            continue
        for metric in ("acc", "acc_norm"):
            if any(metric not in d or d[metric].isna().any() for d in docs):
                continue
            correct = [d[metric].to_numpy() > 0.5 for d in docs]
            ca, cb = np.column_stack(correct[:len(a.runs)]), np.column_stack(correct[len(a.runs):])
            ones = np.ones(len(ca))
            diff = replicates.difference(replicates.Side(ca.astype(float), ones, a.calibrates),
                                         replicates.Side(cb.astype(float), ones, b.calibrates), level)
            if ca.shape[1] == cb.shape[1] == 1:  # one draw each: the exact test of paired binary outcomes
                diff = dataclasses.replace(diff, p=stats.mcnemar_p_value(ca[:, 0], cb[:, 0]))
            better = []
            for i, j in _draw_pairs(a, b):
                p = stats.mcnemar_p_value(ca[:, i], cb[:, j])
                better.append(None if not p < alpha else bool(ca[:, i].mean() > cb[:, j].mean()))
            cells.append(_cell(metric, task, float(ca.mean()), float(cb.mean()), diff, a, b,
                               _per_draw(a, b, better), False, False))
    return cells, refused


def compare(a: Run | Config, b: Run | Config, level: float = stats.LEVEL,
            allow_cross_model: bool = False) -> tuple[pd.DataFrame, list[str]]:
    """The cells of one pair of runs or configurations (without verdicts) and the reasons for any refused set or
    task. A pair of different models is refused as a whole, or with `allow_cross_model` compared without KLD (each
    run's KLD is against its own baseline)."""
    a, b = as_config(a), as_config(b)
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


def _margin_of(kind: str, margins: dict[str, float]) -> float | None:
    return margins.get("acc" if kind in ("acc", "acc_norm") else kind)


def with_verdicts(table: pd.DataFrame, level: float, margins: dict[str, float] | None = None) -> pd.DataFrame:
    """Holm's correction over every test of the table, then 'A better' / 'B better' / 'no significant difference'.
    With `margins` (kind -> margin on the compared scale), cells of those kinds also get TOST equivalence tests
    (Holm over that family): 'equivalent within the margin', 'A better', 'B better' or 'inconclusive'."""
    margins = margins or {}
    reject = np.array(stats.holm(table["p"].tolist(), alpha=1 - level), bool)
    better_a = np.where(table["lower_is_better"], table["delta"] < 0, table["delta"] > 0)
    verdict = np.where(~reject, "no significant difference", np.where(better_a, "A better", "B better")).astype(object)
    tested = [i for i, kind in enumerate(table["kind"]) if _margin_of(kind, margins) is not None]
    if tested:
        tost = [replicates.tost_p_value(replicates.Difference(
            table["estimate"].iat[i], None if pd.isna(table["stderr"].iat[i]) else table["stderr"].iat[i], None, None,
            None if pd.isna(table["df"].iat[i]) else table["df"].iat[i], math.nan, 0, (0, 0), False),
            _margin_of(table["kind"].iat[i], margins)) for i in tested]
        equivalent = stats.holm([1.0 if math.isnan(p) else p for p in tost], alpha=1 - level)
        for i, p, eq in zip(tested, tost, equivalent):
            if eq:
                verdict[i] = "equivalent within the margin"
            elif not reject[i]:
                verdict[i] = "inconclusive"
    return table.assign(verdict=verdict).drop(columns=["lower_is_better"])


def render(table: pd.DataFrame, level: float, notes: dict[tuple[str, str], str] | None = None,
           margins: dict[str, float] | None = None) -> str:
    """The table per pair, each headed by A and B and its note in `notes` (keyed by (A_run, B_run))."""
    def fmt(v, spec=".4g"):
        return "-" if v is None or pd.isna(v) else format(v, spec)

    ci_header = f"{level * 100:.4g}% CI"  # 0.975 reads 97.5%, not 98%
    replicated = "draws" in table and (table["draws"] != "1 vs 1").any()
    lines = []
    for (a, b), group in table.groupby(["A_run", "B_run"], sort=False):
        lines.append(f"A = {a}\nB = {b}")
        if (notes or {}).get((a, b)):
            lines.append(notes[(a, b)])
        mark = ["†" if c else "" for c in group.get("conditional", [False] * len(group))]
        body = pd.DataFrame({
            "what": group["kind"] + " " + group["task"], "A": group["A"].map(fmt), "B": group["B"].map(fmt),
            "A - B": group["delta"].map(lambda v: fmt(v, "+.4g")), "A / B": group["ratio"].map(fmt),
            ci_header: [(f"[{fmt(lo)}, {fmt(hi)}]" if lo is not None and not pd.isna(lo) else
                         ("(too little data)" if note else "-")) + m
                        for lo, hi, note, m in zip(group["ci_low"], group["ci_high"], group["note"], mark)],
            "p": group["p"].map(lambda v: fmt(v, ".3g"))})
        if replicated:
            body["draws"] = group["draws"].to_numpy()
            body["draw share"] = group["draw_share"].map(lambda v: fmt(v * 100 if v is not None else v, ".0f") +
                                                         ("%" if v is not None and not pd.isna(v) else ""))
            body["per draw A/tie/B"] = group["per_draw"].map(lambda v: v or "-").to_numpy()
        body["verdict"] = group["verdict"].to_numpy()
        lines.append(body.to_string(index=False))
        lines.append("")
    n = len(table)
    lines.append(f"{n} tests; verdicts after Holm's correction over all {n} at family-wise level {1 - level:.2g}. "
                 "Intervals: ppl ratio and ΔKLD per token over paired token blocks, Δaccuracy over documents; with "
                 "replicate draws a crossed design (token blocks x calibration draws, Satterthwaite t; "
                 "docs/statistics.md). p: the same t (McNemar's exact test for accuracy with one draw each).")
    if "conditional" in table and table["conditional"].any():
        lines.append("† conditional on one calibration draw: the interval covers which eval text was measured, not "
                     "which calibration windows were drawn (sweep calib.seed for replicate draws).")
    if replicated:
        lines.append("draw share: the part of the difference's variance that comes from the calibration draws. "
                     "per draw: significant wins of A / ties / wins of B between single draws (the same seed on both "
                     f"sides where both drew the same seeds, else every pair), each at level {1 - level:.2g} "
                     "uncorrected.")
    if margins:
        shown = ", ".join(f"{k} ±{(math.expm1(v) * 100):.3g}% (ratio)" if k == "ppl" else
                          (f"{k} ±{v * 100:.3g}pt" if k == "acc" else f"{k} ±{v:.3g}") for k, v in margins.items())
        lines.append(f"Equivalence margins: {shown}; TOST (two one-sided tests at {1 - level:.2g}, Holm over the "
                     "equivalence tests): 'equivalent within the margin' when the difference lies inside it, "
                     "'inconclusive' when neither equivalence nor a difference is shown.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", help="run directories (A's first), or a directory holding several runs; "
                                             "runs that differ only in calib.seed are replicate draws of one "
                                             "configuration, and configurations are compared pairwise")
    ap.add_argument("--level", type=level_arg, default=stats.LEVEL,
                    help="confidence level, strictly in (0, 1) (default 0.95)")
    ap.add_argument("--margin", type=margin_arg, action="append", default=[], metavar="KIND=VALUE",
                    help="equivalence margin, repeatable: " + "; ".join(MARGIN_KINDS.values()) +
                         ". Adds TOST equivalence tests: verdicts become equivalent / A better / B better / "
                         "inconclusive")
    ap.add_argument("--allow-cross-model", action="store_true",
                    help="compare runs of different models (other model_fingerprint) on ppl and accuracy; "
                         "their KLD cells are dropped (each is against its own baseline)")
    ap.add_argument("--where", type=where_arg, action="append", default=[], metavar="KEY=V1[,V2]",
                    help="only runs whose KEY (a run-level column: method, bits, calib_source, calib_samples, ...) is "
                         "one of the values; repeatable")
    ap.add_argument("--csv", type=Path, help="also write the table here")
    args = ap.parse_args(argv)
    margins = dict(args.margin)
    runs = select_runs([load_run(d) for d in run_dirs_in_order(args.paths)], args.where)
    if len(runs) < 2:
        print(f"compare: need at least two finished runs; found {len(runs)} under {args.paths}"
              + (" matching --where" if args.where else ""), file=sys.stderr)
        return 2
    dirs = [r.path for r in runs]
    configs = group_runs(runs)
    if len(configs) < 2:
        print(f"compare: the {len(dirs)} runs under {args.paths} are draws of one configuration "
              f"({configs[0].label}); nothing to compare it with", file=sys.stderr)
        return 2
    tables, refused, notes = [], [], {}
    for a, b in itertools.combinations(configs, 2):
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
    table = with_verdicts(table, args.level, margins)
    print(render(table, args.level, notes, margins))
    if args.csv:
        table.to_csv(args.csv, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
