"""Per-block statistics simulated with tokens correlated inside each block and blocks independent (the setting the
harness's intervals assume): shared by the coverage tests (tests/test_stats.py) and benchmarks/interval_coverage.py,
so that the benchmark's coverage tables and the tests' coverage bounds are about the same data."""
from __future__ import annotations

import numpy as np
from scipy import stats as sps


def ar1_latents(rng: np.random.Generator, shape: tuple[int, ...], rho: float) -> np.ndarray:
    """Standard Gaussian latents of `shape`, AR(1)-correlated (rho) along the last axis (the tokens of a block)."""
    e = rng.normal(size=shape)
    x = np.empty_like(e)
    x[..., 0] = e[..., 0]
    for t in range(1, shape[-1]):
        x[..., t] = rho * x[..., t - 1] + np.sqrt(1 - rho**2) * e[..., t]
    return x


def correlated_losses(rng: np.random.Generator, n_blocks: int, mu: float = 2.0, block: int = 64,
                      rho: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    """Token losses of mean mu (true ppl exp(mu)), summed per block, and the tokens per block."""
    x = ar1_latents(rng, (n_blocks, block), rho)
    return (mu + 0.5 * x).sum(axis=1), np.full(n_blocks, float(block))


def clustered_events(rng: np.random.Generator, draws: int, n_blocks: int, p: float, block: int = 64,
                     rho: float = 0.8) -> np.ndarray:
    """Event counts per block [draws, n_blocks]: a token is an event where its latent exceeds the 1 - p quantile, so
    events (top-1 disagreements) come in runs inside a block, as they would after a bad layer; true rate p."""
    x = ar1_latents(rng, (draws, n_blocks, block), rho)
    return (x > sps.norm.ppf(1 - p)).sum(axis=-1).astype(float)
