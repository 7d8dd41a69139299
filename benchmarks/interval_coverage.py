"""Coverage of the harness's 95% intervals, by simulation (docs/statistics.md): ppl next to a BCa block bootstrap, and
the top-1 agreement rate next to the Student-t interval it replaced.

    python benchmarks/interval_coverage.py --draws 600                  # ppl: harness (t) vs BCa bootstrap
    python benchmarks/interval_coverage.py --proportion --draws 2000    # top-1 agreement near 0, 1/2 and 1

ppl: token losses are AR(1)-correlated (rho 0.8) inside blocks of 64 tokens, blocks independent, true ppl exp(2). For
each number of blocks, the fraction of draws whose interval contains the true ppl: analysis.stats (Student-t over
blocks, Cochran's ratio estimator) and scipy's BCa bootstrap over blocks (what was tried first).

Proportion: per token, an event (a top-1 disagreement, or agreement near 1) where a latent AR(1) Gaussian (rho 0.8,
or 0.95 for long runs of events) exceeds its 1 - p quantile, so events cluster inside blocks of 64 tokens; the
fraction of draws whose interval holds the true rate p, for analysis.stats.proportion_over_blocks and for the
Student-t interval over blocks (stats.ratio_of_sums), with how often the t interval leaves [0, 1] and how often
every token of a draw has one outcome (rate estimated as exactly 0 or 1).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import stats as sps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis import stats
from tests.simulated import clustered_events, correlated_losses


def bca(nll, tokens, rng):
    res = sps.bootstrap((nll, tokens), lambda a, b, axis=-1: np.exp(a.sum(axis) / b.sum(axis)), paired=True,
                        vectorized=True, n_resamples=2000, method="BCa", rng=rng)
    return res.confidence_interval.low, res.confidence_interval.high


def ppl_coverage(args) -> None:
    truth = np.exp(2.0)
    print(f"{'blocks':>6} {'harness (t)':>12} {'BCa bootstrap':>14}   ({args.draws} draws, nominal 0.95)")
    for n in args.blocks:
        rng, boot_rng = np.random.default_rng(7), np.random.default_rng(0)
        hit_t = hit_b = 0
        for _ in range(args.draws):
            nll, tokens = correlated_losses(rng, n)
            est = stats.perplexity(nll, tokens)
            hit_t += est.ci_low <= truth <= est.ci_high
            low, high = bca(nll, tokens, boot_rng)
            hit_b += low <= truth <= high
        print(f"{n:6d} {hit_t / args.draws:12.3f} {hit_b / args.draws:14.3f}", flush=True)


def proportion_coverage(args) -> None:
    print(f"# {args.draws} draws per row (Monte Carlo se 0.005 at 0.95), blocks of 64 tokens, nominal 0.95")
    print(f"{'rho':>4} {'blocks':>6} {'p':>6} {'proportion_over_blocks':>22} {'t interval':>10} "
          f"{'t outside [0,1]':>15} {'all one outcome':>15}")
    for rho in args.rhos:
        for n in args.blocks:
            for p in args.rates:
                rng = np.random.default_rng([n, int(p * 1e6), int(rho * 100)])
                events = clustered_events(rng, args.draws, n, p, rho=rho)
                tokens = np.full(n, 64.0)
                hit = hit_t = outside = 0
                for counts in events:
                    est, t = stats.proportion_over_blocks(counts, tokens), stats.ratio_of_sums(counts, tokens)
                    hit += est.ci_low <= p <= est.ci_high
                    hit_t += t.ci_low <= p <= t.ci_high
                    outside += t.ci_low < 0 or t.ci_high > 1
                total = events.sum(axis=1)
                edge = float(np.mean((total == 0) | (total == 64.0 * n)))  # rate estimated as exactly 0 or 1
                print(f"{rho:4.2f} {n:6d} {p:6.3f} {hit / args.draws:22.3f} {hit_t / args.draws:10.3f} "
                      f"{outside / args.draws:15.3f} {edge:15.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draws", type=int, default=600)
    ap.add_argument("--blocks", type=int, nargs="+", default=None,
                    help="numbers of blocks (default: 8 12 16 24 32 64 for ppl, 8 16 48 for --proportion)")
    ap.add_argument("--proportion", action="store_true", help="the top-1 agreement interval instead of ppl")
    ap.add_argument("--rates", type=float, nargs="+", default=[0.002, 0.005, 0.02, 0.05, 0.5, 0.98, 0.995],
                    help="true rates for --proportion")
    ap.add_argument("--rhos", type=float, nargs="+", default=[0.8, 0.95], help="latent AR(1) rho for --proportion")
    args = ap.parse_args()
    if args.proportion:
        args.blocks = args.blocks or [8, 16, 48]
        proportion_coverage(args)
    else:
        args.blocks = args.blocks or [8, 12, 16, 24, 32, 64]
        ppl_coverage(args)


if __name__ == "__main__":
    main()
