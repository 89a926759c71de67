"""Shared small maths: bootstrap confidence intervals, Shapley weights, entropies, share indices.

Bootstrap intervals resample the *samples* (rows of the per-sample evidence) with replacement and
recompute the statistic; no forward pass is repeated. Intervals are percentile intervals.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections import OrderedDict
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

#: Resampling indices drawn at once: at most 1024 resamples and about a million indices, so the
#: transient memory of a bootstrap stays bounded (about 8 MB of indices) however large N is, while a
#: small N takes few, large chunks (the per-chunk Python and matmul overhead dominated at N = 1k).
#: The draws do not depend on the chunking: the generator fills the chunks in order.
_CHUNK = 1024
_CHUNK_INDICES = 1_000_000


def _draw_indices(n: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(seed)
    done = 0
    rows = max(1, min(_CHUNK, _CHUNK_INDICES // max(n, 1)))
    while done < n_boot:
        k = min(rows, n_boot - done)
        yield rng.integers(0, n, size=(k, n))
        done += k


#: Resamples kept for reuse inside :func:`shared_resamples`: every diagnostic of one analysis
#: resamples the same N rows with the same seed, so their draws share one set of indices (``ogm``
#: batches them in order) and one counts matrix (the others' means). Drawing 10^7 indices and
#: counting them costs about 0.1 s, paid once instead of once per diagnostic. Bounded in bytes, so
#: the memory stays flat however large N is; beyond the bound they are drawn again. Emptied when
#: the outermost ``shared_resamples`` block ends.
_INDEX_CACHE: "OrderedDict[tuple[int, int, int], list[np.ndarray]]" = OrderedDict()
_COUNTS_CACHE: "OrderedDict[tuple[int, int, int], list[np.ndarray]]" = OrderedDict()
_COUNTS_CACHE_BYTES = 64 * 2**20
_INDEX_CACHE_BYTES = 32 * 2**20
_sharing = 0
#: guards both caches: diagnostics that declare ``concurrent`` resample in a worker thread
_CACHE_LOCK = threading.Lock()


@contextlib.contextmanager
def shared_resamples() -> Iterator[None]:
    """Within the block, bootstrap indices and count matrices are computed once per
    (n, n_boot, seed) and reused."""
    global _sharing
    _sharing += 1
    try:
        yield
    finally:
        _sharing -= 1
        if _sharing == 0:
            with _CACHE_LOCK:
                _COUNTS_CACHE.clear()
                _INDEX_CACHE.clear()


def _remember(cache: "OrderedDict[tuple[int, int, int], list[np.ndarray]]", key: tuple[int, int, int],
              chunks: list[np.ndarray], bound: int) -> None:
    """Keep ``chunks`` under ``key``, dropping the least recently used entries beyond ``bound`` bytes."""
    if sum(c.nbytes for c in chunks) > bound:
        return
    with _CACHE_LOCK:
        cache[key] = chunks
        while sum(c.nbytes for entry in cache.values() for c in entry) > bound:
            cache.popitem(last=False)


def _recall(cache: "OrderedDict[tuple[int, int, int], list[np.ndarray]]",
            key: tuple[int, int, int]) -> list[np.ndarray] | None:
    """The chunks kept under ``key`` (marked as recently used), or None."""
    with _CACHE_LOCK:
        chunks = cache.get(key)
        if chunks is not None:
            cache.move_to_end(key)
        return chunks


def bootstrap_indices(n: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Yield [chunk, n] arrays of resampling indices, ``n_boot`` rows in all, from a seeded
    generator (read-only: inside :func:`shared_resamples` they may be shared with later calls)."""
    key = (int(n), int(n_boot), int(seed))
    cached = _recall(_INDEX_CACHE, key)
    if cached is not None:
        yield from cached
        return
    # compact indices (n < 2^15 fits int16) keep a 5k-row resampling at 10 MB
    compact = np.int16 if n < 2**15 else np.int32
    keep = _sharing > 0 and n * n_boot * np.dtype(compact).itemsize <= _INDEX_CACHE_BYTES
    kept: list[np.ndarray] = []
    for idx in _draw_indices(n, n_boot, seed):
        if keep:
            kept.append(idx.astype(compact))
        yield idx
    if keep:
        _remember(_INDEX_CACHE, key, kept, _INDEX_CACHE_BYTES)


def _counts_chunks(n: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """[chunk, n] float64 counts of how often each row is drawn by each resample."""
    for idx in bootstrap_indices(n, n_boot, seed):
        chunk = idx.shape[0]
        if n >= _ROWWISE_COUNTS:
            # one bincount per resample: its n counters stay in cache, where one bincount over the
            # whole chunk scatters into chunk * n of them (measured 1.5x faster at n = 5k)
            counts = np.empty((chunk, n))
            for b in range(chunk):
                counts[b] = np.bincount(idx[b], minlength=n)
            yield counts
        else:
            flat = (idx + np.arange(chunk, dtype=np.int64)[:, None] * n).ravel()
            yield np.bincount(flat, minlength=chunk * n).reshape(chunk, n).astype(np.float64)


#: from this many rows on, counts are taken one resample at a time (below, the per-call cost of a
#: thousand small bincounts outweighs the cache misses of one large one)
_ROWWISE_COUNTS = 1000


def counts_matmul(counts: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``counts @ x`` in float64 through torch's matmul, which runs on torch's thread pool: numpy's
    BLAS starts threads of its own, and on a busy machine the two pools fight (measured 3x slower
    for a [64, 20000] @ [20000, 4] product on two cores)."""
    return (torch.from_numpy(np.ascontiguousarray(counts, dtype=np.float64))
            @ torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))).numpy()


def bootstrap_counts(n: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Yield [chunk, n] float64 matrices of how often each row is drawn, ``n_boot`` rows in all
    (read-only: they may be shared with later calls).

    Row b of the concatenated chunks counts the indices of resample b of :func:`bootstrap_indices`
    (same seed, same resamples), so ``counts @ x / n`` is the resampled column mean of ``x``.
    Inside :func:`shared_resamples` recently used matrices are cached (bounded, see
    ``_COUNTS_CACHE_BYTES``).
    """
    key = (int(n), int(n_boot), int(seed))
    cached = _recall(_COUNTS_CACHE, key)
    if cached is not None:
        for chunk in cached:
            yield chunk if chunk.dtype == np.float64 else chunk.astype(np.float64)
        return
    fits = _sharing > 0 and n * n_boot <= _COUNTS_CACHE_BYTES // 2
    # a matrix that fits the cache as float64 is kept so (8 MB at N = 1k, 40 MB at N = 5k), so that
    # a dozen diagnostics do not each convert it again (a 40 MB conversion costs about as much as
    # the product it feeds); a larger one as compact counts
    wide = n * n_boot * 8 <= _COUNTS_CACHE_BYTES
    kept: list[np.ndarray] = []
    for chunk in _counts_chunks(n, n_boot, seed):
        if fits:
            kept.append(chunk if wide else chunk.astype(np.uint8 if chunk.max(initial=0) < 256 else np.uint16))
        yield chunk
    if fits:
        _remember(_COUNTS_CACHE, key, kept, _COUNTS_CACHE_BYTES)


def true_class_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[b] centred true-class logit z_{i,y_i} - mean_k z_{i,k} (in float32 at least).

    The target of mdi's gradient x activation: unlike the cross-entropy, its gradient does not
    vanish on confidently correct samples.
    """
    z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    return z.gather(1, labels.long()[:, None])[:, 0] - z.mean(dim=1)


def percentile_interval(draws: np.ndarray, level: float = 0.95, *, finite: bool = False) -> np.ndarray:
    """[..., 2] low/high percentiles over the first axis of ``draws``.

    NaN draws are left out, and with ``finite`` infinite ones too (a ratio whose denominator was
    resampled to 0). A column with no draw left, and every column when there are no draws, gets NaN
    bounds.
    """
    draws = np.asarray(draws, dtype=np.float64)
    if finite:
        draws = np.where(np.isfinite(draws), draws, np.nan)
    if draws.shape[0] == 0:
        return np.full(draws.shape[1:] + (2,), np.nan)
    alpha = (1.0 - level) / 2.0
    if not np.isnan(draws).any():  # np.quantile is vectorised over the columns
        # infinite draws (kept without ``finite``) make inf - inf inside the interpolation: np.errstate
        # (per thread, unlike warnings.catch_warnings) keeps that quiet
        with np.errstate(invalid="ignore"):
            return np.stack([np.quantile(draws, alpha, axis=0), np.quantile(draws, 1.0 - alpha, axis=0)], axis=-1)
    # nanquantile loops over the columns in Python (about 0.1 ms a column), so it is kept for
    # draws that hold NaN, and given only columns with a draw left: an all-NaN column would warn,
    # and silencing that needs ``warnings.catch_warnings``, which is not safe beside another thread
    columns = draws.reshape(draws.shape[0], -1)
    bounds = np.full((columns.shape[1], 2), np.nan)
    some = ~np.isnan(columns).all(axis=0)
    if some.any():
        kept = columns[:, some]
        with np.errstate(invalid="ignore"):
            bounds[some] = np.stack([np.nanquantile(kept, alpha, axis=0),
                                     np.nanquantile(kept, 1.0 - alpha, axis=0)], axis=-1)
    return bounds.reshape(draws.shape[1:] + (2,))


def modality_intervals(modalities: Sequence[str], bounds: np.ndarray) -> dict[str, list[float]]:
    """modality -> [low, high] (plain floats, for a report) from [M, 2] bounds."""
    return {m: [float(bounds[j][0]), float(bounds[j][1])] for j, m in enumerate(modalities)}


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
    return np.concatenate([counts_matmul(counts, x) / n for counts in bootstrap_counts(n, n_boot, seed)], axis=0)


def bootstrap_weighted_mean_draws(x: np.ndarray, n_boot: int, seed: int,
                                  weights: np.ndarray | None = None) -> np.ndarray:
    """[n_boot, K] (weighted) column means of ``x`` [n, K] over rows resampled with replacement.

    ``weights`` may be [n] (one weight per row) or [n, K] (per entry; 0 drops an entry). Entries that
    are not finite are dropped (weight 0). A draw whose weights sum to 0 for a column gives NaN
    there. Returns an empty [0, K] array when ``n_boot`` <= 0 or there are no rows. The resamples
    are those of :func:`bootstrap_indices`.
    """
    x = np.asarray(x, dtype=np.float64)
    n, k = x.shape
    if n_boot <= 0 or n == 0:
        return np.empty((0, k))
    w = np.ones((n, k)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.ndim == 1:
        w = np.repeat(w[:, None], k, axis=1)
    finite = np.isfinite(x)
    w = np.where(finite, w, 0.0)
    wx = w * np.where(finite, x, 0.0)
    out = []
    for counts in bootstrap_counts(n, n_boot, seed):
        num, den = counts_matmul(counts, wx), counts_matmul(counts, w)
        with np.errstate(invalid="ignore", divide="ignore"):
            out.append(np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan))
    return np.concatenate(out)


def bootstrap_rows(n: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """The ``n_boot`` row-index arrays [n] of :func:`bootstrap_indices`, one at a time (the whole
    n_boot x n matrix is never held); none when ``n_boot`` <= 0 or ``n`` is 0."""
    if n_boot <= 0 or n == 0:
        return
    for idx in bootstrap_indices(n, n_boot, seed):
        yield from idx


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


def chance_accuracy(labels: np.ndarray, n_classes: int) -> float:
    """The accuracy a model reaches without looking at its inputs: max(1/C, majority-class rate)."""
    labels = np.asarray(labels)
    majority = np.bincount(labels.astype(np.int64), minlength=n_classes).max() / max(labels.size, 1)
    return float(max(1.0 / n_classes, majority))


def within_chance(accuracy: float, labels: np.ndarray, n_classes: int, z: float = 1.96) -> tuple[bool, float]:
    """Whether ``accuracy`` is at most chance level plus sampling noise, and the chance level.

    Noise is the binomial standard error of an accuracy at chance level p0 on N samples,
    sqrt(p0 (1 - p0) / N); within noise means at most p0 + z standard errors (one-sided 97.5%).
    """
    p0 = chance_accuracy(labels, n_classes)
    se = math.sqrt(p0 * (1.0 - p0) / max(np.asarray(labels).size, 1))
    return accuracy <= p0 + z * se, p0
