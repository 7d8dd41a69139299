"""Coverage of analysis.replicates.difference's 95% interval of the true mean difference, by simulation.

    python benchmarks/replicate_coverage.py --draws 1000

Two configurations A and B, each with K replicate calibration draws, evaluated on the same J blocks of 256 tokens.
Per side X, block j and draw k, the mean NLL per token of the block is

    X_jk = mu_X + u_Xj + d_Xk + e_Xjk

u: the block's text (sd 0.4; B's is A's with correlation 0.99, u_B = rho u_A + noise: the same text is hard for
both), d: the calibration draw, e: the block-by-draw interaction (the tokens' noise in one run; sd 0.03). The draw
sd is set relative to se1 = sd(X_Aj - X_Bj) / sqrt(J) at one draw each without draw effects: the standard error of
the single-run paired comparison, which is all the token noise a one-draw comparison sees. A draw sd of 0.25 se1
is small, 4 se1 dominates Var(m) even at K = 10. Blocks hold 256 tokens each (den constant; num = value * 256).
The truth is mu_A - mu_B = 0.05.

Scenarios: both sides calibrate with normal draw effects; the same with heavy-tailed draw effects (Student t, 3
df, scaled to the same sd); B that does not calibrate (calibrates=False, one run, no draw effect: a quantized
configuration against the unquantized baseline or RTN); and, for reference, one draw each (K = 1, the comparison
"conditional on one calibration draw", whose interval does not account for the draws at all).
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from analysis.replicates import Side, difference

TOKENS = 256
SD_UNIT, RHO, SD_TOKEN = 0.4, 0.99, 0.03
MU_A, MU_B = 2.35, 2.30
SD_PAIRED = float(np.sqrt(SD_UNIT**2 * (2 - 2 * RHO) + 2 * SD_TOKEN**2))  # sd of X_Aj - X_Bj, one draw, no d

SCENARIOS = {  # name: (draw-effect distribution, does B calibrate)
    "normal draws": ("normal", True),
    "t3 draws (heavy-tailed)": ("t3", True),
    "B fixed (no calibration, 1 run)": ("normal", False),
    "K=1 each (conditional, reference)": ("normal", True),
}


def draw_effects(rng, shape, sd: float, tails: str) -> np.ndarray:
    if tails == "t3":
        return sd * rng.standard_t(3, size=shape) / np.sqrt(3.0)  # Var(t_3) = 3
    return sd * rng.normal(size=shape)


def simulate(rng, n: int, units: int, ka: int, kb: int, ratio: float, tails: str = "normal",
             b_calibrates: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """n simulated comparisons: per-block values of A [n, J, K_A] and B [n, J, K_B]."""
    draw_sd = ratio * SD_PAIRED / np.sqrt(units)
    u_a = SD_UNIT * rng.normal(size=(n, units, 1))
    u_b = RHO * u_a + SD_UNIT * np.sqrt(1 - RHO**2) * rng.normal(size=(n, units, 1))
    a = MU_A + u_a + draw_effects(rng, (n, 1, ka), draw_sd, tails) + SD_TOKEN * rng.normal(size=(n, units, ka))
    b = MU_B + u_b + SD_TOKEN * rng.normal(size=(n, units, kb))
    if b_calibrates:
        b = b + draw_effects(rng, (n, 1, kb), draw_sd, tails)
    return a, b


def coverage(rng, n: int, units: int, ka: int, kb: int, ratio: float, tails: str = "normal",
             b_calibrates: bool = True) -> tuple[float, float, float]:
    """(coverage of the true difference, mean CI half-width, mean draw share of the estimated variance)."""
    a, b = simulate(rng, n, units, ka, kb, ratio, tails, b_calibrates)
    den, truth = np.full(units, float(TOKENS)), MU_A - MU_B
    hits, widths, shares = 0, 0.0, 0.0
    for i in range(n):
        d = difference(Side(a[i] * TOKENS, den), Side(b[i] * TOKENS, den, calibrates=b_calibrates))
        hits += d.ci_low <= truth <= d.ci_high
        widths += (d.ci_high - d.ci_low) / 2
        shares += d.draw_share() or 0.0
    return hits / n, widths / n, shares / n


def cells(args):
    """(scenario, J, K_A, K_B, draw-sd ratio) for every row of the table."""
    for name, (tails, b_cal) in SCENARIOS.items():
        ratios = [r for r in args.ratios if not (tails == "t3" and r == 0)]  # t3 at sd 0 is the normal case
        ks = [1] if name.startswith("K=1") else args.replicates
        for units in args.units:
            for k in ks:
                for ratio in ratios:
                    yield name, units, k, (k if b_cal else 1), ratio


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", "--reps", dest="draws", type=int, default=1000, help="simulations per row")
    ap.add_argument("--units", type=int, nargs="+", default=[16, 48], help="eval units (blocks) J")
    ap.add_argument("--replicates", type=int, nargs="+", default=[3, 5, 10], help="calibration draws K per side")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.25, 1.0, 4.0],
                    help="draw sd in units of se1, the single-run paired standard error")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    start = time.perf_counter()
    mc = np.sqrt(0.95 * 0.05 / args.draws)
    print(f"# coverage of analysis.replicates.difference's 95% interval of mu_A - mu_B: {args.draws} simulations "
          f"per row (Monte Carlo se {mc:.3f} at 0.95)")
    print(f"# X_jk = mu + u_j + d_k + e_jk per side, blocks of {TOKENS} tokens, unit sd {SD_UNIT}, corr(u_A, u_B) "
          f"{RHO}, token sd {SD_TOKEN}; draw sd = ratio x se1, se1 = {SD_PAIRED:.4f} / sqrt(J)")
    print(f"# python benchmarks/replicate_coverage.py {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip())
    print(f"{'scenario':<34} {'J':>3} {'K_A/K_B':>7} {'draw sd':>7} {'coverage':>8} {'half-width':>10} "
          f"{'draw share':>10}")
    last = None
    for i, (name, units, ka, kb, ratio) in enumerate(cells(args)):
        if last is not None and name != last:
            print()
        last = name
        rng = np.random.default_rng([args.seed, i])
        tails, b_cal = SCENARIOS[name]
        cov, half, share = coverage(rng, args.draws, units, ka, kb, ratio, tails, b_cal)
        print(f"{name:<34} {units:3d} {f'{ka}/{kb}':>7} {ratio:6.2f}x {cov:8.3f} {half:10.4f} {share:10.2f}",
              flush=True)
    print(f"# {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
