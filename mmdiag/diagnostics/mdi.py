"""mdi: Modality Dominance Index, feature entropy combined with gradient contribution (proposed)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from mmdiag.diagnostics._shares import sum_share_rows
from mmdiag.diagnostics.base import Diagnostic, register_diagnostic
from mmdiag.errors import ConfigError, EvidenceError
from mmdiag.evidence import Evidence
from mmdiag.report import Result
from mmdiag.stats import bootstrap_mean_draws, bootstrap_rows, modality_intervals, percentile_interval

#: shares are floored at this value inside the log ratio, so a modality that contributes nothing
#: gives a large finite headline (about 13.8) instead of an infinite one.
SHARE_FLOOR = 1e-6


def _spectrum_entropy(eigenvalues: np.ndarray, rank: int) -> tuple[float, np.ndarray, np.ndarray, float]:
    """(H, q, log q, sum lambda) of a scatter's eigenvalues (clipped at 0), H = -sum q log q / log rank.

    log q is 0 where q is 0 (those terms contribute nothing). A zero or non-finite spectrum gives
    H = 0 and a sum of 0.
    """
    lam = np.clip(eigenvalues, 0.0, None)
    total = float(lam.sum())
    if not np.isfinite(total) or total <= 0.0:
        zeros = np.zeros_like(lam)
        return 0.0, zeros, zeros, 0.0
    q = lam / total
    log_q = np.log(np.where(q > 0, q, 1.0))
    return float(-(q * log_q).sum() / math.log(rank)), q, log_q, total


def spectral_entropy(x: np.ndarray) -> float:
    """Normalised spectral entropy of the rows of ``x`` [n, d] (centred over the rows).

    q_j = lambda_j / sum lambda, lambda_j the eigenvalues of the centred Gram matrix (squared
    singular values); H = -sum q_j log q_j / log(min(n, d)). 0 when the centred matrix is zero
    (a constant modality carries no information) or when min(n, d) < 2.
    """
    x = np.asarray(x, dtype=np.float64).reshape(x.shape[0], -1)
    n, d = x.shape
    if min(n, d) < 2:
        return 0.0
    mean = x.mean(axis=0)
    if d <= n:  # the d x d scatter without a centred copy of x (it is called once per resample)
        gram = x.T @ x - n * np.outer(mean, mean)
    else:
        xc = x - mean
        gram = xc @ xc.T
    return _spectrum_entropy(np.linalg.eigvalsh(gram), min(n, d))[0]


def entropy_influence(x: np.ndarray) -> tuple[float, np.ndarray]:
    """(H, l): the spectral entropy of :func:`spectral_entropy` and its row influences [n].

    l_i = dH/dw_i at w = 1, where row i of ``x`` is given weight w_i in the centred scatter
    S(w) = sum_i w_i (x_i - mu_w)(x_i - mu_w)^T. With S = V diag(lambda) V^T, the entropy is a
    spectral function of S, so dH/dS = V diag(g) V^T with
    g_j = (-log q_j - H log r) / (sum(lambda) log r) (r = min(n, d); g_j = 0 where lambda_j = 0), and
    the mean's own derivative vanishes at w = 1, so l_i = sum_j g_j <v_j, x_i - mu>^2. The l_i sum
    to 0 (H does not change when every weight is scaled alike). A bootstrap resample that draws
    row i c_i times then has H(c) = H + sum_i (c_i - 1) l_i + O(|c - 1|^2).
    """
    x = np.asarray(x, dtype=np.float64).reshape(x.shape[0], -1)
    n, d = x.shape
    if min(n, d) < 2:
        return 0.0, np.zeros(n)
    xc = x - x.mean(axis=0)
    if d <= n:
        lam, vecs = np.linalg.eigh(xc.T @ xc)
        proj2 = (xc @ vecs) ** 2  # squared coordinates of each centred row on each eigenvector
    else:  # the n x n Gram matrix: the coordinate of row i on v_j is u_ij sqrt(lambda_j)
        lam, vecs = np.linalg.eigh(xc @ xc.T)
        proj2 = vecs ** 2 * np.clip(lam, 0.0, None)
    h, q, log_q, total = _spectrum_entropy(lam, min(n, d))
    if total == 0.0:
        return 0.0, np.zeros(n)
    log_r = math.log(min(n, d))
    g = np.where(q > 0, (-log_q - h * log_r) / (total * log_r), 0.0)
    return h, proj2 @ g


def combine(g_share: np.ndarray, h_share: np.ndarray, lam: float) -> np.ndarray:
    """MDI_m = g_m^lam * h_m^(1 - lam), renormalised over the last axis (uniform if all zero)."""
    raw = np.power(g_share, lam) * np.power(h_share, 1.0 - lam)
    return sum_share_rows(raw)


def log_ratio(mdi: np.ndarray) -> np.ndarray:
    """Headline over the last axis: log(MDI_1 / MDI_2) for two modalities, log(max / min) beyond."""
    floored = np.maximum(mdi, SHARE_FLOOR)
    if mdi.shape[-1] == 2:
        return np.log(floored[..., 0] / floored[..., 1])
    return np.log(floored.max(axis=-1) / floored.min(axis=-1))


@register_diagnostic
@dataclass(frozen=True)
class MDI(Diagnostic):
    """Modality Dominance Index (MDACL, Liu et al. 2026): gradient contribution x feature entropy.

    mmdiag's definition: the MDACL paper gives only its abstract ("MDI ... jointly modeling feature
    entropy and gradient contribution"), so this operationalisation is mmdiag's own (methods.md §17.1,
    PROPOSED), not the authors' formula.

    Definition, for modalities m = 1..M:

    - Feature entropy H_m: centre the pooled features h_m [n, d_m] over the n rows, take the
      eigenvalues lambda_j of their Gram matrix (squared singular values), q_j = lambda_j / sum
      lambda, H_m = -sum_j q_j log q_j / log(min(n, d_m)) in [0, 1] (log effective rank over log
      maximal rank). A constant modality (all rows equal, e.g. all-zero features) has H_m = 0.
    - Gradient contribution G_m = mean_i |<dT_i/dh_{m,i}, h_{m,i}>|, the first-order (Taylor,
      gradient x activation) contribution of the modality's fusion input h_m to a target T, and
      Gh_m = G_m / sum_k G_k. ``target="margin"`` (default): T_i = z_{i,y_i} - mean_k z_{i,k}, the
      centred true-class logit of the fused head. ``target="loss"``: T_i = the fused cross-entropy,
      the literal reading of the proposal. mmdiag defaults to the margin because the loss gradient
      vanishes on confidently correct samples, so G then measures only the few misclassified ones
      and is heavy-tailed: on the dominance toy (seeds 0-2) the margin gives the carrying modality
      0.84-0.88 of G against 0.54-0.64 for the loss, and it still ranks the carrier first at M = 3
      and 5, where the loss does not. For a linear concat head the margin's G_m is exactly the mean
      size of modality m's centred logit contribution |(W_m h_m)_y - mean_k (W_m h_m)_k|.
    - MDI_m = Gh_m^lam * (H_m / sum_k H_k)^(1 - lam), renormalised to sum 1 (lam = 0.5). Shares
      whose total is 0 become uniform 1/M.
    - Headline: for M = 2, log(MDI_1 / MDI_2) (0 = balanced, > 0 the first modality dominates,
      signed). Generalisation to M > 2: log(max_m MDI_m / min_m MDI_m) (>= 0, unsigned), which for
      M = 2 equals the absolute value of the two-modality headline. Shares are floored at 1e-6
      inside the log so the headline stays finite.
    - ``dominance_flag``: |headline| > log(threshold) (threshold 1.5, so |MDI| > 0.405).
      ``dominant`` is the modality with the largest MDI when flagged, else None.

    Intervals: the gradient part is bootstrapped over the rows of the gradient subsample
    (``bootstrap`` resamples), the entropy part over the rows of the feature subsample (resampled
    independently). ``entropy_interval="linear"`` (default): every one of the ``bootstrap``
    resamples gets the first-order entropy H + sum_i (c_i - 1) l_i of :func:`entropy_influence`
    (one eigen-decomposition per modality in all; draws clipped to [0, 1]). ``"exact"``: the entropy
    of each resample is recomputed, for at most ``entropy_bootstrap`` resamples (one
    eigen-decomposition each), reused cyclically against the gradient draws; repeated rows lower the
    effective rank, so those draws are biased low (by about 0.004 at n = 1000, d = 32, and 0.02 at
    n = 200). ``entropy_interval="none"`` holds H at its estimate.

    Cost: 1 forward + 1 backward per gradient-subsample row (evidence ``grad_x_act``), the pooled
    features of the feature subsample, one eigen-decomposition per modality of an at most
    2000-square matrix (O(n d min(n, d))) and a [bootstrap, n] x [n, M] product ("linear"), or
    (1 + entropy_bootstrap) eigen-decompositions per modality ("exact").

    Source: MDACL (Liu et al., arXiv 2601.00598), abstract only; no code published. The gradient x
    activation measure is captum's LayerGradientXActivation summed over the feature.
    """

    TARGETS = ("margin", "loss")
    ENTROPY_INTERVALS = ("linear", "exact", "none")

    name = "mdi"
    summary = "Modality Dominance Index: gradient share x feature-entropy share (log ratio; 0 = balanced)"
    needs = frozenset({"features", "grad_x_act"})
    higher_is_better = None
    contribution = True
    shareable = True
    headline = "log-ratio"
    scale = "share of the Modality Dominance Index (sums to 1)"
    higher_means = "the modality carries more of the fused head's gradient and has the richer feature spectrum"
    how_to_read = (
        "MDI_m is modality m's share of \"dominance\"; 1/M each is balanced. A flagged headline means "
        "one modality's index is more than ``threshold`` times another's. The details show which "
        "factor drives it: the gradient share (how much of the fused head's first-order true-class "
        "margin flows through m) or the entropy share (how spread out m's feature spectrum is). The "
        "two can disagree: a dominant modality whose features collapse onto a few class directions has "
        "a large gradient share but a *low* spectral entropy, which pulls its MDI back toward 1/M. "
        "``param_grad_share`` (the share of each encoder's parameter-gradient norm, MDACL's "
        "alternative gradient measure) is shown when that evidence was collected."
    )
    argues_for = ("feature_dominance",)

    lam: float = 0.5
    threshold: float = 1.5
    entropy_interval: str = "linear"
    entropy_bootstrap: int = 100
    target: str = "margin"

    def __post_init__(self) -> None:
        if not 0.0 <= self.lam <= 1.0:
            raise ConfigError(f"mdi: lam must lie in [0, 1]; found {self.lam}.")
        if self.threshold < 1.0:
            raise ConfigError(f"mdi: threshold is a ratio and must be >= 1; found {self.threshold}.")
        if self.target not in self.TARGETS:
            raise ConfigError(f"mdi: target must be one of {', '.join(self.TARGETS)}; found {self.target!r}.")
        if self.entropy_interval not in self.ENTROPY_INTERVALS:
            raise ConfigError(f"mdi: entropy_interval must be one of {', '.join(self.ENTROPY_INTERVALS)}; "
                              f"found {self.entropy_interval!r}.")
        if self.entropy_bootstrap < 0:
            raise ConfigError(f"mdi: entropy_bootstrap must be >= 0; found {self.entropy_bootstrap}.")

    def entropy_resamples(self, n_rows: int) -> int:
        """How many resampled entropies the interval draws (0: H is held at its estimate)."""
        if self.bootstrap <= 0 or n_rows == 0 or self.entropy_interval == "none":
            return 0
        if self.entropy_interval == "linear":
            return int(self.bootstrap)
        return int(min(self.bootstrap, self.entropy_bootstrap))

    def compute(self, ev: Evidence, prior: Mapping[str, Result] | None = None) -> Result:
        ev.require(*sorted(self.needs))
        assert ev.features is not None and ev.grad_x_act is not None
        mods = ev.modalities
        missing = [m for m in mods if m not in ev.features]
        if missing:
            raise EvidenceError(f"mdi: no pooled features for {', '.join(missing)}.")
        feats = [ev.features[m].detach().double().reshape(ev.features[m].shape[0], -1).numpy() for m in mods]
        per_sample = ev.grad_x_act if self.target == "margin" else ev.grad_x_loss
        if per_sample is None:
            raise EvidenceError(f"mdi: no gradient x activation of the {self.target} in the evidence "
                                "(collected by an older mmdiag?); collect it again or use target='margin'.")
        gxa = per_sample.detach().double().numpy()
        if gxa.ndim != 2 or gxa.shape[1] != len(mods) or gxa.shape[0] == 0:
            raise EvidenceError(f"mdi: grad_x_act must be [n > 0, {len(mods)}]; found {list(gxa.shape)}.")
        n_f = feats[0].shape[0]

        linear = self.bootstrap > 0 and self.entropy_interval == "linear" and n_f > 0
        if linear:
            pairs = [entropy_influence(f) for f in feats]
            entropy = np.array([h for h, _ in pairs])
            influence = np.stack([l for _, l in pairs], axis=1)  # [n_f, M]
        else:
            entropy = np.array([spectral_entropy(f) for f in feats])
        grad = gxa.mean(axis=0)
        g_share, h_share = sum_share_rows(grad), sum_share_rows(entropy)
        mdi = combine(g_share, h_share, self.lam)
        head = float(log_ratio(mdi))
        flag = bool(abs(head) > math.log(self.threshold))
        largest = mods[int(np.argmax(mdi))]

        per_mod_ci: dict[str, list[float]] = {}
        value_ci = None
        if self.bootstrap > 0:
            # The feature rows are usually every evaluated row: resampled with ``seed`` they get the
            # resamples (and the cached counts) every other diagnostic uses. The gradient subsample
            # gets a stream of its own, so the two parts are resampled independently.
            g_draws = sum_share_rows(bootstrap_mean_draws(gxa, self.bootstrap, self.seed + 1))
            n_h = self.entropy_resamples(n_f)
            if linear:
                # first order in the resample counts c: H + sum_i (c_i - 1) l_i = H + n (mean_c(l) - mean(l))
                shift = n_f * (bootstrap_mean_draws(influence, self.bootstrap, self.seed) - influence.mean(axis=0))
                h_draws = sum_share_rows(np.clip(entropy + shift, 0.0, 1.0))
            elif n_h > 0:
                h_draws = np.array([[spectral_entropy(f[row]) for f in feats]
                                    for row in bootstrap_rows(n_f, n_h, self.seed)])
                h_draws = sum_share_rows(h_draws)[np.arange(self.bootstrap) % n_h]
            else:
                h_draws = np.broadcast_to(h_share, g_draws.shape)
            mdi_draws = combine(g_draws, h_draws, self.lam)
            per_mod_ci = modality_intervals(mods, percentile_interval(mdi_draws, self.level, finite=True))
            value_ci = percentile_interval(log_ratio(mdi_draws), self.level, finite=True).tolist()

        details: dict = {
            "entropy": {m: float(entropy[j]) for j, m in enumerate(mods)},
            "entropy_share": {m: float(h_share[j]) for j, m in enumerate(mods)},
            "gradient": {m: float(grad[j]) for j, m in enumerate(mods)},
            "gradient_share": {m: float(g_share[j]) for j, m in enumerate(mods)},
            "dominance_flag": flag,
            "dominant": largest if flag else None,
            "largest": largest,
            "flag_at": math.log(self.threshold),
            "headline": "log(MDI_1 / MDI_2)" if len(mods) == 2 else "log(max MDI / min MDI)",
            "n_feature_rows": int(n_f),
            "n_grad_rows": int(gxa.shape[0]),
            "target": self.target,
            "entropy_interval": self.entropy_interval if self.bootstrap > 0 else "none",
            "entropy_resamples": self.entropy_resamples(n_f),
        }
        if ev.param_grad_norm is not None and ev.param_grad_norm.numel() == len(mods):
            pgn = sum_share_rows(ev.param_grad_norm.detach().double().numpy())
            details["param_grad_share"] = {m: float(pgn[j]) for j, m in enumerate(mods)}
        return self.result(
            head,
            {m: float(mdi[j]) for j, m in enumerate(mods)},
            ci=per_mod_ci,
            value_ci=value_ci,
            details=details,
        )
