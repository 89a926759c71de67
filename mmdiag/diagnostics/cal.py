"""cal: CAL contribution weight W^m from Shapley information quantity and unimodal confidence (proposed)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from mmdiag.diagnostics._common import only, shapley_per_sample, spread, subset_logprob
from mmdiag.diagnostics._shares import positive_share_rows, sum_share_rows
from mmdiag.diagnostics.base import Diagnostic, register_diagnostic
from mmdiag.errors import ConfigError
from mmdiag.evidence import Evidence, subset_name
from mmdiag.report import Result
from mmdiag.stats import bootstrap_mean_draws, modality_intervals, percentile_interval, shapley_matrix


def softmax_rows(x: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis."""
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


@register_diagnostic
@dataclass(frozen=True)
class CAL(Diagnostic):
    """CAL contribution weight W^m (Xu, Kou, Wu, Liu 2025): information quantity plus confidence.

    mmdiag's definition: CAL's paper is available as an abstract only ("W^m combining information
    quantity I(m) and confidence D(m)", "Shapley-inspired", "Softmax-based"), so the formula below
    is mmdiag's own operationalisation (methods.md §17.2, PROPOSED), not the authors'.

    Definition, for modalities m = 1..M and the subset logits of the evidence (others masked as
    the adapter masks: feature-level R2 or input-level R3):

    - Information quantity I(m): exact Shapley value of m with coalition value v(S) = mean_i
      log p_S(y_i | x_i), the mean true-class log-probability when only the modalities in S are
      present (v(empty) = everything masked). Ih(m) = max(I(m), 0) / sum_k max(I(k), 0), uniform
      1/M when no value is positive.
    - Confidence D(m) = mean_i p_m(y_i | x_i), the true-class probability of the m-only readout.
      Dh(m) = D(m) / sum_k D(k) (a share, so Ih and Dh live on the same [0, 1] scale summing to 1).
      CAL's optional "dynamic potential" needs a training history, which evidence from one
      checkpoint does not have, so Dh is used alone.
    - W^m = softmax_m(tau * [lam * Ih(m) + (1 - lam) * Dh(m)]), lam = 0.5, tau = 4.
    - Headline: the spread max_m W^m - min_m W^m (0 = every modality contributes alike).

    Works for any M >= 2 (exact Shapley over 2^M subsets; the softmax runs over all M). Intervals:
    every quantity is a function of column means of per-sample evidence (the 2^M subset
    log-probabilities and the M unimodal true-class probabilities), so rows are resampled
    ``bootstrap`` times and the whole chain is recomputed per draw (no model calls).

    Cost: 2^M - 1 fusion-head calls per sample with cached features (forward only).
    Source: CAL (Xu, Kou, Wu, Liu, arXiv 2510.26289), abstract only; no code published. Shapley
    coalition values as in BalanceMM's ``Calculate_Shapley``; softmax temperature as in ARL.
    """

    name = "cal"
    summary = "CAL contribution weight W^m = softmax(tau * (lam * Shapley share + (1 - lam) * confidence share))"
    needs = frozenset({"subsets"})
    higher_is_better = True
    contribution = True
    shareable = True
    headline = "spread"
    scale = "contribution weight W^m (a softmax: sums to 1)"
    higher_means = "the modality holds more of the Shapley log-likelihood gain and of the confidence"
    how_to_read = (
        "W^m is the weight CAL's fix would use to accelerate modality m's gradients by (1 + W^m) and "
        "to compress the others harder. Equal weights 1/M mean no modality stands out; with tau = 4 "
        "and M = 2 the largest possible spread is tanh(2) = 0.96 (one modality holds all of Ih and "
        "Dh). Because W is a softmax of shares, it is compressed: a spread of 0.3 already means one "
        "modality holds clearly more of both the Shapley log-likelihood gain and the confidence."
    )

    lam: float = 0.5
    tau: float = 4.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.lam <= 1.0:
            raise ConfigError(f"cal: lam must lie in [0, 1]; found {self.lam}.")
        if not np.isfinite(self.tau) or self.tau < 0:
            raise ConfigError(f"cal: tau must be a finite number >= 0; found {self.tau}.")

    def _chain(self, v: np.ndarray, d: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, ...]:
        """(I, Ih, Dh, W) from coalition values v [..., 2^M] and confidences d [..., M]."""
        phi = v @ a.T
        ih = positive_share_rows(phi)
        dh = sum_share_rows(d)
        w = softmax_rows(self.tau * (self.lam * ih + (1.0 - self.lam) * dh))
        return phi, ih, dh, w

    def compute(self, ev: Evidence, prior: Mapping[str, Result] | None = None) -> Result:
        mods = ev.modalities
        a = shapley_matrix(ev.n_modalities)
        logp = subset_logprob(ev)  # [2^M, N]
        prob_only = np.stack([np.exp(logp[only(ev, m)]) for m in mods], axis=1)  # [N, M]
        v = logp.mean(axis=1)
        d = prob_only.mean(axis=0)
        phi, ih, dh, w = self._chain(v, d, a)
        values = {m: float(w[j]) for j, m in enumerate(mods)}

        per_mod_ci: dict[str, list[float]] = {}
        value_ci = None
        if self.bootstrap > 0:
            cols = np.concatenate([logp.T, prob_only], axis=1)  # [N, 2^M + M]
            draws = bootstrap_mean_draws(cols, self.bootstrap, self.seed)
            n_sub = logp.shape[0]
            _, _, _, w_draws = self._chain(draws[:, :n_sub], draws[:, n_sub:], a)
            per_mod_ci = modality_intervals(mods, percentile_interval(w_draws, self.level, finite=True))
            spreads = w_draws.max(axis=1) - w_draws.min(axis=1)
            value_ci = percentile_interval(spreads, self.level, finite=True).tolist()

        per_sample_phi = shapley_per_sample(ev, logp)  # [N, M], mean = I
        return self.result(
            spread(values),
            values,
            ci=per_mod_ci,
            value_ci=value_ci,
            details={
                "I": {m: float(phi[j]) for j, m in enumerate(mods)},
                "I_share": {m: float(ih[j]) for j, m in enumerate(mods)},
                "D": {m: float(d[j]) for j, m in enumerate(mods)},
                "D_share": {m: float(dh[j]) for j, m in enumerate(mods)},
                "score": {m: float(self.lam * ih[j] + (1.0 - self.lam) * dh[j]) for j, m in enumerate(mods)},
                "coalition_logprob": {subset_name(s, mods): float(v[s]) for s in range(v.shape[0])},
                "uniform": 1.0 / len(mods),
            },
            per_sample={f"I_{m}": per_sample_phi[:, j].copy() for j, m in enumerate(mods)},
        )
