"""AMCB: the adaptive modality-weight policy of RL-MBA, as mmdiag defines it (PROPOSED).

RL-MBA's paper text is not available (abstract only), so everything here is mmdiag's design
(methods.md §17.6). The action is a weight vector w on the simplex over the M modalities; it sets
how much each modality's evidential difficulty and gradient embedding count in the selection.

Policy (a Gaussian policy on the softmax logits, REINFORCE):
    μ = θ + γ·(1/M − share)          share: the pool's Shapley contribution shares (the state)
    x = μ + σ·ξ,  ξ ~ N(0, I_M)       (drawn from the round's seeded generator)
    w = softmax(x)
so a modality that contributes less than its fair share 1/M gets more weight before any learning,
and θ learns, from the rewards, how much to move away from that prior.

Reward of a round (after labelling, retraining and evaluating):
    r = (acc_t − acc_{t−1}) + ρ·(min_m uni_t,m − min_m uni_{t−1},m)
the gain of fused accuracy plus ρ times the gain of the weakest modality's unimodal accuracy.

Update (REINFORCE with a running-mean baseline; ∇_θ log N(x; μ, σ²I) = (x − μ)/σ² = ξ/σ):
    θ ← θ + η·(r − b)·ξ/σ,   then b ← b + (r − b)/n   (b = mean of the n rewards so far; b = 0 before)
Defaults: η = 0.5, σ = 0.5, γ = 2, ρ = 1 (η, ρ from methods.md §17.6; σ and γ mmdiag's choice).

The state (θ, b, n, the last action's ξ and the last evaluation) is JSON (``policy.json``), so real
labelling rounds continue from it. The state vector of each round (shares, mean difficulty, mean
conflict, diversity of the selection) is recorded in the history; only the shares enter μ (with
a handful of rounds there is no data to fit more parameters).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping, Sequence

import numpy as np
from scipy.special import softmax

from mmdiag.errors import ConfigError

VERSION = 1


@dataclass(frozen=True)
class PolicySettings:
    """η (step), σ (exploration), γ (pull toward under-contributing modalities), ρ (balance reward)."""

    eta: float = 0.5
    sigma: float = 0.5
    gamma: float = 2.0
    rho: float = 1.0

    def __post_init__(self) -> None:
        for name in ("eta", "sigma", "gamma", "rho"):
            value = float(getattr(self, name))
            if not math.isfinite(value) or value < 0 or (name == "sigma" and value == 0):
                raise ConfigError(f"`{name}` of the acquisition policy must be a finite number "
                                  f"{'above' if name == 'sigma' else 'at least'} 0; found {value}.")


@dataclass(frozen=True)
class PolicyState:
    """Everything the next round needs. ``last`` = (ξ of the last action, or None); ``evaluation`` =
    the fused and unimodal accuracies the last reward was measured against."""

    modalities: tuple[str, ...]
    theta: tuple[float, ...]
    baseline: float = 0.0
    n_rewards: int = 0
    last_noise: tuple[float, ...] | None = None
    evaluation: Mapping[str, Any] | None = None
    settings: PolicySettings = field(default_factory=PolicySettings)
    history: tuple[Mapping[str, Any], ...] = ()


def new_state(modalities: Sequence[str], settings: PolicySettings | None = None) -> PolicyState:
    """θ = 0: before any reward, μ is the share-driven prior alone."""
    return PolicyState(tuple(modalities), (0.0,) * len(modalities), settings=settings or PolicySettings())


def act(state: PolicyState, shares: Sequence[float], rng: np.random.Generator) -> tuple[np.ndarray, PolicyState]:
    """(weights w, state with this action's ξ kept for the next update); see the module docstring."""
    s = state.settings
    m_count = len(state.modalities)
    mu = np.asarray(state.theta) + s.gamma * (1.0 / m_count - np.asarray(shares, dtype=np.float64))
    noise = rng.standard_normal(m_count)
    return softmax(mu + s.sigma * noise), replace(state, last_noise=tuple(float(v) for v in noise))


def reward(before: Mapping[str, Any], after: Mapping[str, Any], rho: float) -> float:
    """r = Δ fused accuracy + ρ·Δ min_m unimodal accuracy, from two evaluations
    ``{"accuracy": a, "unimodal": {m: a_m}}``."""
    weakest = min(after["unimodal"].values()) - min(before["unimodal"].values())
    return float(after["accuracy"] - before["accuracy"] + rho * weakest)


def update(state: PolicyState, r: float) -> PolicyState:
    """One REINFORCE step for the last action: θ ← θ + η (r − b) ξ/σ, then b ← running mean."""
    if state.last_noise is None:
        raise ConfigError("The policy has no action to reward: `act` must run before `update`.")
    s = state.settings
    advantage = r - state.baseline
    theta = np.asarray(state.theta) + s.eta * advantage * np.asarray(state.last_noise) / s.sigma
    n = state.n_rewards + 1
    return replace(state, theta=tuple(float(v) for v in theta), baseline=state.baseline + (r - state.baseline) / n,
                   n_rewards=n, last_noise=None)


def observe(state: PolicyState, evaluation: Mapping[str, Any]) -> tuple[PolicyState, float | None]:
    """Take a new evaluation: reward and update the last action (if there is one and an earlier
    evaluation to compare with), and keep the evaluation for the next round. Returns (state, reward)."""
    r = None
    if state.last_noise is not None and state.evaluation is not None:
        r = reward(state.evaluation, evaluation, state.settings.rho)
        state = update(state, r)
    return replace(state, evaluation=dict(evaluation)), r


def record(state: PolicyState, entry: Mapping[str, Any]) -> PolicyState:
    """The state with one more history entry (a round's weights, state vector and reward)."""
    return replace(state, history=state.history + (dict(entry),))


def to_json(state: PolicyState) -> str:
    data = asdict(state)
    data["version"] = VERSION
    return json.dumps(data, indent=2) + "\n"


def from_json(text: str, source: str = "the policy file") -> PolicyState:
    """The state saved by :func:`to_json`; a ConfigError names what is wrong."""
    try:
        data = json.loads(text)
        if data.pop("version", None) != VERSION:
            raise ValueError(f"expected version {VERSION}")
        settings = PolicySettings(**data.pop("settings"))
        noise = data.pop("last_noise")
        state = PolicyState(modalities=tuple(data.pop("modalities")), theta=tuple(map(float, data.pop("theta"))),
                            last_noise=None if noise is None else tuple(map(float, noise)),
                            history=tuple(data.pop("history")), settings=settings, **data)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ConfigError(f"{source} is not an mmdiag acquisition policy ({exc}); expected the "
                          "policy.json an earlier `mmdiag acquire` run wrote.") from exc
    if len(state.theta) != len(state.modalities):
        raise ConfigError(f"{source} has {len(state.theta)} weights for {len(state.modalities)} modalities.")
    return state
