"""Uncertainty for the report's figures: Wilson intervals, paired bootstrap intervals, the exact McNemar test.

Every interval is 95% (two-sided) unless asked otherwise; every bootstrap is seeded, so a report
is the same every time it is written from the same files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5th percentile
BOOTSTRAP_SAMPLES = 2000
SEED = 0


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for a proportion (Newcombe 1998, method 3), as fractions in [0, 1]; (nan, nan) for n = 0."""
    if n <= 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    scale = 1 + z * z / n
    return max(0.0, (centre - spread) / scale), min(1.0, (centre + spread) / scale)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for the discordant pairs (b: right only under A, c: right only under B): the binomial
    test of min(b, c) in b + c trials at 1/2, doubled and capped at 1."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


@dataclass(frozen=True)
class PairedDelta:
    """B's mean minus A's over the same items, with a paired bootstrap interval and the exact McNemar p (0/1 outcomes)."""

    delta: float
    low: float
    high: float
    p_value: float | None  # McNemar, for 0/1 outcomes; None for continuous ones
    n: int

    @property
    def excludes_zero(self) -> bool:
        return self.n > 0 and (self.low > 0 or self.high < 0)


def paired_delta(a, b, weights=None, samples: int = BOOTSTRAP_SAMPLES, seed: int = SEED, binary: bool = True) -> PairedDelta:
    """``mean(b) - mean(a)`` over paired items (weighted means where ``weights`` are given), with the percentile interval
    of a paired bootstrap (items resampled with replacement, both runs together) and, for 0/1 outcomes, McNemar's p."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes differ in length: {a.shape} and {b.shape}")
    n = a.size
    if n == 0:
        return PairedDelta(float("nan"), float("nan"), float("nan"), None, 0)
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    diff = b - a
    delta = float(np.sum(w * diff) / np.sum(w))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n, size=(samples, n))
    boot = np.sum(w[picks] * diff[picks], axis=1) / np.sum(w[picks], axis=1)
    low, high = np.percentile(boot, [2.5, 97.5])
    p = mcnemar_exact(int(np.sum((a == 1) & (b == 0))), int(np.sum((a == 0) & (b == 1)))) if binary else None
    return PairedDelta(delta, float(low), float(high), p, n)


def bootstrap_mean(values, samples: int = BOOTSTRAP_SAMPLES, seed: int = SEED) -> tuple[float, float, float]:
    """(mean, low, high): a mean over items with the percentile interval of a seeded bootstrap; NaNs are left out."""
    x = np.asarray(values, dtype=np.float64)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    boot = x[rng.integers(0, x.size, size=(samples, x.size))].mean(axis=1)
    low, high = np.percentile(boot, [2.5, 97.5])
    return float(x.mean()), float(low), float(high)
