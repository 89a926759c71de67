"""udml: noise-aware uncertainty of each modality (UDML's estimator, fitted as a probe) and UDML's weights."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from mmdiag.diagnostics._common import only
from mmdiag.diagnostics._probes import (Standardiser, as_array, fit_noise_regressors, predict_noise, row_split,
                                        spearman)
from mmdiag.diagnostics.base import Diagnostic, register_diagnostic
from mmdiag.errors import EvidenceError
from mmdiag.evidence import Evidence
from mmdiag.report import Result
from mmdiag.stats import bootstrap_mean_draws, percentile_interval
from mmdiag.validation import Spec

#: Spearman value reported when it is undefined (constant predictions or features): no detectable
#: monotone relation between noise and the estimate.
UNDEFINED_SPEARMAN = 0.0


def udml_weights(sigma: np.ndarray, dep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """UDML's fusion weights for M modalities (methods.md §12, generalisation to M).

    t_m = (1 / sigma_m^2) / mean_k (1 / sigma_k^2)   (inverse-uncertainty weights, mean 1)
    w_m = (t_m / dep_m) / mean_k (t_k / dep_k)        (dependency-unbiased weights, mean 1)

    For M = 2 t_a = 2 sigma_v^2 / (sigma_a^2 + sigma_v^2), as in UDML's code. dep_m is floored at
    1e-12 * max_k dep_k so a modality whose m-only logits are all zero gets a large, finite weight.
    """
    inv = 1.0 / np.square(sigma)
    t = inv / inv.mean()
    floor = max(float(dep.max()), 1.0) * 1e-12
    raw = t / np.maximum(dep, floor)
    return t, raw / raw.mean()


@register_diagnostic
@dataclass(frozen=True)
class Udml(Diagnostic):
    """Noise-aware uncertainty: the noise level a probe reads off modality m's clean features.

    mmdiag's definition (PROPOSED adaptation of UDML, methods.md §12). UDML trains, inside the model,
    a small regressor per modality that predicts the level of Gaussian noise injected into that
    modality's input from its pooled feature, and uses the predicted level sigma_hat as the
    modality's uncertainty. A checkpoint that was not trained with UDML has no such regressor, so
    mmdiag fits one as a probe on the frozen encoder: the collected evidence holds, for every
    level l in ``noise_levels`` (1 = clean) and every row of the noise subsample, the pooled feature
    h_m^(l) of modality m's encoder with m's input corrupted by Gaussian noise of std
    noise_step * (l - 1) * data_std (methods.md P3, on mmdiag's linear noise scale).

    Per modality m: the noise rows are split (seeded, by row, ``test_fraction`` held out; all the
    levels of one row stay on the same side). On the training rows an MLP d_m -> ``hidden`` -> ReLU
    -> 1 read as sigma_hat = exp(0.5 o) (UDML's form) is fitted to the level l by full-batch Adam
    (``steps``, ``lr``, seeded; inputs standardised with training statistics; loss = squared error
    / var(l)). On the held-out rows:

    * sigma_m = mean_i sigma_hat(h_m,i^(1)): the predicted level on clean features. Headline per
      modality (lower = the encoder's clean features look cleaner; 1 is the clean level). Its
      interval resamples the held-out clean predictions (the probe is not refitted).
    * spearman[m]: Spearman correlation of predicted vs true level over held-out rows x levels;
      how well noise in m can be read from its features. When it is undefined (constant
      predictions, e.g. a constant modality) it is reported as 0.0 (no monotone relation) and the
      modality is listed in ``details["spearman_undefined"]``.
    * calibration[m]: per level, mean and std of the held-out predictions.
    * t_m = (1/sigma_m^2) / mean_k (1/sigma_k^2) (inverse-uncertainty weights), dep_m =
      sum_k mean_i |z_{m,i,k}| of the m-only logits (all rows, from ``subsets``), and UDML's
      unbiased weights w_m proportional to t_m / dep_m, normalised to mean 1 (see
      :func:`udml_weights`; for M = 2 exactly UDML's formulas).

    Headline value: the spread max_m sigma_m - min_m sigma_m (0 = every modality looks equally
    noisy). For any M >= 2 the estimator is per modality; only the weights couple modalities
    (through the means over k).

    Cost: the evidence costs L - 1 forwards of each modality's encoder per row of the noise
    subsample (the clean level is the main pass's; L levels, default 6, the odd levels of UDML's
    1..11; N/128 rows, at least 192, at most ``max_noise_samples``); the diagnostic fits M small
    MLPs (gradients written out, about 60 ms per modality on 134 x 6 training rows of 32
    dimensions). Source: UDML (Wei et al., CVPR 2026
    Findings), repository shicaiwei123/UDML, ``models/basic_model.py`` (AVClassifier_AUXI_UDML)
    and ``main_auxi_weight_udml.py``.
    """

    name = "udml"
    summary = "noise level a probe reads off each modality's clean features (UDML uncertainty, lower = more certain)"
    needs = frozenset({"noise_features", "subsets"})
    higher_is_better = False
    default = True
    headline = "spread"
    scale = "noise level predicted from the clean features"
    higher_means = "the modality's clean features sit where noisy copies sit (less reliable)"
    how_to_read = (
        "A low Spearman means noise in m barely shows in m's features, so its predicted level says "
        "little and UDML's weights are not trustworthy for it (the verdict reads "
        "``details[\"spearman\"]``). With a well-calibrated estimator, a large sigma_m on clean data "
        "means the encoder's features of m sit where the noisy copies sit: m looks unreliable. w_m is "
        "the weight UDML's fix would give m: a modality that is both certain and under-used (small "
        "dep_m) is boosted."
    )
    figures = ("modality_bars", "noise_calibration")
    concurrent = True  # its regressors are fitted beside the other diagnostics
    argues_for = ("noisy_modality",)

    hidden: int = 32
    steps: int = 300
    lr: float = 1e-2
    test_fraction: float = 0.3

    limits = {
        "hidden": Spec("int", minimum=1), "steps": Spec("int", minimum=1),
        "lr": Spec("float", minimum=0.0, above=True),
        "test_fraction": Spec("float", minimum=0.0, maximum=0.9, above=True, hint="share of rows held out"),
    }

    def compute(self, ev: Evidence, prior: Mapping[str, Result] | None = None) -> Result:
        ev.require("noise_features", "subsets")
        assert ev.noise_features is not None and ev.noise_levels is not None and ev.subsets is not None
        levels = as_array(ev.noise_levels)
        n_levels = levels.shape[0]
        clean = int(np.argmin(levels))
        n_rows = int(next(iter(ev.noise_features.values())).shape[1])
        if n_rows < 2 or n_levels < 2:
            raise EvidenceError(
                f"udml needs at least 2 noise rows and 2 noise levels; found {n_rows} rows and {n_levels} levels."
            )
        train, test = row_split(n_rows, self.test_fraction, self.seed)

        y_train = np.repeat(levels, train.shape[0])
        x_train, x_test = [], []
        for m in ev.modalities:
            feats = as_array(ev.noise_features[m])  # [L, n_u, d]
            scale = Standardiser.fit(feats[:, train].reshape(-1, feats.shape[-1]))
            x_train.append(scale(feats[:, train].reshape(-1, feats.shape[-1])))
            x_test.append(scale(feats[:, test].reshape(-1, feats.shape[-1])))
        # one regressor per modality, seeded seed + j, trained side by side (independent fits)
        models = fit_noise_regressors(x_train, y_train, self.hidden, self.steps, self.lr,
                                      [self.seed + j for j in range(len(ev.modalities))])
        clean_pred: list[np.ndarray] = []
        rho: dict[str, float] = {}
        undefined: list[str] = []
        calibration: dict[str, list[dict[str, float]]] = {}
        for m, model, x in zip(ev.modalities, models, x_test):
            pred = predict_noise(model, x).reshape(n_levels, -1)
            clean_pred.append(pred[clean])
            r = spearman(pred.reshape(-1), np.repeat(levels, test.shape[0]))
            if math.isnan(r):
                undefined.append(m)
                r = UNDEFINED_SPEARMAN
            rho[m] = r
            calibration[m] = [{"level": float(levels[i]), "mean_pred": float(pred[i].mean()),
                               "std_pred": float(pred[i].std())} for i in range(n_levels)]

        cols = np.stack(clean_pred, axis=1)  # [n_test, M]
        sigma = cols.mean(axis=0)
        values = {m: float(sigma[j]) for j, m in enumerate(ev.modalities)}
        # one set of resampled means gives both intervals (the resamples of the shared bootstrap)
        draws = bootstrap_mean_draws(cols, self.bootstrap, self.seed)
        ci = percentile_interval(draws, self.level)  # NaN bounds without resamples
        value_ci = percentile_interval(np.ptp(draws, axis=1), self.level)
        dep = np.array([float(ev.subsets[only(ev, m)].double().abs().mean(0).sum()) for m in ev.modalities])
        t, w = udml_weights(sigma, dep)
        return self.result(
            float(np.ptp(sigma)),
            values,
            ci={m: [float(ci[j, 0]), float(ci[j, 1])] for j, m in enumerate(ev.modalities)},
            value_ci=[float(value_ci[0]), float(value_ci[1])],
            details={
                "spearman": rho,
                "spearman_undefined": undefined,
                "calibration": calibration,
                "uncertainty_weights": {m: float(t[j]) for j, m in enumerate(ev.modalities)},
                "dependency": {m: float(dep[j]) for j, m in enumerate(ev.modalities)},
                "weights": {m: float(w[j]) for j, m in enumerate(ev.modalities)},
                "clean_level": float(levels[clean]),
                "n_train_rows": int(train.shape[0]),
                "n_test_rows": int(test.shape[0]),
                "estimator": "MLP probe fitted by mmdiag on frozen features (not the model's own UDML head)",
            },
        )
