"""probe: linear-probe accuracy of each modality's frozen pooled encoder features."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from mmdiag.diagnostics._common import spread
from mmdiag.diagnostics._probes import Standardiser, as_array, fit_logistic, predict_logistic, stratified_split
from mmdiag.diagnostics.base import Diagnostic, register_diagnostic
from mmdiag.errors import EvidenceError
from mmdiag.evidence import Evidence
from mmdiag.report import Result
from mmdiag.runtime.threads import share
from mmdiag.stats import bootstrap_mean_draws, percentile_interval
from mmdiag.validation import Spec


@register_diagnostic
@dataclass(frozen=True)
class Probe(Diagnostic):
    """Linear-probe accuracy: how much label information modality m's encoder features hold.

    Definition (methods.md P1, readout R4): for each modality m, a fresh multinomial logistic
    regression p(y | h) = softmax(W_m^T s(h_m) + b_m) is fitted on the frozen pooled features h_m,
    with s(.) the standardisation by the training rows' mean and std (constant columns map to 0),
    by minimising mean CE + ``weight_decay`` * ||W_m||^2 from zero (strictly convex: one optimum,
    no seed dependence; Newton-CG with a line search for up to 400 parameters, SciPy's L-BFGS-B beyond). Training rows are the separate probe data (``--probe-data``) when it was
    collected, and the probe is tested on every feature row; otherwise the feature rows are split
    by a seeded, per-class (stratified) split with ``test_fraction`` held out. The same split is
    used for every modality. P_m = accuracy of the probe on the held-out rows.
    Headline: the spread max_m P_m - min_m P_m. The interval of P_m resamples the held-out rows'
    0/1 correctness (the probe is not refitted).

    Details: training accuracy, n_train, n_test, chance 1/C, majority (accuracy of always
    predicting the training majority class on the held-out rows), and the split source
    (``probe_data`` or ``split``) per modality.

    Cost: no model forwards beyond the pooled features of the feature subsample (capped by
    ``--max-probe-samples``, default 2000 rows); one small convex fit per modality
    (n x d_m x C: about 15 ms for 1400 rows of 32 dimensions and 4 classes, up to a second). Source: OGM-GE's linear-probe analysis and
    BalanceMM's ``LinearProbeTrainer`` (methods.md P1 R4).
    """

    name = "probe"
    summary = "held-out accuracy of a linear probe on each modality's frozen encoder features"
    needs = frozenset({"features"})
    higher_is_better = True
    default = True
    headline = "spread"
    scale = "accuracy"
    higher_means = "the modality's encoder features hold more label information"
    how_to_read = (
        "Compare P_m with ``unimodal`` accuracy A_m. P_m high but A_m low: the encoder learned "
        "modality m but the fusion ignores it. P_m near chance: the encoder never learned m (or m is "
        "uninformative). Any M >= 2: one probe per modality, nothing pairs modalities."
    )
    argues_for = ("unlearned_encoder", "ignored_features")
    concurrent = True  # its logistic fits run beside the other diagnostics

    weight_decay: float = 1e-3
    test_fraction: float = 0.3
    max_iter: int = 200

    limits = {
        "weight_decay": Spec("float", minimum=0.0),
        "test_fraction": Spec("float", minimum=0.0, maximum=0.9, above=True, hint="share of rows held out"),
        "max_iter": Spec("int", minimum=1),
    }

    def compute(self, ev: Evidence, prior: Mapping[str, Result] | None = None) -> Result:
        ev.require("features")
        assert ev.features is not None and ev.feature_rows is not None
        test_labels = ev.labels[ev.feature_rows].numpy()
        use_probe_data = ev.probe_features is not None and ev.probe_labels is not None
        if use_probe_data:
            assert ev.probe_labels is not None
            train_labels = ev.probe_labels.numpy()
            test_rows = np.arange(test_labels.shape[0])
        else:
            train_rows, test_rows = stratified_split(test_labels, self.test_fraction, self.seed)
            train_labels = test_labels[train_rows]
            test_labels = test_labels[test_rows]
        if test_rows.shape[0] == 0 or train_labels.shape[0] == 0:
            raise EvidenceError(
                f"probe needs feature rows to train and test on; found {ev.feature_rows.numel()} feature "
                "rows. Raise `max_feature_samples`."
            )
        majority_class = int(np.bincount(train_labels, minlength=ev.n_classes).argmax())

        source: dict[str, str] = {}
        data: list[tuple[np.ndarray, np.ndarray]] = []  # standardised (train, test) features per modality
        for m in ev.modalities:
            feats = as_array(ev.features[m])
            if use_probe_data and ev.probe_features is not None and m in ev.probe_features:
                x_train, x_test = as_array(ev.probe_features[m]), feats
                source[m] = "probe_data"
            elif use_probe_data:
                raise EvidenceError(f"The probe data has no features of modality {m!r}.")
            else:
                x_train, x_test = feats[train_rows], feats[test_rows]
                source[m] = "split"
            scale = Standardiser.fit(x_train)
            data.append((scale(x_train), scale(x_test)))
        # one independent fit per modality: idle threads of the diagnostics phase may take some
        fits = share(lambda xy: fit_logistic(xy[0], train_labels, ev.n_classes, self.weight_decay, self.max_iter),
                     data)
        train_acc = {m: float((predict_logistic(x, w, b) == train_labels).mean())
                     for m, (x, _), (w, b) in zip(ev.modalities, data, fits)}
        cols = [(predict_logistic(x, w, b) == test_labels).astype(np.float64) for (_, x), (w, b) in zip(data, fits)]

        correct = np.stack(cols, axis=1)  # [n_test, M]
        values = {m: float(correct[:, j].mean()) for j, m in enumerate(ev.modalities)}
        # one set of resampled means gives both intervals (the resamples of the shared bootstrap)
        draws = bootstrap_mean_draws(correct, self.bootstrap, self.seed)
        ci = percentile_interval(draws, self.level)  # NaN bounds without resamples
        value_ci = percentile_interval(np.ptp(draws, axis=1), self.level)
        return self.result(
            spread(values),
            values,
            ci={m: [float(ci[j, 0]), float(ci[j, 1])] for j, m in enumerate(ev.modalities)},
            value_ci=[float(value_ci[0]), float(value_ci[1])],
            details={
                "train_accuracy": train_acc,
                "n_train": int(train_labels.shape[0]),
                "n_test": int(test_labels.shape[0]),
                "chance": 1.0 / ev.n_classes,
                "majority": float((test_labels == majority_class).mean()),
                "split": source,
            },
        )
