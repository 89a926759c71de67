"""Rank a pool: one pass, the pool's scores, one strategy (and for rlmba the AMCB policy step)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from mmdiag.acquire import policy as amcb
from mmdiag.acquire.diversity import spread
from mmdiag.acquire.pool import PoolPass, ProgressFn, pool_pass
from mmdiag.acquire.strategies import Choice, PoolScores, concat_embeddings, get_strategy, pool_scores
from mmdiag.adapter import ModelAdapter
from mmdiag.errors import ConfigError

#: κ, the weight of the fused difficulty (u_fused + conflict) in rlmba's score (methods.md §17.6)
KAPPA = 1.0


@dataclass
class Selection:
    """The chosen pool rows and why.

    Attributes:
        indices: pool row indices in rank order; rows: one dict per chosen row (selection.csv);
        report: JSON-safe summary (strategy, embedding method, shares, weights, target modality and
        the reason); policy: the AMCB state after this round (rlmba) or None; warnings: changes of
        method with their causes.
    """

    indices: np.ndarray
    rows: list[dict[str, Any]]
    report: dict[str, Any]
    policy: amcb.PolicyState | None = None
    warnings: list[str] = field(default_factory=list)


def choose(scores: PoolScores, budget: int, strategy: str, seed: int, state: amcb.PolicyState | None = None,
           kappa: float = KAPPA) -> tuple[Choice, amcb.PolicyState | None]:
    """Run ``strategy`` on the scores (rlmba: act with the policy first). Pure given the seed."""
    fn = get_strategy(strategy)
    n = len(scores.probs)
    if not 1 <= budget <= n:
        raise ConfigError(f"`budget` must be between 1 and the pool size {n}; found {budget}.")
    # a policy continued over real rounds draws fresh numbers each round even with the same seed
    rng = np.random.default_rng([seed, len(state.history)] if state is not None else seed)
    m_count = len(scores.modalities)
    weights = np.full(m_count, 1.0 / m_count)
    if strategy == "rlmba":
        state = state or amcb.new_state(scores.modalities)
        if tuple(state.modalities) != tuple(scores.modalities):
            raise ConfigError(f"The policy was built for modalities {', '.join(state.modalities)}; this pool has "
                              f"{', '.join(scores.modalities)}. Start a new policy (no `policy`).")
        weights, state = amcb.act(state, scores.pool_shares, rng)
    return fn(scores, budget, weights, rng, kappa), state if strategy == "rlmba" else None


def selection_rows(scores: PoolScores, choice: Choice, strategy: str) -> list[dict[str, Any]]:
    """One dict per chosen row: pool index, rank, score and its parts (selection.csv)."""
    d = scores.difficulty
    rows = []
    for rank, i in enumerate(choice.order):
        row: dict[str, Any] = {"pool_index": int(i), "rank": rank + 1, "strategy": strategy,
                               "score": float(choice.score[rank]), "diversity": float(choice.diversity[rank]),
                               "difficulty": float(d.fused[i]), "u_fused": float(d.u_fused[i]),
                               "conflict": float(d.conflict[i])}
        for j, m in enumerate(scores.modalities):
            row[f"u.{m}"] = float(d.u[i, j])
        for j, m in enumerate(scores.modalities):
            row[f"weight.{m}"] = float(choice.weights[rank, j])
        for j, m in enumerate(scores.modalities):
            row[f"share.{m}"] = float(scores.shares[i, j])
        rows.append(row)
    return rows


def summarise(scores: PoolScores, choice: Choice, strategy: str) -> dict[str, Any]:
    """Which modality the selection is meant to strengthen, and the numbers behind it."""
    mods = scores.modalities
    shares = scores.pool_shares
    u_pool = scores.difficulty.u.mean(axis=0)
    u_sel = scores.difficulty.u[choice.order].mean(axis=0)
    lift = u_sel - u_pool
    out: dict[str, Any] = {
        "strategy": strategy, "budget": int(len(choice.order)), "pool_size": int(len(scores.probs)),
        "pool_shares": dict(zip(mods, map(float, shares))),
        "mean_u_pool": dict(zip(mods, map(float, u_pool))), "mean_u_selected": dict(zip(mods, map(float, u_sel))),
        "mean_difficulty_pool": float(scores.difficulty.fused.mean()),
        "mean_difficulty_selected": float(scores.difficulty.fused[choice.order].mean()),
        "diversity": spread(concat_embeddings(scores.embeddings, np.ones(len(mods))), choice.order),
    }
    hardest = mods[int(np.argmax(lift))]
    if strategy == "rlmba":
        w = choice.weights[0]
        target = mods[int(np.argmax(w))]
        j = mods.index(target)
        out["weights"] = dict(zip(mods, map(float, w)))
        out["target"] = target
        out["why"] = (f"AMCB gives {target} the largest weight ({w[j]:.2f}): its share of the pool's "
                      f"contributions is {shares[j]:.2f} (an even share is {1 / len(mods):.2f}), so the "
                      f"selection favours rows where {target}'s readout is uncertain (mean u_{target} "
                      f"{u_sel[j]:.3f} on the selection vs {u_pool[j]:.3f} on the pool).")
    else:
        out["target"] = None
        out["why"] = (f"{strategy} does not target a modality; the modality whose readout is most uncertain "
                      f"on the selection relative to the pool is {hardest} (mean u {u_sel[mods.index(hardest)]:.3f} "
                      f"vs {u_pool[mods.index(hardest)]:.3f}).")
    return out


def rank_pool(adapter: ModelAdapter, pool: Any, budget: int, *, strategy: str = "rlmba",
              policy: amcb.PolicyState | None = None, evaluation: Mapping[str, Any] | None = None,
              seed: int = 0, kappa: float = KAPPA, batch_size: int = 256, device: str = "auto",
              progress: ProgressFn | None = None, passed: PoolPass | None = None) -> Selection:
    """Choose ``budget`` rows of ``pool`` to label with ``strategy``; the pool's labels are never read.

    Args:
        adapter: drives the current model.
        pool: modality arrays (mapping or dataset); a ``label`` entry is ignored.
        policy: the AMCB state of the previous round (rlmba); None starts a new one.
        evaluation: the current model's ``{"accuracy": a, "unimodal": {m: a_m}}`` on labelled
            data; with a policy that acted before, it rewards and updates that action first.
        passed: a pool pass already made (skips the model run).
    """
    get_strategy(strategy)
    passed = passed or pool_pass(adapter, pool, batch_size=batch_size, device=device, seed=seed, progress=progress)
    scores = pool_scores(passed)
    reward = None
    if strategy == "rlmba" and policy is not None and evaluation is not None:
        policy, reward = amcb.observe(policy, evaluation)
    elif strategy == "rlmba" and evaluation is not None:
        policy, _ = amcb.observe(amcb.new_state(scores.modalities), evaluation)
    choice, state = choose(scores, budget, strategy, seed, policy, kappa)
    report = summarise(scores, choice, strategy)
    report["embedding"] = passed.method
    if state is not None:
        report["reward"] = reward
        state = amcb.record(state, {"weights": report["weights"], "shares": report["pool_shares"],
                                    "mean_difficulty": report["mean_difficulty_selected"],
                                    "mean_conflict": float(scores.difficulty.conflict[choice.order].mean()),
                                    "diversity": report["diversity"], "reward": reward,
                                    "theta": list(state.theta)})
    return Selection(choice.order.copy(), selection_rows(scores, choice, strategy), report, state,
                     list(passed.warnings))
