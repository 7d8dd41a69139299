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


def holm(p_values: list[float], alpha: float = 1 - LEVEL) -> list[bool]:
    """Which hypotheses are rejected at family-wise level `alpha` (Holm's step-down; statsmodels)."""
    if not p_values:
        return []
    from statsmodels.stats.multitest import multipletests

    return [bool(r) for r in multipletests(p_values, alpha=alpha, method="holm")[0]]
