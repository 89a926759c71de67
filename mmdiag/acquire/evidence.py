"""Per-sample evidence of a pool, as pure functions of its subset logits: EFDA difficulty and
BMMAL's per-sample modality contributions.

Symbols follow methods.md: M modalities, K classes, z_S the logits with only the modalities of
subset S present (the others masked as the adapter masks), p_S = softmax(z_S), ŷ = argmax p_full.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import softmax

from mmdiag.diagnostics.evidential import fuse, opinion
from mmdiag.stats import shapley_matrix


@dataclass(frozen=True)
class Difficulty:
    """EFDA difficulty of every pool row (methods.md §10 and §17.6; mmdiag's definition).

    Attributes:
        u: [N, M] Dirichlet uncertainty u_m = K / S_m of modality m's readout z_m (evidence
            e_m = softplus(z_m), alpha_m = e_m + 1, S_m = sum_k alpha_m,k), as the ``evidential``
            diagnostic defines it.
        u_fused: [N] uncertainty of the Dempster-Shafer combination of the M opinions.
        conflict: [N] 1 - prod over the folding steps of (1 - C), C = sum_{i != j} b1_i b2_j.
        fused: [N] the sample's difficulty d = u_fused + conflict (in [0, 2]).
    """

    u: np.ndarray
    u_fused: np.ndarray
    conflict: np.ndarray

    @property
    def fused(self) -> np.ndarray:
        return self.u_fused + self.conflict


def difficulty(singleton_logits: list[np.ndarray], evidence_fn: str = "softplus") -> Difficulty:
    """:class:`Difficulty` from each modality's m-only logits ([N, K] each, in modality order)."""
    beliefs, uncerts = [], []
    for z in singleton_logits:
        b, u = opinion(np.asarray(z, dtype=np.float64), evidence_fn)
        beliefs.append(b)
        uncerts.append(u)
    _, u_fused, conflict = fuse(beliefs, uncerts)
    return Difficulty(np.stack(uncerts, axis=1), u_fused, conflict)


def contributions(subset_logits: np.ndarray) -> np.ndarray:
    """[N, M] per-sample contribution shares c_m = |Δ_m| / sum_j |Δ_j| (BMMAL, methods.md §17.6).

    Δ_m is the exact Shapley value of modality m for the coalition value v(S) = p_S[ŷ], the
    probability the model gives its own fused prediction ŷ with only S present (v(∅): all masked).
    For M = 2 this is BMMAL's Δ_1 = ½[(p(m1,m2) − p(0,m2)) + (p(m1,0) − p(0,0))]. The label is
    never used. A row whose Δ are all 0 gets equal shares 1/M.

    Args:
        subset_logits: [2^M, N, K] logits of every subset, indexed by bit mask (bit j = modality j).
    """
    z = np.asarray(subset_logits, dtype=np.float64)
    n_modalities = int(round(np.log2(z.shape[0])))
    probs = softmax(z, axis=-1)
    pred = probs[-1].argmax(axis=1)
    values = probs[:, np.arange(z.shape[1]), pred]  # [2^M, N]: v(S) per row
    delta = np.abs(shapley_matrix(n_modalities) @ values).T  # [N, M]
    total = delta.sum(axis=1, keepdims=True)
    even = np.full_like(delta, 1.0 / n_modalities)
    return np.where(total > 0, delta / np.where(total > 0, total, 1.0), even)


def bmmal_scales(shares: np.ndarray) -> np.ndarray:
    """[N, M] BMMAL's embedding scales: s = 1 for each row's dominant modality (largest share, ties
    to the first), s_m = 1 − (c_dom − c_m) for the others (methods.md §17.6, read in BMMAL's code)."""
    dom = shares.max(axis=1, keepdims=True)
    return 1.0 - (dom - shares)
