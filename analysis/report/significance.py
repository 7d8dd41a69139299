"""Which differences the data support: paired tests between runs on identical tokens or documents (analysis.compare),
Holm's correction, and the fallbacks for runs that kept no paired records.

- `PairedEvidence` loads finished runs lazily from their directories (run_id -> path) and caches analysis.compare's
  cells per pair of runs (or configurations with replicate draws, analysis.compare's crossed design): a paired
  t-test over blocks of tokens for ppl and KLD (identical tokens: same token fingerprint, same windows and blocks),
  an exact McNemar test over documents for accuracy (same documents).
- `not_worse_than_best` decides one table column's bold set: the best value and every value not significantly
  worse than it (best vs each other, Holm within the column); pairs without paired records fall back to
  non-overlapping intervals, and without intervals only the best value stays bold.
- `wins_ties_losses` counts, for every pair of configs, significant wins, ties and losses over all cells both
  measured on identical data, after Holm over the whole matrix.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import stats
from analysis.compare import Config, Run, compare, group_runs, load_run
from analysis.results import BLOCKS_FILE, DOCS_FILE

ALPHA = 1 - stats.LEVEL  # family-wise error rate of every correction here
PAIRED_TESTS = ("a paired t-test over blocks of tokens for perplexity and KLD (identical tokens; with replicate "
                "calibration draws, over blocks x draws), "
                "an exact McNemar test over documents for accuracy (identical documents)")


class PairedEvidence:
    """Paired comparisons of finished runs, read from their directories (run_id -> path) and cached per pair."""

    def __init__(self, run_dirs: Mapping[str, Path] | None = None, level: float = stats.LEVEL,
                 draws: Mapping[str, list[str]] | None = None):
        self.run_dirs = {str(k): Path(v) for k, v in (run_dirs or {}).items()}
        self.draws = dict(draws or {})  # the row id of a configuration with replicate draws -> its draws' run ids
        self.level = level
        self._runs: dict[str, Run | None] = {}
        self._pairs: dict[tuple[str, str], pd.DataFrame] = {}

    def run(self, run_id: str) -> Run | None:
        """The run with its per-block/per-document records; None without a directory or without records."""
        if run_id not in self._runs:
            self._runs[run_id] = self._load(run_id)
        return self._runs[run_id]

    def _load(self, run_id: str) -> Run | Config | None:
        if run_id in self.draws:  # a configuration's replicate draws, compared as one (analysis.compare)
            runs = [self.run(member) for member in self.draws[run_id]]
            if any(r is None or isinstance(r, Config) for r in runs):
                return None
            configs = group_runs(runs)
            return configs[0] if len(configs) == 1 else None
        path = self.run_dirs.get(run_id)
        if path is None or not ((path / BLOCKS_FILE).exists() or (path / DOCS_FILE).exists()):
            return None  # an old run: rows only
        try:
            return load_run(path)
        except (ValueError, TypeError, KeyError, OSError):  # e.g. a data fingerprint that is not JSON
            return None

    def _pair(self, a, b) -> tuple[pd.DataFrame, bool] | None:
        """analysis.compare's cells of runs (or configurations) a and b, computed once per unordered pair, and whether
        they are oriented b against a; None for a missing id or a run against itself."""
        if pd.isna(a) or pd.isna(b) or a == b:
            return None
        a, b = str(a), str(b)
        key = (a, b) if a < b else (b, a)
        if key not in self._pairs:
            first, second = self.run(key[0]), self.run(key[1])
            self._pairs[key] = (pd.DataFrame() if first is None or second is None
                                else compare(first, second, self.level)[0])
        return self._pairs[key], key != (a, b)

    def _hit(self, a, b, kind: str, task: str) -> tuple[pd.Series, bool] | None:
        pair = self._pair(a, b)
        if pair is None or pair[0].empty:
            return None
        table, flipped = pair
        hit = table[(table["kind"] == kind) & (table["task"] == task)]
        return (hit.iloc[0], flipped) if not hit.empty else None

    def cell(self, a, b, kind: str, task: str) -> tuple[float, float] | None:
        """(p, A - B) of the paired test of run `a` against run `b` on `kind` (ppl, kld, acc, acc_norm) of `task`;
        None when the two runs did not both measure it on identical data (or either kept no records)."""
        got = self._hit(a, b, kind, task)
        if got is None or pd.isna(got[0]["p"]) or pd.isna(got[0]["delta"]):
            return None
        return float(got[0]["p"]), (-1.0 if got[1] else 1.0) * float(got[0]["delta"])

    def ratio(self, a, b, kind: str, task: str) -> tuple[float, float, float] | None:
        """(A / B, interval) of the paired ratio of `kind` (ppl) on `task` between runs (or configurations) a and
        b; None without both runs' records or without an interval."""
        got = self._hit(a, b, kind, task)
        if got is None or pd.isna(got[0]["ci_low"]):
            return None
        row, flipped = got
        if flipped:  # the pair was computed as B against A: invert the ratio and its interval
            return 1 / float(row["ratio"]), 1 / float(row["ci_high"]), 1 / float(row["ci_low"])
        return float(row["ratio"]), float(row["ci_low"]), float(row["ci_high"])


def _better(delta: float, higher_better: bool) -> bool:
    """A - B = delta: is A the better side?"""
    return delta > 0 if higher_better else delta < 0


@dataclass
class ColumnDecision:
    """The bold set of one column and how each comparison with the best was decided."""

    bold: np.ndarray  # bool per row
    paired: int = 0  # comparisons with the best by a paired test (Holm within the column)
    intervals: int = 0  # by non-overlapping intervals (no paired records)
    best_only: int = 0  # neither: only the best value is bold


def not_worse_than_best(values: Sequence[float], ci_low: Sequence[float], ci_high: Sequence[float],
                        run_ids: Sequence, candidates: Sequence[bool], higher_better: bool, kind: str, task: str,
                        evidence: PairedEvidence | None, alpha: float = ALPHA) -> ColumnDecision:
    """Bold = the best candidate value (ties all) and every candidate not significantly worse than it.

    The best candidate is compared with each other candidate by the paired test on identical data; the p-values of
    the column get Holm's correction at `alpha`, and a candidate drops out only when its difference is significant
    and in the worse direction. A pair without paired records is decided by the 95% intervals (dropped when the
    intervals do not overlap), and without intervals on both sides the candidate is not bold."""
    values, lo, hi = (np.asarray(v, dtype=float) for v in (values, ci_low, ci_high))
    pool = np.asarray(candidates, bool) & ~np.isnan(values)
    decision = ColumnDecision(np.zeros(len(values), bool))
    if not pool.any():
        return decision
    best = np.nanmax(values[pool]) if higher_better else np.nanmin(values[pool])
    tied = pool & (values == best)
    decision.bold[tied] = True
    ref = int(np.flatnonzero(tied)[0])
    tests = []  # (row, p, row is worse)
    for row in np.flatnonzero(pool & ~tied):
        got = evidence.cell(run_ids[ref], run_ids[row], kind, task) if evidence is not None else None
        if got is not None:
            p, delta = got  # best - row
            tests.append((row, p, _better(delta, higher_better)))
        elif not np.isnan([lo[ref], hi[ref], lo[row], hi[row]]).any():
            decision.intervals += 1
            decision.bold[row] = hi[row] >= lo[ref] if higher_better else lo[row] <= hi[ref]
        else:
            decision.best_only += 1
    decision.paired = len(tests)
    for (row, _, worse), reject in zip(tests, stats.holm([p for _, p, _ in tests], alpha)):
        decision.bold[row] = not (reject and worse)
    return decision


@dataclass(frozen=True)
class CellSpec:
    """One comparable quantity of the main table: a column, what analysis.compare calls it, and its direction."""

    column: str
    kind: str  # ppl, kld, acc, acc_norm
    task: str
    higher_better: bool


def wins_ties_losses(run_ids: pd.DataFrame, specs: Sequence[CellSpec], is_reference: Sequence[bool],
                     evidence: PairedEvidence, alpha: float = ALPHA) -> tuple[np.ndarray, int]:
    """counts[i, j] = (wins, ties, losses) of config i against config j, and the number of tests.

    `run_ids` has one row per config and one column per spec (the run behind that cell). Every unordered pair of
    configs is tested on every spec both measured on identical data (KLD is skipped against the reference, which it
    is measured from); Holm's correction runs over all tests of the matrix at `alpha`. A win is a significant
    difference in the better direction, a tie no significant difference."""
    n = len(run_ids)
    ids = run_ids.to_numpy(dtype=object)
    is_reference = np.asarray(is_reference, bool)
    tests = []  # (i, j, p, i is better)
    for i in range(n):
        for j in range(i + 1, n):
            for k, spec in enumerate(specs):
                if spec.kind == "kld" and (is_reference[i] or is_reference[j]):
                    continue
                got = evidence.cell(ids[i, k], ids[j, k], spec.kind, spec.task)
                if got is not None:
                    tests.append((i, j, got[0], _better(got[1], spec.higher_better)))
    counts = np.zeros((n, n, 3), int)
    for (i, j, _, i_better), reject in zip(tests, stats.holm([t[2] for t in tests], alpha)):
        if not reject:
            counts[i, j, 1] += 1
            counts[j, i, 1] += 1
        else:
            winner, loser = (i, j) if i_better else (j, i)
            counts[winner, loser, 0] += 1
            counts[loser, winner, 2] += 1
    return counts, len(tests)
