"""Comparisons that survive another calibration draw: two configurations, each with one or more replicate draws
(runs that differ only in `calib.seed`), judged on identical eval units (token blocks or lm-eval documents).

The design is crossed: every draw of a configuration is evaluated on the same units. Per side X (draws k, units
j), the linearised per-unit value is modelled as X_jk = mu_X + u_j + d_k + e_jk: a unit effect (which text), a
draw effect (which calibration windows) and their interaction. The difference of the two sides' grand means,
m = mean(A) - mean(B), has variance

    Var(m) = Var(u_A - u_B) / J  +  s2_draw(A) / K_A  +  s2_draw(B) / K_B  +  s2_e(A) / (J K_A)  +  s2_e(B) / (J K_B)

estimated without bias by  V = s2_D / J + (MS_draws(A) - MS_e(A)) / (J K_A) + (MS_draws(B) - MS_e(B)) / (J K_B),
where D_j is the per-unit difference of the two sides' draw means and MS are the two-way ANOVA mean squares of each
side (draws, residual). A draw term estimated below zero is dropped (the draws then show no spread beyond the
token noise). The interval is Student-t with Satterthwaite's degrees of freedom, the draws' mean squares (2-9 df in
practice) taken median-unbiased (`median_unbiased`) so that a draw spread that happens to look small does not
also buy a small t quantile. A side that does not calibrate
(fp, RTN) has no draw term; a side with a single draw cannot estimate its own and makes the comparison
"conditional on one calibration draw" (as every comparison was before replicates). docs/statistics.md argues the
design and holds the coverage simulation (benchmarks/replicate_coverage.py; tests/test_replicates.py asserts it).

The draws of the two sides are treated as independent even when they share seeds (and so calibration windows):
if a bad draw hurts both methods, that only makes V conservative.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from analysis.stats import LEVEL, MIN_BLOCKS


@dataclass(frozen=True)
class Side:
    """One configuration's replicate draws on shared units: `num` [units, draws] (per-unit sums: NLL, KLD,
    correctness), `den` [units] (tokens per unit; 1 for documents) and whether the configuration calibrates (a
    method without calibration has no draw noise, whatever its number of runs)."""

    num: np.ndarray
    den: np.ndarray
    calibrates: bool = True

    @property
    def draws(self) -> int:
        return self.num.shape[1]

    def ratio(self) -> float:
        return float(self.num.sum() / (self.den.sum() * self.draws))

    def linearised(self) -> np.ndarray:
        """Per-unit values whose plain mean is the ratio of sums (Cochran's linearisation, units as the independent
        sampling units): z_jk = (num_jk - r den_j) / mean(den) + r."""
        r = self.ratio()
        return (self.num - r * self.den[:, None]) / self.den.mean() + r


def median_unbiased(df: int) -> float:
    """df / median(chi2_df): the factor that makes a mean square with `df` degrees of freedom median-unbiased for
    its expectation. With 2-4 draws the draws' mean square falls below its expectation most of the time (chi2 with 2
    df has its median at 0.69 of its mean), and exactly then Satterthwaite's df is large and the t quantile small:
    the plain estimate covered 92% at 3 draws against a baseline with dominant draw noise. Inflated, it covers >= 94%
    in every simulated case (docs/statistics.md); the factor is 1.44 at 2 df, 1.19 at 4, 1.08 at 9."""
    return df / float(stats.chi2.ppf(0.5, df))


def _mean_squares(z: np.ndarray) -> tuple[float, float]:
    """(MS_draws, MS_residual) of a two-way layout without replication: z [units J, draws K], K >= 2."""
    J, K = z.shape
    m = z.mean()
    rows, cols = z.mean(axis=1, keepdims=True), z.mean(axis=0, keepdims=True)
    ms_draws = J * float(((cols - m) ** 2).sum()) / (K - 1)
    ms_res = float(((z - rows - cols + m) ** 2).sum()) / ((J - 1) * (K - 1))
    return ms_draws, ms_res


@dataclass(frozen=True)
class Difference:
    """mean(A) - mean(B) on the linearised scale, with its interval and where its variance comes from."""

    value: float
    stderr: float | None
    ci_low: float | None
    ci_high: float | None
    df: float | None
    p: float
    units: int
    draws: tuple[int, ...]
    conditional: bool  # True: at least one calibrating side has a single draw (the draw's noise is not in V)
    components: dict[str, float] = field(default_factory=dict)  # variance of m from units (tokens) and draws
    note: str | None = None

    def draw_share(self) -> float | None:
        """The fraction of Var(m) that comes from the calibration draws."""
        total = sum(self.components.values())
        return self.components.get("draws", 0.0) / total if total > 0 else None


def difference(a: Side, b: Side, level: float = LEVEL) -> Difference:
    """The crossed-design comparison of two configurations on the same units (see the module docstring)."""
    return contrast([a, b], [1.0, -1.0], level)


def contrast(sides: list[Side], weights: list[float], level: float = LEVEL) -> Difference:
    """sum_i w_i mean(side_i) for independent configurations on the same units, e.g. [1, -1] (a difference) or
    [1, -1, -1, 1] (a difference of differences: is one method's out-of-domain penalty larger than another's?).
    Its variance is var_j(sum_i w_i D_ij) / J plus each side's draw term times w_i^2 (module docstring)."""
    if len({s.num.shape[0] for s in sides}) != 1 or any(not np.array_equal(s.den, sides[0].den) for s in sides):
        raise ValueError("the sides are not measured on the same units")
    J = sides[0].num.shape[0]
    zs = [s.linearised() for s in sides]
    m = float(sum(w * z.mean() for w, z in zip(weights, zs)))
    conditional = any(s.calibrates and s.draws < 2 for s in sides)
    draws = tuple(s.draws for s in sides)
    if J < MIN_BLOCKS:
        return Difference(m, None, None, None, None, math.nan, J, draws, conditional,
                          note=f"too little data for an interval: {J} units < {MIN_BLOCKS}")
    d = sum(w * z.mean(axis=1) for w, z in zip(weights, zs))
    terms = [(float(d.var(ddof=1)) / J, float(d.var(ddof=1)) / J, J - 1)]  # (contribution, |c MS|, df)
    draw_var = 0.0
    for side, z, w in zip(sides, zs, weights):
        if not side.calibrates or side.draws < 2 or w == 0:
            continue
        ms_draws, ms_res = _mean_squares(z)
        ms_draws *= median_unbiased(side.draws - 1)
        scale = J * side.draws / w ** 2
        if ms_draws > ms_res:  # a draw spread beyond what the token noise alone would give
            draw_var += (ms_draws - ms_res) / scale
            terms += [(ms_draws / scale, ms_draws / scale, side.draws - 1),
                      (-ms_res / scale, ms_res / scale, (J - 1) * (side.draws - 1))]
    V = sum(t[0] for t in terms)
    components = {"units": V - draw_var, "draws": draw_var}
    if V <= 0:  # identical sides (method=fp against itself): no spread at all
        p = 1.0 if m == 0 else 0.0
        return Difference(m, 0.0, m, m, None, p, J, draws, conditional, components)
    df = V ** 2 / sum(c ** 2 / k for _, c, k in terms if k > 0)
    se = math.sqrt(V)
    q = float(stats.t.ppf((1 + level) / 2, df))
    p = float(2 * stats.t.sf(abs(m) / se, df))
    return Difference(m, se, m - q * se, m + q * se, df, p, J, draws, conditional, components)


def tost_p_value(diff: Difference, margin: float) -> float:
    """Two one-sided tests of |true difference| < margin (on the scale of `diff`): the larger one-sided p-value.
    Equivalence at level alpha is exactly the (1 - 2 alpha) interval lying inside (-margin, margin)."""
    if margin <= 0:
        raise ValueError(f"an equivalence margin must be positive; got {margin}")
    if diff.stderr is None:
        return math.nan
    if diff.stderr == 0:
        return 0.0 if abs(diff.value) < margin else 1.0
    t_low = (diff.value + margin) / diff.stderr  # H0: difference <= -margin
    t_high = (diff.value - margin) / diff.stderr  # H0: difference >= margin
    return float(max(stats.t.sf(t_low, diff.df), stats.t.cdf(t_high, diff.df)))


def units_needed(diff: Difference, a: Side, b: Side, target: float, level: float = LEVEL, power: float = 0.8,
                 draws: int | None = None) -> dict:
    """How many units (and draws per side) a comparison needs to resolve a true difference of `target` (on the
    linearised scale) at `level` with `power`, from the variance components of `a` and `b` measured here:
    se(J, K) <= target / (z_level + z_power). Returns the per-unit and per-draw variances it used, and the units
    needed at `draws` draws per side (default: as measured), None where no number of units is enough (the draws'
    own noise already exceeds the budget: more draws are needed). A draw variance estimated below zero (the draws
    spread less than their token noise predicts) is taken as 0 and named in `draw_var_below_zero` with its estimate:
    the advice then rests on the eval text alone (docs/statistics.md)."""
    J = a.num.shape[0]
    za, zb = a.linearised(), b.linearised()
    d = za.mean(axis=1) - zb.mean(axis=1)
    per_unit = float(d.var(ddof=1))  # Var(D_j) at the measured draws: unit effect + interaction / K
    draw_var, resid, below = {}, {}, {}
    for name, side, z in (("A", a, za), ("B", b, zb)):
        if side.calibrates and side.draws >= 2:
            ms_draws, ms_res = _mean_squares(z)
            estimate = (ms_draws - ms_res) / J  # sigma^2 of one draw's effect, unbiased
            draw_var[name] = max(0.0, estimate)
            if estimate < 0:
                below[name] = estimate
            resid[name] = ms_res
        else:
            draw_var[name], resid[name] = 0.0, 0.0
    unit_var = max(0.0, per_unit - sum(resid[n] / s.draws for n, s in (("A", a), ("B", b))))
    budget = (target / (stats.norm.ppf((1 + level) / 2) + stats.norm.ppf(power))) ** 2
    ka, kb = (draws or a.draws) if a.calibrates else 1, (draws or b.draws) if b.calibrates else 1
    fixed = draw_var["A"] / ka + draw_var["B"] / kb
    per_j = unit_var + resid["A"] / ka + resid["B"] / kb
    needed = None if fixed >= budget else max(2, math.ceil(per_j / (budget - fixed)))
    return {"units": needed, "draws": (ka, kb), "unit_var": unit_var, "draw_var": draw_var,
            "draw_var_below_zero": below, "interaction_var": resid, "budget_var": budget, "measured_units": J}


def decomposition(side: Side) -> dict[str, float]:
    """Variance components of one configuration's per-unit values over its draws (one-sample crossed design):
    `unit` (which text: unit effect + interaction, the token noise of one run's unit), `draw` (which calibration
    windows) and the variance of one run's mean, `one_run` = unit / J + draw, with the draw's `draw_share` of it.
    `draw_estimate` is the unbiased estimate of the draw variance, (MS_draws - MS_residual) / J; where it falls below
    zero `draw` is 0."""
    z = side.linearised()
    J, K = z.shape
    if K < 2 or not side.calibrates:
        raise ValueError("a decomposition needs two or more draws of a calibrating configuration")
    ms_draws, ms_res = _mean_squares(z)
    ms_units = K * float(((z.mean(axis=1) - z.mean()) ** 2).sum()) / (J - 1)
    unit = max(0.0, (ms_units - ms_res) / K) + ms_res  # Var of one run's unit value: sigma2_u + sigma2_e
    draw_estimate = (ms_draws - ms_res) / J
    draw = max(0.0, draw_estimate)
    one_run = unit / J + draw
    return {"unit": unit, "draw": draw, "draw_estimate": draw_estimate, "interaction": ms_res, "one_run": one_run,
            "draw_share": draw / one_run if one_run > 0 else 0.0, "units": J, "draws": K}
