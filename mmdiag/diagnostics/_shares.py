"""Private maths of the share-based diagnostics (gradient_conflict, attribution, balance).

Everything here is vectorised over bootstrap draws: a statistic is computed from the column means
of resampled evidence rows (:func:`mmdiag.stats.bootstrap_weighted_mean_draws`, seeded), so one
draw costs a gather and a mean, and its interval is :func:`mmdiag.stats.percentile_interval`.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from mmdiag.errors import EvidenceError
from mmdiag.evidence import Evidence
from mmdiag.report import interval


# ---------------------------------------------------------------------------------------- shares
def positive_share_rows(contrib: np.ndarray) -> np.ndarray:
    """Row-wise q_m = max(c_m, 0) / sum_k max(c_k, 0); uniform where no entry is positive.

    ``contrib`` is [..., M]; NaN entries count as 0.
    """
    c = np.nan_to_num(np.asarray(contrib, dtype=np.float64), nan=0.0)
    pos = np.clip(c, 0.0, None)
    total = pos.sum(axis=-1, keepdims=True)
    m_count = c.shape[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        q = np.where(total > 0, pos / np.where(total > 0, total, 1.0), 1.0 / m_count)
    return q


def sum_share_rows(values: np.ndarray) -> np.ndarray:
    """Row-wise q_m = v_m / sum_k v_k of non-negative ``values`` [..., M]; uniform where the sum is 0."""
    v = np.asarray(values, dtype=np.float64)
    total = v.sum(axis=-1, keepdims=True)
    uniform = np.full_like(v, 1.0 / v.shape[-1])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, v / np.where(total > 0, total, 1.0), uniform)


def entropy_rows(shares: np.ndarray) -> np.ndarray:
    """Row-wise normalised entropy -sum q log q / log M of shares [..., M] (0 log 0 = 0)."""
    q = np.asarray(shares, dtype=np.float64)
    m_count = q.shape[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        terms = np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0)), 0.0)
    return -terms.sum(axis=-1) / math.log(m_count) + 0.0  # + 0.0 turns -0.0 into 0.0


def min_max_ratio(shares: Sequence[float]) -> float:
    """Smallest share over largest share: 1 = equal, 0 = some modality has no share."""
    q = np.asarray(shares, dtype=np.float64)
    top = float(q.max())
    return float(q.min() / top) if top > 0 else 1.0


# ---------------------------------------------------------------------------------------- means
def weighted_mean(x: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """[K] (weighted) column means of ``x`` [n, K], ignoring non-finite entries (NaN if none left)."""
    x = np.asarray(x, dtype=np.float64)
    n, k = x.shape
    w = np.ones((n, k)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.ndim == 1:
        w = np.repeat(w[:, None], k, axis=1)
    finite = np.isfinite(x)
    w = np.where(finite, w, 0.0)
    num = (w * np.where(finite, x, 0.0)).sum(axis=0)
    den = w.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


# ---------------------------------------------------------------------------------------- attribution
def attribution_shares(ev: Evidence) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample attribution shares a_{m,i} = mass_{m,i} / sum_k mass_{k,i}.

    Returns (shares [n_kept, M], kept [n_a] bool): rows whose total mass is zero or not finite are
    dropped, since they carry no information about how attribution splits.
    """
    ev.require("attribution")
    assert ev.attribution is not None
    mass = ev.attribution.detach().double().abs().cpu().numpy()
    if mass.ndim != 2 or mass.shape[1] != ev.n_modalities:
        raise EvidenceError(
            f"Attribution evidence has shape {tuple(mass.shape)}; expected [samples, {ev.n_modalities}] "
            "(one column per modality)."
        )
    total = mass.sum(axis=1)
    kept = np.isfinite(total) & (total > 0)
    shares = mass[kept] / total[kept, None]
    return shares, kept


# ---------------------------------------------------------------------------------------- rankings
def ranking(values: Mapping[str, float], order: Sequence[str]) -> list[str]:
    """Modalities from largest to smallest value (ties keep the modality order)."""
    pos = {m: j for j, m in enumerate(order)}
    return sorted(order, key=lambda m: (-float(values[m]), pos[m]))


def contradictions(values: Mapping[str, Mapping[str, float]], order: Sequence[str]) -> list[tuple[str, str, str, str]]:
    """Pairs of modalities that two methods order oppositely (ties contradict nothing).

    Returns (method_a, method_b, m_i, m_j) where method_a says m_i > m_j and method_b says m_j > m_i.
    """
    methods = list(values)
    out = []
    for a_idx, a in enumerate(methods):
        for b in methods[a_idx + 1:]:
            for i, mi in enumerate(order):
                for mj in order[i + 1:]:
                    da = float(values[a][mi]) - float(values[a][mj])
                    db = float(values[b][mi]) - float(values[b][mj])
                    if da * db < 0:
                        out.append((a, b, mi, mj) if da > 0 else (a, b, mj, mi))
    return out


def separated(ci: Mapping[str, Sequence[float | None]] | None, hi: str, lo: str) -> bool:
    """Whether the interval of ``hi`` lies wholly above that of ``lo`` (False when unknown)."""
    a, b = interval((ci or {}).get(hi)), interval((ci or {}).get(lo))
    return a is not None and b is not None and a[0] > b[1]
