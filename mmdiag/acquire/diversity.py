"""Diversity: k-means++ D² seeding on gradient embeddings (BADGE's selection rule), optionally
weighted by a per-row score (RL-MBA's difficulty, mmdiag's PROPOSED combination)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmdiag.errors import ConfigError


@dataclass(frozen=True)
class Seeding:
    """The rows chosen, in order, with D²(x) at the moment each was chosen (the diversity term;
    for the first row, its squared norm)."""

    order: np.ndarray
    d2: np.ndarray


def kmeanspp(embeddings: np.ndarray, budget: int, rng: np.random.Generator,
             weight: np.ndarray | None = None) -> Seeding:
    """k-means++ seeding (Arthur & Vassilvitskii 2007) as BADGE uses it (Ash et al., ICLR 2020).

    The first row is the one with the largest w(x)·||e(x)||² (BADGE: the largest norm); each next
    row is drawn with probability proportional to w(x)·D²(x), D(x) = distance of e(x) to the
    nearest row chosen so far (chosen rows have D = 0 and are never drawn again). With ``weight``
    None, w = 1 (plain BADGE). When every remaining w·D² is 0 (duplicates), the next row is the
    unchosen one with the largest w (ties to the lowest index), so exactly ``budget`` rows come back.

    Args:
        embeddings: [N, D] float array.
        budget: rows to choose, 1 <= budget <= N.
        rng: the seeded generator of the draws.
        weight: [N] non-negative per-row weights, or None.
    """
    e = np.asarray(embeddings, dtype=np.float64)
    n = e.shape[0]
    if not 1 <= budget <= n:
        raise ConfigError(f"`budget` must be between 1 and the pool size {n}; found {budget}.")
    w = np.ones(n) if weight is None else np.clip(np.asarray(weight, dtype=np.float64), 0.0, None)
    d2 = (e * e).sum(axis=1)
    taken = np.zeros(n, dtype=bool)
    order, picked_d2 = [], []
    first = int(np.argmax(w * d2))
    for step in range(budget):
        if step == 0:
            i = first
        else:
            mass = np.where(taken, 0.0, w * d2)
            total = mass.sum()
            if total > 0 and np.isfinite(total):
                i = int(rng.choice(n, p=mass / total))
            else:
                i = int(np.argmax(np.where(taken, -np.inf, w)))
        order.append(i)
        picked_d2.append(float(d2[i]))
        taken[i] = True
        diff = e - e[i]
        d2 = np.minimum(d2 if step else np.full(n, np.inf), (diff * diff).sum(axis=1))
        d2[taken] = 0.0
    return Seeding(np.asarray(order, dtype=np.int64), np.asarray(picked_d2))


def spread(embeddings: np.ndarray, order: np.ndarray) -> float:
    """Diversity of a selection: mean over the chosen rows of the squared distance to the nearest
    other chosen row, divided by the pool's mean squared distance between two rows (2·trace of its
    covariance). About 1 for a selection as spread as random pairs; 0 for duplicates; 0 for one row."""
    e = np.asarray(embeddings, dtype=np.float64)
    chosen = e[order]
    if len(order) < 2:
        return 0.0
    sq = (chosen * chosen).sum(axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * chosen @ chosen.T, 0.0)
    np.fill_diagonal(d2, np.inf)
    scale = 2.0 * float(e.var(axis=0).sum())
    return float(d2.min(axis=1).mean() / scale) if scale > 0 else 0.0
