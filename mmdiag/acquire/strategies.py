"""The acquisition strategies behind one small registry: rlmba, bmmal, badge, entropy, random.

Each is a pure function of the pool's scores (:class:`PoolScores`, built from one pool pass: no
label is ever part of it), the budget B, the modality weights (used by rlmba) and a seeded
generator; it returns a :class:`Choice`: the B chosen rows in rank order and the parts of their
scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from mmdiag.acquire.diversity import kmeanspp
from scipy.special import softmax
from scipy.stats import entropy

from mmdiag.acquire.evidence import Difficulty, bmmal_scales, contributions, difficulty
from mmdiag.acquire.pool import PoolPass
from mmdiag.errors import ConfigError
from mmdiag.registry import closest


@dataclass(frozen=True)
class PoolScores:
    """The label-free scores of every pool row.

    Attributes:
        probs: [N, K] fused softmax; difficulty: EFDA's u_m, fused u and conflict; shares: [N, M]
        per-sample Shapley contribution shares (BMMAL's c_m); embeddings: per modality [N, D_m].
    """

    modalities: tuple[str, ...]
    probs: np.ndarray
    difficulty: Difficulty
    shares: np.ndarray
    embeddings: list[np.ndarray]

    @property
    def pool_shares(self) -> np.ndarray:
        """[M] the pool's contribution shares: the mean over rows of c_m (they add up to 1)."""
        return self.shares.mean(axis=0)


def pool_scores(passed: PoolPass) -> PoolScores:
    """:class:`PoolScores` of a pool pass."""
    singles = [passed.singleton(j) for j in range(len(passed.modalities))]
    return PoolScores(passed.modalities, softmax(np.asarray(passed.logits, dtype=np.float64), axis=1), difficulty(singles),
                      contributions(passed.subsets), passed.embeddings)


@dataclass(frozen=True)
class Choice:
    """B chosen rows in rank order; per chosen row the score, the diversity term D² at pick
    (NaN where the strategy has none) and the modality weights [B, M] (NaN where it uses none)."""

    order: np.ndarray
    score: np.ndarray
    diversity: np.ndarray
    weights: np.ndarray


Strategy = Callable[[PoolScores, int, np.ndarray, np.random.Generator, float], Choice]
STRATEGIES: dict[str, Strategy] = {}


def register(name: str) -> Callable[[Strategy], Strategy]:
    def wrap(fn: Strategy) -> Strategy:
        STRATEGIES[name] = fn
        return fn
    return wrap


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        near = closest(name, list(STRATEGIES))
        raise ConfigError(f"Unknown acquisition strategy {name!r}; expected one of {', '.join(STRATEGIES)}."
                          + (f" Did you mean {near!r}?" if near else ""))
    return STRATEGIES[name]


def _top(score: np.ndarray, budget: int) -> np.ndarray:
    """The ``budget`` rows with the largest score, largest first (ties: lowest index first)."""
    return np.lexsort((np.arange(len(score)), -score))[:budget]


def _ranked(key: np.ndarray, budget: int, m_count: int) -> Choice:
    """The ``budget`` rows of largest ``key`` (the score), with no diversity term and no weights."""
    order = _top(key, budget)
    return Choice(order, key[order], np.full(len(order), np.nan), np.full((len(order), m_count), np.nan))


def concat_embeddings(embeddings: list[np.ndarray], scales: np.ndarray) -> np.ndarray:
    """[N, sum D_m] concatenation of s_m · g_m (scales [N, M] or [M])."""
    s = np.broadcast_to(scales, (embeddings[0].shape[0], len(embeddings)))
    return np.concatenate([g * s[:, [j]] for j, g in enumerate(embeddings)], axis=1)


@register("random")
def random_choice(scores: PoolScores, budget: int, weights: np.ndarray, rng: np.random.Generator,
                  kappa: float) -> Choice:
    """Uniform sampling without replacement: each row's score is a uniform draw; the B largest win."""
    return _ranked(rng.random(len(scores.probs)), budget, len(scores.modalities))


@register("entropy")
def entropy_choice(scores: PoolScores, budget: int, weights: np.ndarray, rng: np.random.Generator,
                   kappa: float) -> Choice:
    """Maximum entropy: the B rows with the largest H(p) = −sum_k p_k ln p_k of the fused softmax."""
    return _ranked(entropy(scores.probs, axis=1), budget, len(scores.modalities))


@register("badge")
def badge_choice(scores: PoolScores, budget: int, weights: np.ndarray, rng: np.random.Generator,
                 kappa: float) -> Choice:
    """BADGE: k-means++ seeding on the gradient embedding [g_1; …; g_M] (every modality weight 1)."""
    m_count = len(scores.modalities)
    seeding = kmeanspp(concat_embeddings(scores.embeddings, np.ones(m_count)), budget, rng)
    return Choice(seeding.order, seeding.d2, seeding.d2, np.ones((budget, m_count)))


@register("bmmal")
def bmmal_choice(scores: PoolScores, budget: int, weights: np.ndarray, rng: np.random.Generator,
                 kappa: float) -> Choice:
    """BMMAL: k-means++ seeding on [s_1 g_1; …; s_M g_M], s from each row's Shapley shares
    (:func:`~mmdiag.acquire.evidence.bmmal_scales`)."""
    scales = bmmal_scales(scores.shares)
    seeding = kmeanspp(concat_embeddings(scores.embeddings, scales), budget, rng)
    return Choice(seeding.order, seeding.d2, seeding.d2, scales[seeding.order])


def rlmba_difficulty(scores: PoolScores, weights: np.ndarray, kappa: float) -> np.ndarray:
    """[N] d(x) = sum_m w_m u_m(x) + κ (u_fused(x) + conflict(x)) (methods.md §17.6, PROPOSED)."""
    return scores.difficulty.u @ np.asarray(weights) + kappa * scores.difficulty.fused


@register("rlmba")
def rlmba_choice(scores: PoolScores, budget: int, weights: np.ndarray, rng: np.random.Generator,
                 kappa: float) -> Choice:
    """RL-MBA (mmdiag's PROPOSED form): difficulty-weighted k-means++ seeding.

    Rows are drawn with probability ∝ d(x)·D²(x) (:func:`rlmba_difficulty`) on the embedding
    [√(M w_1) g_1; …; √(M w_M) g_M], whose squared distances are sum_m M w_m ||Δg_m||² (equal
    weights give BADGE's distances). Score = d(x)·D²(x) at pick.
    """
    w = np.asarray(weights, dtype=np.float64)
    m_count = len(scores.modalities)
    d = rlmba_difficulty(scores, w, kappa)
    seeding = kmeanspp(concat_embeddings(scores.embeddings, np.sqrt(m_count * w)), budget, rng, weight=d)
    return Choice(seeding.order, d[seeding.order] * seeding.d2, seeding.d2, np.tile(w, (budget, 1)))
