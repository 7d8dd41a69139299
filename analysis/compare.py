"""Paired comparisons of finished runs, from their records alone (no model is run).

    python -m analysis.compare RUN_A RUN_B            # two run directories: A is the first, B the second
    python -m analysis.compare RUN                    # one run: beside its unquantized baseline on the same tokens
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
from typing import NamedTuple

import numpy as np
import pandas as pd

from analysis import replicates, stats
from analysis.labels import method_label
from analysis.results import BLOCKS_FILE, DOCS_FILE, find_run_dirs, no_run_there, read_run


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


class RunPathError(ValueError):
    """A path given on the command line that names no finished run (a typo must not silently make B another run)."""


def run_dirs_in_order(paths: list[str]) -> list[Path]:
    """Finished runs in the order given, so that A is the first argument; a directory holding several runs adds
    them in sorted order. A run named twice counts once. A path (or glob) that holds no finished run is a
    RunPathError naming it and why."""
    found: dict[Path, Path] = {}
    for path in paths:
        runs = find_run_dirs(path)
        if not runs:
            raise RunPathError(no_run_there(path))
        for run in runs:
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


class Margin(NamedTuple):
    kind: str  # ppl, kld, acc
    value: float  # on the scale the comparison is made on
    text: str  # as given


def margin_arg(text: str) -> Margin:
    """--margin KIND=VALUE -> (kind, margin on the scale the comparison is made on, the text): ppl=1% is log(1.01) on
    the log ppl ratio, kld=0.01 nats per token, acc=1pt (or 0.01) accuracy."""
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
    return Margin(kind, margin, text)


def margins_by_kind(margins: list[Margin], option: str = "--margin") -> dict[str, float]:
    """{kind: margin}; a kind given twice is refused (ValueError naming both), never silently the last one."""
    out: dict[str, Margin] = {}
    for m in margins:
        if m.kind in out:
            raise ValueError(f"{option} {m.kind} given twice ({out[m.kind].text} and {m.text}); give each metric once")
        out[m.kind] = m
    return {k: m.value for k, m in out.items()}


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
          per_draw: str | None, lower_is_better: bool, ratio: bool, exact: tuple[int, int, int] | None = None) -> dict:
    """One comparison. `ci_low`/`ci_high` hold the interval of this cell alone at the requested level until
    with_verdicts replaces them with the family's simultaneous interval; `exact` = (documents right only in A, only
    in B, documents) where accuracy is judged by McNemar's exact test."""
    f = np.exp if ratio else (lambda v: v)
    none = diff.ci_low is None
    a_only, b_only, units = exact if exact is not None else (None, None, None)
    return {"kind": kind, "task": task, "A": a_value, "B": b_value, "delta": a_value - b_value,
            "ratio": float(f(diff.value)) if ratio else None,
            "ci_low": None if none else float(f(diff.ci_low)), "ci_high": None if none else float(f(diff.ci_high)),
            "p": diff.p, "estimate": diff.value, "stderr": diff.stderr, "df": diff.df,
            "draws": f"{len(a.runs)} vs {len(b.runs)}", "draw_share": diff.draw_share(), "per_draw": per_draw,
            "conditional": diff.conditional, "lower_is_better": lower_is_better, "note": diff.note,
            "is_ratio": ratio, "a_only": a_only, "b_only": b_only, "units": units}


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
            exact = None
            if ca.shape[1] == cb.shape[1] == 1:  # one draw each: the exact test of paired binary outcomes
                diff = dataclasses.replace(diff, p=stats.mcnemar_p_value(ca[:, 0], cb[:, 0]))
                exact = (int(np.sum(ca[:, 0] & ~cb[:, 0])), int(np.sum(~ca[:, 0] & cb[:, 0])), len(ca))
            better = []
            for i, j in _draw_pairs(a, b):
                p = stats.mcnemar_p_value(ca[:, i], cb[:, j])
                better.append(None if not p < alpha else bool(ca[:, i].mean() > cb[:, j].mean()))
            cells.append(_cell(metric, task, float(ca.mean()), float(cb.mean()), diff, a, b,
                               _per_draw(a, b, better), False, False, exact))
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


def _family_interval(row: pd.Series, level: float) -> tuple[float, float] | None:
    """A cell's interval at `level` on the scale it is tested on (log ratio for ppl, difference otherwise): McNemar's
    counterpart for accuracy with one draw each, else the t interval of its estimate."""
    if not pd.isna(row.get("units")):
        return stats.paired_accuracy_interval(int(row["a_only"]), int(row["b_only"]), int(row["units"]), level)
    return stats.t_interval(float(row["estimate"]), None if pd.isna(row["stderr"]) else float(row["stderr"]),
                            None if pd.isna(row["df"]) else float(row["df"]), level)


def with_verdicts(table: pd.DataFrame, level: float, margins: dict[str, float] | None = None) -> pd.DataFrame:
    """Every cell of the table that carries a test is one family of m tests. Each gets a simultaneous interval at
    level 1 - (1 - level) / m (Bonferroni: all m hold together with probability >= level), and its verdict is read off
    that interval: 'A better' / 'B better' where it excludes no difference, else 'no significant difference'. With
    `margins` (kind -> margin on the compared scale), cells of those kinds read the same interval against the margin:
    'equivalent within the margin' where it lies inside (-margin, margin), else 'A better' / 'B better' where it
    excludes 0, else 'inconclusive'. So no printed interval can disagree with its verdict, and every verdict of the
    table errs with probability <= 1 - level. `p_adj` is the Bonferroni-adjusted p of the difference (m p; 2 m p for
    an accuracy cell judged by McNemar's test, whose interval spends half its error on the discordance rate);
    `ci_low_cell`/`ci_high_cell` keep each cell's own interval at `level`, for the CSV."""
    margins = margins or {}
    tested = table["p"].notna().to_numpy()
    m = int(tested.sum())
    each = stats.simultaneous_level(level, m)
    lows, highs, verdicts, adjusted = [], [], [], []
    for i, row in enumerate(table.itertuples(index=False)):
        row = pd.Series(row._asdict())
        ci = _family_interval(row, each) if tested[i] else None
        margin = _margin_of(row["kind"], margins)
        if ci is None:
            lows.append(None), highs.append(None), adjusted.append(math.nan)
            verdicts.append("no test: too little data")
            continue
        lo, hi = ci
        f = math.exp if row["is_ratio"] else (lambda v: v)
        lows.append(f(lo)), highs.append(f(hi))
        adjusted.append(min(1.0, float(row["p"]) * m * (2 if not pd.isna(row["units"]) else 1)))
        differs = lo > 0 or hi < 0
        a_better = (hi < 0) if row["lower_is_better"] else (lo > 0)
        if margin is not None and -margin < lo and hi < margin:
            verdicts.append("equivalent within the margin")
        elif differs:
            verdicts.append("A better" if a_better else "B better")
        else:
            verdicts.append("inconclusive" if margin is not None else "no significant difference")
    out = table.assign(ci_low_cell=table["ci_low"], ci_high_cell=table["ci_high"], ci_low=lows, ci_high=highs,
                       p_adj=adjusted, verdict=verdicts)
    return out.drop(columns=["lower_is_better"])


def family_header(table: pd.DataFrame, level: float) -> str:
    """What the intervals and verdicts of one printed table hold for: the family of its tests and the adjustment."""
    m = int(table["p"].notna().sum())
    pairs = table.groupby(["A_run", "B_run"], sort=False).ngroups
    each = stats.simultaneous_level(level, m)
    return (f"Family: the {m} tests of this output ({pairs} pair{'s' if pairs != 1 else ''} x every eval set, metric "
            f"and task below). Intervals are simultaneous at {level * 100:.4g}% (Bonferroni: each at "
            f"{each * 100:.4g}%), and each verdict reads its own interval, so the chance that any verdict here is "
            f"wrong is at most {1 - level:.2g}.")


def render(table: pd.DataFrame, level: float, notes: dict[tuple[str, str], str] | None = None,
           margins: dict[str, float] | None = None) -> str:
    """The family header, then the table per pair, each headed by A and B and its note in `notes` (keyed by (A_run,
    B_run)); the intervals shown are the simultaneous ones with_verdicts gave."""
    def fmt(v, spec=".4g"):
        return "-" if v is None or pd.isna(v) else format(v, spec)

    ci_header = f"simult. {level * 100:.4g}% CI"  # 0.975 reads 97.5%, not 98%
    replicated = "draws" in table and (table["draws"] != "1 vs 1").any()
    lines = [family_header(table, level), ""]
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
            "p": group["p"].map(lambda v: fmt(v, ".3g")), "p adj.": group["p_adj"].map(lambda v: fmt(v, ".3g"))})
        if replicated:
            body["draws"] = group["draws"].to_numpy()
            body["draw share"] = group["draw_share"].map(lambda v: fmt(v * 100 if v is not None else v, ".0f") +
                                                         ("%" if v is not None and not pd.isna(v) else ""))
            body["per draw A/tie/B"] = group["per_draw"].map(lambda v: v or "-").to_numpy()
        body["verdict"] = group["verdict"].to_numpy()
        lines.append(body.to_string(index=False))
        lines.append("")
    lines.append("Intervals: ppl ratio and ΔKLD per token over paired token blocks (Student t), Δaccuracy over "
                 "documents (with one draw each: McNemar's exact test's counterpart, Clopper-Pearson on the discordant "
                 "documents, spending half its error on how many there are); with replicate draws a crossed design "
                 "(token blocks x calibration draws, Satterthwaite t; docs/statistics.md). p: the test of no "
                 "difference of that cell alone (the same t; McNemar's exact test for accuracy with one draw each); "
                 "p adj.: Bonferroni over the family (m p, 2 m p for McNemar), below the family-wise level exactly "
                 "where the verdict is a difference.")
    if "conditional" in table and table["conditional"].any():
        lines.append("† conditional on one calibration draw: the interval covers which eval text was measured, not "
                     "which calibration windows were drawn (sweep calib.seed for replicate draws).")
    if replicated:
        lines.append("draw share: the part of the difference's variance that comes from the calibration draws. "
                     "per draw: significant wins of A / ties / wins of B between single draws (the same seed on both "
                     f"sides where both drew the same seeds, else every pair), each at level {1 - level:.2g} "
                     "uncorrected: a description, outside the family.")
    if margins:
        shown = ", ".join(f"{k} ±{(math.expm1(v) * 100):.3g}% (ratio)" if k == "ppl" else
                          (f"{k} ±{v * 100:.3g}pt" if k == "acc" else f"{k} ±{v:.3g}") for k, v in margins.items())
        lines.append(f"Equivalence margins: {shown}, read off the same simultaneous intervals: 'equivalent within the "
                     "margin' where the interval lies inside it, 'A better' / 'B better' where it excludes no "
                     "difference, 'inconclusive' where it shows neither (a TOST at half the interval's error per "
                     "side, in the same family).")
    return "\n".join(lines)


def baseline_of(config: Config) -> Config | None:
    """The unquantized model on the tokens `config` was measured on, as its runs recorded it (per block: the
    baseline's NLL; its KLD from itself is 0), as a configuration compare() can take; None without such records
    (eval.kld=false). Its lm-eval documents are not kept by a run, so it has no accuracy cells."""
    run = config.runs[0]
    if "base_nll_sum" not in run.blocks:
        return None
    blocks = run.blocks[["task", "window", "block", "tokens"]].assign(nll_sum=run.blocks["base_nll_sum"])
    if "kld_sum" in run.blocks:
        blocks = blocks.assign(kld_sum=0.0)
    label = f"the unquantized model on the same tokens (the baseline recorded in {run.path.name})"
    base = Run(run.path, label, run.rows, blocks, pd.DataFrame(), run.prints, run.model, run.model_print, None,
               f"baseline of {run.replicate_of or run.path.name}", run.started_at)
    return Config([base], label)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", help="run directories (A's first), or a directory holding several runs; "
                                             "runs that differ only in calib.seed are replicate draws of one "
                                             "configuration, and configurations are compared pairwise; one "
                                             "configuration alone is compared with its unquantized baseline")
    ap.add_argument("--level", type=level_arg, default=stats.LEVEL,
                    help="confidence level, strictly in (0, 1) (default 0.95)")
    ap.add_argument("--margin", type=margin_arg, action="append", default=[], metavar="KIND=VALUE",
                    help=("equivalence margin, once per metric: " + "; ".join(MARGIN_KINDS.values()) +
                          ". Verdicts become equivalent / A better / B better / inconclusive").replace("%", "%%"))
    ap.add_argument("--allow-cross-model", action="store_true",
                    help="compare runs of different models (other model_fingerprint) on ppl and accuracy; "
                         "their KLD cells are dropped (each is against its own baseline)")
    ap.add_argument("--where", type=where_arg, action="append", default=[], metavar="KEY=V1[,V2]",
                    help="only runs whose KEY (a run-level column: method, bits, calib_source, calib_samples, ...) is "
                         "one of the values; repeatable")
    ap.add_argument("--csv", type=Path, help="also write the table here")
    args = ap.parse_args(argv)
    try:
        margins = margins_by_kind(args.margin)
        dirs = run_dirs_in_order(args.paths)
    except (RunPathError, ValueError) as err:
        print(f"compare: {err}", file=sys.stderr)
        return 2
    runs = select_runs([load_run(d) for d in dirs], args.where)
    if not runs:
        print(f"compare: no finished run under {args.paths} matches --where", file=sys.stderr)
        return 2
    configs = group_runs(runs)
    pairs, notes = list(itertools.combinations(configs, 2)), {}
    if len(configs) == 1:  # one run (or the draws of one configuration): beside its baseline on the same tokens
        base = baseline_of(configs[0])
        if base is None:
            print(f"compare: {configs[0].label} is one configuration and its records hold no baseline (run with "
                  "eval.kld=true); nothing to compare it with", file=sys.stderr)
            return 2
        pairs = [(configs[0], base)]
        if any(not r.docs.empty for r in configs[0].runs):
            notes[(configs[0].label, base.label)] = ("accuracy: a run keeps no baseline documents; compare with a "
                                                     "method=fp run for accuracy")
    tables, refused = [], []
    for a, b in pairs:
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
