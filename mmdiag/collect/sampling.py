"""Rows of the pass: the seeded order, batches, subsample sizes and row selection, shards."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from mmdiag.collect.settings import CollectSettings
from mmdiag.errors import ConfigError
from mmdiag.evidence import Evidence, merge_evidence
from mmdiag.runtime.distributed import all_gather_objects
from mmdiag.tensors import map_tensors

def make_loader(data: Dataset | DataLoader, settings: CollectSettings, rows: Sequence[int] | None = None) -> tuple[DataLoader, list[int] | None]:
    """A loader over ``data`` in a seeded shuffled order (or over ``rows``); DataLoaders pass through."""
    if isinstance(data, DataLoader):
        return data, None
    try:
        n = len(data)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError("The dataset has no length; pass a DataLoader or a map-style Dataset.") from None
    if rows is None:
        g = torch.Generator().manual_seed(settings.seed)
        rows = torch.randperm(n, generator=g).tolist()
    loader = DataLoader(
        data, batch_size=settings.batch_size, sampler=list(rows), num_workers=settings.num_workers
    )
    return loader, list(rows)


def per_rank(s: CollectSettings, world: int, caps: Sequence[str]) -> CollectSettings:
    """Split the subsample caps between processes so the total stays the same."""
    return CollectSettings(**{**s.__dict__, **{c: -(-getattr(s, c) // world) for c in caps}})


def gather_evidence(ev: Evidence, world: int) -> Evidence:
    """Every process's evidence, merged in rank order (the result is the same on every rank)."""
    parts = all_gather_objects(ev.to_dict(), world)
    return merge_evidence([Evidence.from_dict(p) for p in parts])


def subsample_size(n: int | None, cap: int, fraction: float, floor: int) -> int:
    """Rows of a subsampled evidence kind: ``ceil(fraction * n)``, at least ``floor``, at most ``cap``.

    A fixed share of the data keeps the kind's cost a fixed share of one evaluation pass (a fixed
    row count would dominate the analysis of a small set and vanish in a large one); the floor
    keeps small sets usable and the cap bounds large ones. Unknown n: the cap.
    """
    if n is None or fraction >= 1.0:
        return cap
    return min(cap, max(floor, math.ceil(fraction * n)))


def pick(n: int | None, cap: int, seed: int) -> set[int] | None:
    """A seeded random set of ``cap`` row numbers out of ``n`` (None: all rows; n unknown: the first).

    The rows are the first ``cap`` of one seeded permutation, so a smaller cap with the same seed
    picks a subset of a larger one's rows.
    """
    if n is None:
        return set(range(cap))
    if cap >= n:
        return None
    g = torch.Generator().manual_seed(seed)
    return set(torch.randperm(n, generator=g)[:cap].tolist())


def pick_slices(n: int | None, rows: int, batch_size: int, per_batch: int, seed: int) -> set[int] | None:
    """A seeded set of at most ``rows`` row numbers out of ``n``, ``per_batch`` from each of a seeded
    random set of max(1, rows // per_batch) batches (batch b holds the rows b * batch_size onwards of
    the pass), so that every batch that holds some holds the same number (a short last batch: all
    of its rows, at most ``per_batch``). When that asks for every batch or more, the rows are a
    :func:`pick` (spread over every batch). None: all rows; n unknown: the first ``rows``.

    Why: a statistic per batch of the subsample (``param_grads``'s cosine of two gradients) depends
    on how many rows make it, so their number must not change with N or with the subsample's share.
    """
    if n is None or rows >= n:
        return pick(n, rows, seed)
    n_batches = -(-n // batch_size)
    wanted = max(1, rows // per_batch)
    if wanted >= n_batches:
        return pick(n, rows, seed)
    g = torch.Generator().manual_seed(seed)
    chosen: set[int] = set()
    for b in sorted(torch.randperm(n_batches, generator=g)[:wanted].tolist()):
        start = b * batch_size
        size = min(batch_size, n - start)
        chosen.update(start + i for i in torch.randperm(size, generator=g)[:per_batch].tolist())
    return chosen


def rows_in(offset: int, size: int, chosen: set[int] | None, cap: int) -> Tensor:
    """Positions within a batch whose global row number is in ``chosen`` (all when None)."""
    if cap == 0:
        return torch.zeros(0, dtype=torch.long)
    if chosen is None:
        return torch.arange(size)
    return torch.tensor([i for i in range(size) if offset + i in chosen], dtype=torch.long)


def take(obj: Any, rows: Tensor) -> Any:
    return map_tensors(lambda t: t[rows.to(t.device)], obj)
