"""Percentile bootstrap confidence intervals (Efron & Tibshirani 1993, ch. 13).

Items are resampled with replacement ``n_resamples`` times and the metric is recomputed on
each resample; the interval is the (alpha/2, 1 - alpha/2) percentiles of those values. For a
metric that is a mean of per-item scores the resampled means come straight from the scores;
a corpus metric (BLEU, chrF) is recomputed from the resampled predictions and references.
``paired_bootstrap`` and ``permutation_test`` compare two runs on the same items (per-item
scores in the same order): the paired bootstrap resamples items and counts how often the mean
difference changes sign (Koehn 2004, "Statistical significance tests for machine translation
evaluation"); the permutation test swaps each item's pair of scores at random (a sign-flip
test of the mean difference, two-sided). Deliberately left out: BCa intervals.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

from lmstack.errors import ConfigError


def _check(n_resamples: int, alpha: float) -> None:
    if n_resamples < 1:
        raise ConfigError(f"bootstrap: n_resamples={n_resamples}, expected >= 1")
    if not 0 < alpha < 1:
        raise ConfigError(f"bootstrap: alpha={alpha}, expected a value in (0, 1), e.g. 0.05 for 95%")


def bootstrap_mean_ci(scores: Sequence[float], n_resamples: int = 1000, alpha: float = 0.05,
                      seed: int = 0) -> tuple[float, float]:
    """(low, high) of the mean of per-item ``scores``."""
    _check(n_resamples, alpha)
    x = np.asarray(scores, dtype=np.float64)
    if x.size == 0:
        return (0.0, 0.0)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_resamples, x.size))
    means = x[idx].mean(axis=1)
    lo, hi = np.percentile(means, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def bootstrap_corpus_ci(metric: Callable[[list, list], float], predictions: Sequence, references: Sequence,
                        n_resamples: int = 200, alpha: float = 0.05, seed: int = 0,
                        progress: bool = False) -> tuple[float, float]:
    """(low, high) of a corpus-level ``metric(predictions, references)``."""
    _check(n_resamples, alpha)
    n = len(predictions)
    if n == 0:
        return (0.0, 0.0)
    rng = np.random.default_rng(seed)
    steps: Optional[range] = range(n_resamples)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="bootstrap", unit="resample")
    values = []
    for _ in steps:
        idx = rng.integers(0, n, size=n)
        values.append(metric([predictions[i] for i in idx], [references[i] for i in idx]))
    lo, hi = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def paired_bootstrap(a: Sequence[float], b: Sequence[float], n_resamples: int = 1000, alpha: float = 0.05,
                     seed: int = 0) -> tuple[float, float, float, float]:
    """(mean difference b - a, ci low, ci high, two-sided p) for paired per-item scores."""
    _check(n_resamples, alpha)
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    if d.size == 0:
        return 0.0, 0.0, 0.0, 1.0
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(n_resamples, d.size))].mean(axis=1)
    lo, hi = np.percentile(means, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    p = min(1.0, 2 * min((means <= 0).mean(), (means >= 0).mean())) if d.any() else 1.0
    return float(d.mean()), float(lo), float(hi), float(p)


def permutation_test(a: Sequence[float], b: Sequence[float], n_resamples: int = 10000, seed: int = 0) -> float:
    """Two-sided p-value of the mean paired difference under random swaps of each pair (add-one
    corrected, so never 0)."""
    _check(n_resamples, 0.05)
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    if d.size == 0 or not d.any():
        return 1.0
    rng = np.random.default_rng(seed)
    signs = rng.choice([-1.0, 1.0], size=(n_resamples, d.size))
    null = np.abs((signs * d).mean(axis=1))
    return float((1 + (null >= abs(d.mean()) - 1e-12).sum()) / (n_resamples + 1))
