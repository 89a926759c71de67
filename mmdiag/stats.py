"""Shared small maths: bootstrap confidence intervals, Shapley weights, entropies, share indices.

Bootstrap intervals resample the *samples* (rows of the per-sample evidence) with replacement and
recompute the statistic; no forward pass is repeated. Intervals are percentile intervals.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

#: Resampling indices drawn at once: at most 64 rows and about a million indices, so the transient
#: memory of a bootstrap stays bounded (about 8 MB of indices) however large N is.
_CHUNK = 64
_CHUNK_INDICES = 1_000_000


def bootstrap_indices(n: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Yield [chunk, n] arrays of resampling indices, ``n_boot`` rows in all, from a seeded generator."""
    rng = np.random.default_rng(seed)
    done = 0
    rows = max(1, min(_CHUNK, _CHUNK_INDICES // max(n, 1)))
    while done < n_boot:
        k = min(rows, n_boot - done)
        yield rng.integers(0, n, size=(k, n))
        done += k


def percentile_interval(draws: np.ndarray, level: float = 0.95) -> np.ndarray:
    """[..., 2] low/high percentiles over the first axis of ``draws``."""
    alpha = (1.0 - level) / 2.0
    return np.stack(
        [np.nanquantile(draws, alpha, axis=0), np.nanquantile(draws, 1.0 - alpha, axis=0)], axis=-1
    )


def bootstrap_mean_draws(x: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, K] column means of ``x`` [n, K] over ``n_boot`` row resamples (with replacement).

    Each draw is ``counts @ x / n`` (counts = how often each row was drawn), a matrix product
    rather than a gather of every column, so it costs O(chunk * n) memory and BLAS time whatever
    the number of columns. The resamples are those of :func:`bootstrap_indices`.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    n, k = x.shape
    if n_boot <= 0 or n == 0:
        return np.zeros((0, k))
    out = []
    for idx in bootstrap_indices(n, n_boot, seed):
        chunk = idx.shape[0]
        flat = (idx + np.arange(chunk)[:, None] * n).ravel()
        counts = np.bincount(flat, minlength=chunk * n).reshape(chunk, n).astype(np.float64)
        out.append(counts @ x / n)
    return np.concatenate(out, axis=0)


def bootstrap_mean_ci(
    per_sample: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> np.ndarray:
    """Percentile interval of the mean of each column of ``per_sample`` [N, K] -> [K, 2]."""
    x = np.asarray(per_sample, dtype=np.float64)
    squeeze = x.ndim == 1
    if squeeze:
        x = x[:, None]
    if n_boot <= 0 or x.shape[0] == 0:
        out = np.full((x.shape[1], 2), np.nan)
        return out[0] if squeeze else out
    out = percentile_interval(bootstrap_mean_draws(x, n_boot, seed), level)
    return out[0] if squeeze else out


def bootstrap_ci(
    statistic: Callable[[np.ndarray], np.ndarray],
    n: int,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> np.ndarray:
    """Percentile interval of a general statistic of resampled rows.

    Args:
        statistic: maps an index array [n] (rows, with repeats) to a vector [K].
        n: number of rows.
    Returns:
        [K, 2] low/high bounds.
    """
    if n_boot <= 0 or n == 0:
        k = np.atleast_1d(statistic(np.arange(n))).shape[0]
        return np.full((k, 2), np.nan)
    draws = [np.atleast_1d(statistic(row)) for idx in bootstrap_indices(n, n_boot, seed) for row in idx]
    return percentile_interval(np.asarray(draws, dtype=np.float64), level)


def shapley_weight(subset_size: int, n_players: int) -> float:
    """|S|! (M - |S| - 1)! / M!: the Shapley weight of a coalition S not containing the player."""
    return math.factorial(subset_size) * math.factorial(n_players - subset_size - 1) / math.factorial(n_players)


def shapley_matrix(n_players: int) -> np.ndarray:
    """[M, 2^M] matrix A with phi = A @ v for coalition values v indexed by bit mask.

    phi_m = sum over S not containing m of w(|S|) (v(S + m) - v(S)).
    """
    a = np.zeros((n_players, 1 << n_players))
    for m in range(n_players):
        bit = 1 << m
        for s in range(1 << n_players):
            if s & bit:
                continue
            w = shapley_weight(bin(s).count("1"), n_players)
            a[m, s | bit] += w
            a[m, s] -= w
    return a


def normalized_entropy(shares: Sequence[float]) -> float:
    """-sum q log q / log K of non-negative shares (normalised to sum 1); 1 = uniform, 0 = one share."""
    q = np.clip(np.asarray(shares, dtype=np.float64), 0.0, None)
    k = q.shape[0]
    total = q.sum()
    if k < 2 or total <= 0:
        return float("nan")
    q = q / total
    nz = q[q > 0]
    return float(-(nz * np.log(nz)).sum() / math.log(k))


def positive_shares(values: Mapping[str, float]) -> dict[str, float]:
    """max(v, 0) / sum max(v, 0); uniform when nothing is positive."""
    pos = {k: max(float(v), 0.0) for k, v in values.items()}
    total = sum(pos.values())
    if total <= 0:
        return {k: 1.0 / len(pos) for k in pos}
    return {k: v / total for k, v in pos.items()}


def gini(shares: Sequence[float]) -> float:
    """Gini coefficient of non-negative shares: 0 = equal, (K-1)/K = one holds everything."""
    x = np.sort(np.clip(np.asarray(shares, dtype=np.float64), 0.0, None))
    if x.sum() <= 0:
        return 0.0
    k = x.shape[0]
    cum = np.cumsum(x)
    return float((k + 1 - 2 * (cum / cum[-1]).sum()) / k)
