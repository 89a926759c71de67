"""The parameter-gradient subsample comes as equal slices of a few batches (pick_slices), so each
per-batch cosine is over the same number of rows whatever N and the share."""

from __future__ import annotations

from collections import Counter

import pytest

from mmdiag.adapter import ModelAdapter
from mmdiag.collect import CollectSettings, collect, pick
from mmdiag.collect.sampling import pick_slices
from mmdiag.loading import dataset_from_arrays
from tests.helpers.toys import toy_split, trained_toy


def _per_batch(rows: set[int], batch_size: int) -> Counter:
    return Counter(r // batch_size for r in rows)


@pytest.mark.parametrize("n,rows,expected_batches", [(5000, 157, 9), (5000, 160, 10), (100_000, 2048, 128)])
def test_slices_are_equal_and_in_distinct_batches(n, rows, expected_batches):
    chosen = pick_slices(n, rows, 256, 16, seed=12)
    per_batch = _per_batch(chosen, 256)
    assert len(per_batch) == expected_batches and set(per_batch.values()) == {16}
    assert len(chosen) == 16 * expected_batches <= rows and all(0 <= r < n for r in chosen)
    assert pick_slices(n, rows, 256, 16, seed=12) == chosen  # seeded
    assert pick_slices(n, rows, 256, 16, seed=13) != chosen


def test_a_short_last_batch_gives_what_it_has():
    # 517 rows in batches of 256, 256 and 5; two slices of 16 out of three batches
    sizes = set()
    for seed in range(40):
        per_batch = _per_batch(pick_slices(517, 32, 256, 16, seed), 256)
        assert len(per_batch) == 2
        sizes.update(per_batch.values())
        if 2 in per_batch:
            assert per_batch[2] == 5
    assert sizes == {5, 16}  # some seed picked the short batch


def test_every_batch_needed_or_no_count_known_falls_back_to_pick():
    # 64 rows of 1000 at 16 a batch need 4 batches, and there are only 4: spread over all of them
    assert pick_slices(1000, 64, 256, 16, 12) == pick(1000, 64, 12)
    assert pick_slices(None, 10, 256, 16, 12) == set(range(10))  # unknown N: the first rows
    assert pick_slices(100, 100, 32, 16, 12) is None  # every row


def test_collected_cosines_are_over_equal_slices():
    model = trained_toy((3.0, 0.8))
    test = toy_split((3.0, 0.8))[1]  # 400 rows
    names = tuple(k for k in test if k != "label")
    # 80 rows (the floor) as 8 rows from 10 of the 13 batches of 32
    ev = collect(ModelAdapter(model, names), dataset_from_arrays(test), {"param_grads"},
                 CollectSettings(device="cpu", batch_size=32, param_grad_rows=8))
    assert ev.grad_batch_sizes.tolist() == [8] * 10 and ev.grad_cosine.shape == (10, 2)
    assert ev.meta["subsample_rows"]["param_grad"] == 80
    # a share that needs every batch spreads its rows over all 13
    wide = collect(ModelAdapter(model, names), dataset_from_arrays(test), {"param_grads"},
                   CollectSettings(device="cpu", batch_size=32, grad_fraction=1.0, param_grad_fraction=0.5,
                                   param_grad_rows=8))
    assert int(wide.grad_batch_sizes.sum()) == 200 and wide.grad_batch_sizes.numel() == 13
