"""mmdiag.stats: bootstrap resamples, their counts matrices (and the bounded cache), intervals."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from mmdiag import stats
from mmdiag.stats import (bootstrap_counts, bootstrap_indices, bootstrap_mean_ci, bootstrap_mean_draws,
                          bootstrap_weighted_mean_draws)


def slow_means(x: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Column means of the gathered rows of every resample, one resample at a time."""
    return np.array([x[row].mean(axis=0) for idx in bootstrap_indices(len(x), n_boot, seed) for row in idx])


@pytest.mark.parametrize("n, n_boot", [(1, 5), (7, 130), (3000, 70)])
def test_counts_are_the_bincounts_of_the_indices(n: int, n_boot: int) -> None:
    rows = [row for idx in bootstrap_indices(n, n_boot, 3) for row in idx]
    with stats.shared_resamples():
        for _ in range(2):  # computed, then served from the cache
            counts = np.concatenate(list(bootstrap_counts(n, n_boot, 3)))
            assert counts.dtype == np.float64 and counts.shape == (n_boot, n)
            for b in (0, n_boot // 2, n_boot - 1):
                assert np.array_equal(counts[b], np.bincount(rows[b], minlength=n))
            assert (counts.sum(axis=1) == n).all()
        assert (n, n_boot, 3) in stats._COUNTS_CACHE
    assert not stats._COUNTS_CACHE  # emptied when the block ends
    list(bootstrap_counts(n, n_boot, 3))
    assert not stats._COUNTS_CACHE  # nothing is kept outside a block


def test_mean_draws_match_the_gathered_means() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(501, 3))
    np.testing.assert_allclose(bootstrap_mean_draws(x, 200, 5), slow_means(x, 200, 5), atol=1e-12)
    ci = bootstrap_mean_ci(x, 200, 5, 0.9)
    np.testing.assert_allclose(ci, np.quantile(slow_means(x, 200, 5), [0.05, 0.95], axis=0).T, atol=1e-12)


def test_weighted_mean_draws_drop_non_finite_entries() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 2))
    x[::7, 1] = np.nan
    w = rng.uniform(0.5, 2.0, size=60)
    got = bootstrap_weighted_mean_draws(x, 50, 2, w)
    ref = []
    for idx in bootstrap_indices(60, 50, 2):
        for row in idx:
            cols = []
            for j in range(2):
                keep = np.isfinite(x[row, j])
                cols.append((w[row][keep] * x[row, j][keep]).sum() / w[row][keep].sum())
            ref.append(cols)
    np.testing.assert_allclose(got, np.array(ref), atol=1e-12)


def test_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stats, "_COUNTS_CACHE_BYTES", 3000)
    monkeypatch.setattr(stats, "_sharing", 1)
    for seed in range(5):
        list(bootstrap_counts(100, 10, seed))  # 1000 bytes each as uint8
    assert len(stats._COUNTS_CACHE) == 3 and (100, 10, 4) in stats._COUNTS_CACHE
    list(bootstrap_counts(1000, 10, 0))  # 10 kB: too large to keep
    assert (1000, 10, 0) not in stats._COUNTS_CACHE
    # an abandoned generator caches nothing
    gen = bootstrap_counts(50, 200, 9)
    next(gen)
    gen.close()
    assert (50, 200, 9) not in stats._COUNTS_CACHE
    stats._COUNTS_CACHE.clear()


def test_percentile_interval_leaves_out_nan_and_with_finite_infinite_draws() -> None:
    rng = np.random.default_rng(1)
    draws = rng.normal(size=(400, 3))
    draws[::7, 0] = np.nan
    draws[::5, 1] = np.inf
    draws[:, 2] = np.nan
    got = stats.percentile_interval(draws, 0.9, finite=True)
    for j in range(2):  # the slow reference: the finite draws of each column alone
        col = draws[:, j][np.isfinite(draws[:, j])]
        alpha = (1.0 - 0.9) / 2.0
        assert np.array_equal(got[j], np.quantile(col, [alpha, 1.0 - alpha]))
    assert np.isnan(got[2]).all()  # no draw left
    assert not np.array_equal(stats.percentile_interval(draws[:, 1], 0.9), got[1])  # kept without ``finite``
    assert stats.percentile_interval(draws[:, 0], 0.9).shape == (2,)
    assert np.isnan(stats.percentile_interval(np.empty((0, 4)), 0.9)).all()


def test_modality_intervals_are_plain_floats() -> None:
    out = stats.modality_intervals(("a", "v"), np.array([[0.1, 0.2], [0.3, 0.4]], dtype=np.float32))
    assert out == {"a": [pytest.approx(0.1), pytest.approx(0.2)], "v": [pytest.approx(0.3), pytest.approx(0.4)]}
    assert all(type(x) is float for lo_hi in out.values() for x in lo_hi)


def test_shared_indices_are_the_fresh_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside shared_resamples a second reader of the same (n, n_boot, seed) gets the cached
    indices, equal to a fresh draw outside the block; the counts built on them agree too."""
    fresh = np.concatenate(list(bootstrap_indices(300, 70, 5)))
    fresh_counts = np.concatenate(list(bootstrap_counts(300, 70, 5)))
    with stats.shared_resamples():
        first = np.concatenate(list(bootstrap_indices(300, 70, 5)))
        assert (300, 70, 5) in stats._INDEX_CACHE
        again = np.concatenate(list(bootstrap_indices(300, 70, 5)))
        counts = np.concatenate(list(bootstrap_counts(300, 70, 5)))
    assert not stats._INDEX_CACHE and not stats._COUNTS_CACHE
    np.testing.assert_array_equal(first, fresh)
    np.testing.assert_array_equal(again, fresh)
    np.testing.assert_array_equal(counts, fresh_counts)
    monkeypatch.setattr(stats, "_INDEX_CACHE_BYTES", 100)
    with stats.shared_resamples():
        list(bootstrap_indices(300, 70, 5))
        assert not stats._INDEX_CACHE  # over the bound: drawn again next time


def test_percentile_interval_of_an_all_nan_column_warns_nothing() -> None:
    draws = np.array([[1.0, np.nan, 3.0], [2.0, np.nan, np.nan], [4.0, np.nan, 5.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bounds = stats.percentile_interval(draws, 0.5)
    assert np.isnan(bounds[1]).all()
    np.testing.assert_allclose(bounds[0], np.quantile([1.0, 2.0, 4.0], [0.25, 0.75]))
    np.testing.assert_allclose(bounds[2], np.quantile([3.0, 5.0], [0.25, 0.75]))
    assert stats.percentile_interval(np.array([np.nan, 1.0, 3.0]), 0.5).shape == (2,)
