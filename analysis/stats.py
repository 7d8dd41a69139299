"""Intervals and tests for the harness's aggregates, on top of scipy and statsmodels (nothing hand-rolled that they do).

Token losses inside one window are correlated, so token-level aggregates (ppl, mean KLD, top-1 agreement, Δp) take
*blocks* of consecutive tokens (`eval.ci_block` tokens, default 256) as their independent units: the interval of a
ratio of sums over blocks is a Student-t interval on Cochran's ratio-estimator standard error. (A BCa block
bootstrap was tried first and measured: it under-covered at the block counts of the default evaluation, 86% at 8
blocks and 92% at 16, against 95% nominal; tests/test_stats.py holds the coverage simulation.) Accuracies are per
document and get a Wilson interval; paired comparisons of two runs on identical tokens or documents use the
per-block differences (ppl, KLD) or McNemar's exact test (accuracy). Too few blocks for an interval (MIN_BLOCKS)
gives no interval and says so, rather than a meaningless one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

LEVEL = 0.95
MIN_BLOCKS = 8  # fewer resampling units than this: no interval ("too little data")


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its standard error and interval (None where the data cannot support one)."""

    value: float
    stderr: float | None
    ci_low: float | None
    ci_high: float | None
    n: int  # resampling units (blocks, documents)
    note: str | None = None

    def columns(self) -> dict:
        return {"value": self.value, "stderr": self.stderr, "ci_low": self.ci_low, "ci_high": self.ci_high}


def _too_few(value: float, n: int) -> Estimate:
    return Estimate(value, None, None, None, n, f"too little data for an interval: {n} blocks < {MIN_BLOCKS}")


def ratio_of_sums(numerator: np.ndarray, denominator: np.ndarray, level: float = LEVEL,
                  transform=None) -> Estimate:
    """r = sum(numerator) / sum(denominator) over blocks (e.g. NLL or KLD sums / tokens), optionally transformed
    (exp for ppl, sqrt for an RMS), with a Student-t interval from the ratio estimator's standard error over
    blocks, se(r) = sqrt(sum((num_i - r den_i)^2) / (n (n - 1))) / mean(den) (Cochran's ratio estimator: blocks
    are the independent units). The interval is computed for r and mapped through the (monotone) transform; the
    stderr is reported on the transformed scale, (f(r + se) - f(r - se)) / 2."""
    num, den = np.asarray(numerator, float), np.asarray(denominator, float)
    f = transform or (lambda v: v)
    n, r = len(num), num.sum() / den.sum()
    if n < MIN_BLOCKS:
        return _too_few(float(f(r)), n)
    se = float(np.sqrt(np.sum((num - r * den) ** 2) / (n * (n - 1))) / den.mean())
    if se == 0:  # no spread (KLD exactly 0, say): the interval is the point
        return Estimate(float(f(r)), 0.0, float(f(r)), float(f(r)), n)
    q = float(stats.t.ppf((1 + level) / 2, n - 1))
    return Estimate(float(f(r)), float((f(r + se) - f(r - se)) / 2), float(f(r - q * se)), float(f(r + q * se)), n)


def perplexity(nll_sums: np.ndarray, tokens: np.ndarray, level: float = LEVEL) -> Estimate:
    """exp(sum NLL / sum tokens) over blocks, with its interval."""
    return ratio_of_sums(nll_sums, tokens, level, transform=np.exp)


def paired_ratio(nll_a: np.ndarray, nll_b: np.ndarray, tokens: np.ndarray, level: float = LEVEL) -> Estimate:
    """ppl_A / ppl_B = exp((sum NLL_A - sum NLL_B) / sum tokens) on the same blocks, with a paired interval."""
    return ratio_of_sums(np.asarray(nll_a, float) - np.asarray(nll_b, float), tokens, level, transform=np.exp)


def paired_difference(num_a: np.ndarray, num_b: np.ndarray, tokens: np.ndarray, level: float = LEVEL) -> Estimate:
    """(sum A - sum B) / sum tokens on the same blocks (e.g. ΔKLD per token), with a paired interval."""
    return ratio_of_sums(np.asarray(num_a, float) - np.asarray(num_b, float), tokens, level)


def proportion_over_blocks(successes: np.ndarray, tokens: np.ndarray, level: float = LEVEL) -> Estimate:
    """A per-token rate (top-1 agreement) over blocks of correlated tokens, with an interval inside [0, 1]: Korn and
    Graubard's Clopper-Pearson interval on the effective sample size. The design effect comes from the block
    variance, n_eff = p (1 - p) / se^2 with se Cochran's ratio-estimator standard error over blocks (as
    ratio_of_sums), capped at the token count; it is scaled by (t_{N-1} / t_df)^2 for the few blocks the variance
    rests on, and the interval is Clopper-Pearson's for p n_eff successes in n_eff trials.

    df is the number of blocks in which both outcomes occur, minus one (at most blocks - 1, at least 1): a block
    where every token agrees carries almost no information on how disagreements cluster, so with rare events the
    variance rests on the few blocks that hold them. Without that, few clustered events gave 0.72-0.86 coverage at
    95% nominal; with it, >= 0.95 in every simulated case (docs/statistics.md). A rate of exactly 0 or 1 (no block
    shows the other outcome) has no estimable design effect: n_eff = N (t_{N-1} / t_1)^2, continuous with one event."""
    num, den = np.asarray(successes, float), np.asarray(tokens, float)
    n, N = len(num), float(den.sum())
    p = float(num.sum() / N)
    if n < MIN_BLOCKS:
        return _too_few(p, n)
    se = float(np.sqrt(np.sum((num - p * den) ** 2) / (n * (n - 1))) / den.mean())
    alpha = 1 - level
    informative = int(np.sum((num > 0) & (num < den)))
    df = max(1, min(n - 1, informative - 1))
    shrink = (stats.t.ppf(1 - alpha / 2, N - 1) / stats.t.ppf(1 - alpha / 2, df)) ** 2
    n_eff = N * shrink if se == 0 or p in (0.0, 1.0) else min(p * (1 - p) / se ** 2 * shrink, N)
    x = p * n_eff
    low = 0.0 if x <= 0 else float(stats.beta.ppf(alpha / 2, x, n_eff - x + 1))
    high = 1.0 if x >= n_eff else float(stats.beta.ppf(1 - alpha / 2, x + 1, n_eff - x))
    return Estimate(p, se, low, high, n)


def proportion(successes: int, n: int, level: float = LEVEL) -> Estimate:
    """A rate over independent units (documents) with its binomial stderr and Wilson interval."""
    if n == 0:
        return Estimate(math.nan, None, None, None, 0, "no data")
    p = successes / n
    ci = stats.binomtest(successes, n).proportion_ci(confidence_level=level, method="wilson")
    return Estimate(p, math.sqrt(p * (1 - p) / n), float(ci.low), float(ci.high), n)


def mcnemar_p_value(correct_a: np.ndarray, correct_b: np.ndarray) -> float:
    """Exact McNemar test on paired per-document correctness (statsmodels)."""
    from statsmodels.stats.contingency_tables import mcnemar

    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    table = [[int(np.sum(a & b)), int(np.sum(a & ~b))], [int(np.sum(~a & b)), int(np.sum(~a & ~b))]]
    return float(mcnemar(table, exact=True).pvalue)


def simultaneous_level(level: float, tests: int) -> float:
    """Bonferroni: the level of each of `tests` intervals so that all of them hold together with probability >= `level`
    (and every verdict read off them errs with probability <= 1 - level, the family-wise error rate)."""
    return 1 - (1 - level) / max(int(tests), 1)


def t_interval(value: float, stderr: float | None, df: float | None, level: float) -> tuple[float, float] | None:
    """value -/+ t_{df, (1 + level) / 2} stderr (normal without df); the point where stderr is 0; None without one."""
    if stderr is None or (isinstance(stderr, float) and math.isnan(stderr)):
        return None
    if stderr == 0:
        return value, value
    q = float(stats.t.ppf((1 + level) / 2, df)) if df is not None and not math.isnan(df) else \
        float(stats.norm.ppf((1 + level) / 2))
    return value - q * stderr, value + q * stderr


def paired_accuracy_interval(b: int, c: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Interval of the accuracy difference A - B = (b - c) / n over n paired documents, b of them right only in A and c
    right only in B, whose verdict is McNemar's exact test's at half the error: with d = b + c discordant documents,
    A - B = pi (2 theta - 1), theta = P(right only in A | discordant), pi = P(discordant). Each gets a Clopper-Pearson
    interval at error (1 - level) / 2 and the product is bounded over both (a union bound: coverage >= level, whatever
    d). It excludes 0 exactly when theta's excludes 1/2, i.e. when McNemar's exact p < (1 - level) / 2. With d = 0 it
    is +-(the upper bound of pi): no discordant document does not show the two are equal."""
    half = (1 - level) / 2
    d = b + c
    theta = (0.0, 1.0) if d == 0 else _clopper_pearson(b, d, 1 - half)
    pi = _clopper_pearson(d, n, 1 - half)
    ends = [p * (2 * t - 1) for p in pi for t in theta]
    return min(ends), max(ends)


def _clopper_pearson(x: int, n: int, level: float) -> tuple[float, float]:
    alpha = 1 - level
    low = 0.0 if x == 0 else float(stats.beta.ppf(alpha / 2, x, n - x + 1))
    high = 1.0 if x == n else float(stats.beta.ppf(1 - alpha / 2, x + 1, n - x))
    return low, high


def holm(p_values: list[float], alpha: float = 1 - LEVEL) -> list[bool]:
    """Which hypotheses are rejected at family-wise level `alpha` (Holm's step-down; statsmodels)."""
    if not p_values:
        return []
    from statsmodels.stats.multitest import multipletests

    return [bool(r) for r in multipletests(p_values, alpha=alpha, method="holm")[0]]
