"""Replicate calibration draws: coverage of the crossed-design interval by simulation, the single-draw case against
analysis.stats, variance components, equivalence (TOST) and the units a comparison needs."""
from __future__ import annotations

import math

import numpy as np
import pytest

from analysis import stats
from analysis.replicates import Side, difference, tost_p_value, units_needed

TOKENS = 256
SD_UNIT, RHO, SD_TOKEN = 0.4, 0.99, 0.03  # per-block mean NLL: text, corr(A's text effect, B's), block x draw noise
SD_PAIRED = math.sqrt(SD_UNIT**2 * (2 - 2 * RHO) + 2 * SD_TOKEN**2)  # sd of A_j - B_j, one draw each, no draw noise


def _simulate(rng, n: int, units: int, ka: int, kb: int, ratio: float, b_calibrates: bool = True):
    """n comparisons of per-block values X_jk = mu + u_j + d_k + e_jk, A [n, J, K_A] and B [n, J, K_B], B's text
    effects strongly correlated with A's; the draw sd is `ratio` x the single-run paired standard error."""
    draw_sd = ratio * SD_PAIRED / math.sqrt(units)
    u_a = SD_UNIT * rng.normal(size=(n, units, 1))
    u_b = RHO * u_a + SD_UNIT * math.sqrt(1 - RHO**2) * rng.normal(size=(n, units, 1))
    a = 2.35 + u_a + draw_sd * rng.normal(size=(n, 1, ka)) + SD_TOKEN * rng.normal(size=(n, units, ka))
    b = 2.30 + u_b + SD_TOKEN * rng.normal(size=(n, units, kb))
    if b_calibrates:
        b = b + draw_sd * rng.normal(size=(n, 1, kb))
    return a, b


def _coverage(seed: int, sims: int, units: int, ka: int, kb: int, ratio: float, b_calibrates: bool = True) -> float:
    a, b = _simulate(np.random.default_rng(seed), sims, units, ka, kb, ratio, b_calibrates)
    den, truth = np.full(units, float(TOKENS)), 0.05
    covered = 0
    for i in range(sims):
        d = difference(Side(a[i] * TOKENS, den), Side(b[i] * TOKENS, den, calibrates=b_calibrates))
        covered += d.ci_low <= truth <= d.ci_high
    return covered / sims


@pytest.mark.parametrize("ratio", [0.25, 4.0])
@pytest.mark.parametrize("draws", [3, 5, 10])
def test_replicate_intervals_cover_the_true_difference(draws, ratio):
    """Nominal 95% intervals of mu_A - mu_B contain it at least 93% of the time with K draws per side, the draws'
    spread small (0.25x the single-run standard error) or dominant (4x), 16 blocks."""
    cov = _coverage(draws * 10 + int(ratio * 4), 600, 16, draws, draws, ratio)
    assert cov >= 0.93, cov


@pytest.mark.parametrize("ratio", [0.25, 1.0, 4.0])
@pytest.mark.parametrize("draws", [3, 5, 10])
def test_intervals_cover_against_a_side_that_does_not_calibrate(draws, ratio):
    """Quantized (K draws) against the unquantized baseline (one run, no draw noise). At 3 draws and dominant draw
    noise the plain Satterthwaite interval covered 0.92-0.93 (4000 simulations); the median-unbiased draw term is
    what brings it above 0.93."""
    cov = _coverage(100 + draws * 10 + int(ratio * 4), 1500 if draws == 3 and ratio == 4.0 else 600, 16, draws, 1,
                    ratio, b_calibrates=False)
    assert cov >= 0.93, cov


def test_one_draw_each_is_the_single_draw_paired_interval():
    """K = 1 on both sides: the old comparison of two runs (per-block differences, Cochran's ratio estimator),
    conditional on the draw; blocks of unequal token counts."""
    rng = np.random.default_rng(3)
    J = 24
    tokens = rng.integers(180, 257, size=J).astype(float)
    nll_a = tokens * (2.4 + 0.4 * rng.normal(size=J))
    nll_b = nll_a - tokens * (0.05 + 0.03 * rng.normal(size=J))
    d = difference(Side(nll_a[:, None], tokens), Side(nll_b[:, None], tokens))
    ratio = stats.paired_ratio(nll_a, nll_b, tokens)
    assert d.conditional and d.draws == (1, 1) and d.components["draws"] == 0 and d.df == pytest.approx(J - 1)
    assert d.value == pytest.approx(math.log(ratio.value), abs=1e-9)
    assert d.ci_low == pytest.approx(math.log(ratio.ci_low), abs=1e-9)
    assert d.ci_high == pytest.approx(math.log(ratio.ci_high), abs=1e-9)
    plain = stats.paired_difference(nll_a, nll_b, tokens)
    assert (d.value, d.ci_low, d.ci_high) == pytest.approx((plain.value, plain.ci_low, plain.ci_high), abs=1e-9)
    assert d.ci_high - d.ci_low > 0.01  # a real interval, not a point


def test_conditional_only_when_a_calibrating_side_has_one_draw():
    rng = np.random.default_rng(4)
    den = np.full(16, float(TOKENS))
    many, one = Side(rng.normal(size=(16, 3)) * TOKENS, den), Side(rng.normal(size=(16, 1)) * TOKENS, den)
    assert difference(many, one).conditional
    assert not difference(many, Side(one.num, den, calibrates=False)).conditional


def test_variance_components_see_the_draw_spread():
    rng = np.random.default_rng(5)
    J, K = 32, 5
    den = np.full(J, float(TOKENS))
    text = 2.4 + 0.4 * rng.normal(size=(J, 1))
    b = Side((text - 0.05 + 0.03 * rng.normal(size=(J, K))) * TOKENS, den)
    same = Side((text + 1e-6 * rng.normal(size=(J, K))) * TOKENS, den)  # identical draws up to tiny token noise
    d = difference(same, b)
    assert d.draw_share() < 0.01, d.components
    assert sum(d.components.values()) == pytest.approx(d.stderr**2, rel=1e-9)
    assert difference(Side(np.repeat(text, K, axis=1) * TOKENS, den), b).components["draws"] < 1e-4 * d.stderr**2
    huge = Side((text + 0.03 * rng.normal(size=(J, K)) + 5.0 * rng.normal(size=(1, K))) * TOKENS, den)
    d = difference(huge, b)
    assert d.draw_share() > 0.95, d.components
    assert sum(d.components.values()) == pytest.approx(d.stderr**2, rel=1e-9)


def _pair(rng, J: int = 24, K: int = 3, shift: float = 0.0, noise: float = 0.03):
    den = np.full(J, float(TOKENS))
    text = 2.4 + 0.4 * rng.normal(size=(J, 1))
    a = Side((text + shift + noise * rng.normal(size=(J, K))) * TOKENS, den)
    b = Side((text + noise * rng.normal(size=(J, K))) * TOKENS, den)
    return a, b


def test_tost_equivalence():
    rng = np.random.default_rng(6)
    d = difference(*_pair(rng))
    assert d.ci_high - d.ci_low < 0.05  # the interval is well inside +-0.1
    assert tost_p_value(d, 0.1) < 0.05
    d = difference(*_pair(rng, shift=0.2))
    assert d.value > 0.15 and tost_p_value(d, 0.1) > 0.5  # farther from 0 than the margin
    outcomes = set()
    for _ in range(40):
        a, b = _pair(rng, J=int(rng.integers(8, 40)), K=int(rng.integers(2, 6)), shift=float(rng.normal(0, 0.02)))
        d95, d90 = difference(a, b), difference(a, b, level=0.90)
        margin = abs(d95.value) + float(rng.uniform(0.5, 3.0)) * d95.stderr
        inside = -margin < d90.ci_low and d90.ci_high < margin
        assert (tost_p_value(d95, margin) < 0.05) == inside, (d90, margin)
        outcomes.add(inside)
    assert outcomes == {True, False}  # both verdicts occurred
    for margin in (0.0, -0.1):
        with pytest.raises(ValueError):
            tost_p_value(d95, margin)


def test_units_needed():
    rng = np.random.default_rng(7)
    J, K = 24, 4
    den = np.full(J, float(TOKENS))
    text = 2.4 + 0.4 * rng.normal(size=(J, 1))
    noisy = Side((text + 0.03 * rng.normal(size=(J, K)) + 0.2 * rng.normal(size=(1, K))) * TOKENS, den)
    stable = Side((text - 0.05 + 0.03 * rng.normal(size=(J, K))) * TOKENS, den)
    d = difference(noisy, stable)
    plan = units_needed(d, noisy, stable, target=0.02)  # a draw sd ~0.2 / sqrt(4) draws >> 0.02 / 2.8
    assert plan["units"] is None and plan["draw_var"]["A"] / K > plan["budget_var"]
    assert units_needed(d, noisy, stable, target=0.02, draws=10_000)["units"] is not None  # more draws: enough
    fp = Side(text * TOKENS, den, calibrates=False)
    rtn = Side((text - 0.05 + 0.03 * rng.normal(size=(J, 1))) * TOKENS, den, calibrates=False)
    d = difference(rtn, fp)
    assert not d.conditional and d.components["draws"] == 0
    coarse, fine = (units_needed(d, rtn, fp, target=t)["units"] for t in (0.004, 0.002))
    assert coarse > 50 and 3.9 <= fine / coarse <= 4.1, (coarse, fine)


def test_sides_on_different_units_are_refused():
    rng = np.random.default_rng(8)
    a = Side(rng.normal(size=(16, 3)) * TOKENS, np.full(16, float(TOKENS)))
    b = Side(rng.normal(size=(17, 3)) * TOKENS, np.full(17, float(TOKENS)))
    with pytest.raises(ValueError):
        difference(a, b)
    with pytest.raises(ValueError):  # as many units, other tokens
        difference(a, Side(a.num, np.full(16, 200.0)))
