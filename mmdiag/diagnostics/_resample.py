"""Bootstrap draws shared by the mdi, cal, ogm and perceptual diagnostics.

The diagnostics here turn *column means* of per-sample evidence into non-linear statistics
(shares, softmaxes, ratios). The percentile interval of such a statistic needs the bootstrap
draws of the means themselves, not only their interval, so this module returns the draws. The
resampling indices are those of :func:`mmdiag.stats.bootstrap_indices` (same seed, same rows), so a
linear statistic computed from these draws has exactly the interval of
:func:`mmdiag.stats.bootstrap_mean_ci`.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from mmdiag.stats import bootstrap_indices, bootstrap_mean_draws

__all__ = ["bootstrap_mean_draws", "resample_rows", "interval", "ci_dict"]


def resample_rows(n: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """The ``n_boot`` row-index arrays [n] drawn by :func:`mmdiag.stats.bootstrap_indices`, one at a
    time (a generator: the whole n_boot x n matrix is never held)."""
    if n_boot <= 0 or n == 0:
        return
    for idx in bootstrap_indices(n, n_boot, seed):
        yield from idx


def interval(draws: np.ndarray, level: float) -> np.ndarray:
    """[K, 2] percentile interval over the first axis of ``draws`` [B, K] (NaN when B = 0).

    Draws that are not finite are ignored; a column with no finite draw gets NaN bounds.
    """
    draws = np.asarray(draws, dtype=np.float64)
    if draws.ndim == 1:
        draws = draws[:, None]
    k = draws.shape[1]
    out = np.full((k, 2), np.nan)
    alpha = (1.0 - level) / 2.0
    for j in range(k):
        col = draws[:, j]
        col = col[np.isfinite(col)]
        if col.size:
            out[j] = np.quantile(col, [alpha, 1.0 - alpha])
    return out


def ci_dict(modalities: tuple[str, ...], bounds: np.ndarray) -> dict[str, list[float]]:
    """modality -> [low, high] from a [M, 2] array of bounds."""
    return {m: [float(bounds[j, 0]), float(bounds[j, 1])] for j, m in enumerate(modalities)}
