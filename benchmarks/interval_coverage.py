"""Coverage of the harness's 95% ppl intervals, by simulation, next to a BCa block bootstrap (docs/statistics.md).

    python benchmarks/interval_coverage.py --draws 600

Token losses are AR(1)-correlated (rho 0.8) inside blocks of 64 tokens, blocks independent, true ppl exp(2). For
each number of blocks, the fraction of draws whose interval contains the true ppl: analysis.stats (Student-t over
blocks, Cochran's ratio estimator) and scipy's BCa bootstrap over blocks (what was tried first).
"""
from __future__ import annotations

import argparse

import numpy as np
from scipy import stats as sps

from analysis import stats


def blocks(rng, n: int, mu: float = 2.0, block: int = 64, rho: float = 0.8):
    e = rng.normal(size=(n, block))
    x = np.empty_like(e)
    x[:, 0] = e[:, 0]
    for t in range(1, block):
        x[:, t] = rho * x[:, t - 1] + np.sqrt(1 - rho**2) * e[:, t]
    return (mu + 0.5 * x).sum(axis=1), np.full(n, float(block))


def bca(nll, tokens, rng):
    res = sps.bootstrap((nll, tokens), lambda a, b, axis=-1: np.exp(a.sum(axis) / b.sum(axis)), paired=True,
                        vectorized=True, n_resamples=2000, method="BCa", rng=rng)
    return res.confidence_interval.low, res.confidence_interval.high


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--draws", type=int, default=600)
    ap.add_argument("--blocks", type=int, nargs="+", default=[8, 12, 16, 24, 32, 64])
    args = ap.parse_args()
    truth = np.exp(2.0)
    print(f"{'blocks':>6} {'harness (t)':>12} {'BCa bootstrap':>14}   ({args.draws} draws, nominal 0.95)")
    for n in args.blocks:
        rng, boot_rng = np.random.default_rng(7), np.random.default_rng(0)
        hit_t = hit_b = 0
        for _ in range(args.draws):
            nll, tokens = blocks(rng, n)
            est = stats.perplexity(nll, tokens)
            hit_t += est.ci_low <= truth <= est.ci_high
            low, high = bca(nll, tokens, boot_rng)
            hit_b += low <= truth <= high
        print(f"{n:6d} {hit_t / args.draws:12.3f} {hit_b / args.draws:14.3f}", flush=True)


if __name__ == "__main__":
    main()
