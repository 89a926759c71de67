"""prototype: PMR's prototype confidence of each modality, PMR's ratio, and a prototype OOD score."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from mmdiag.diagnostics._common import spread
from mmdiag.diagnostics._probes import as_array, auroc, stratified_split
from mmdiag.diagnostics.base import Diagnostic, register_diagnostic
from mmdiag.errors import EvidenceError
from mmdiag.evidence import Evidence
from mmdiag.report import Result
from mmdiag.stats import bootstrap_mean_draws, percentile_interval
from mmdiag.validation import Spec


def class_prototypes(x: np.ndarray, y: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(classes [K'], prototypes [K', d]): the mean feature of every class present in ``y``."""
    classes = np.array([k for k in range(n_classes) if np.any(y == k)], dtype=np.int64)
    protos = np.stack([x[y == k].mean(axis=0) for k in classes]) if classes.size else np.zeros((0, x.shape[1]))
    return classes, protos


def prototype_scores(x: np.ndarray, y: np.ndarray, classes: np.ndarray, protos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(q [n], distance to the nearest prototype [n]).

    q_i = softmax_k(-||x_i - c^k||)[y_i] over the prototypes that exist; 0 when y_i has none.
    """
    dist = np.sqrt(np.maximum(((x[:, None, :] - protos[None, :, :]) ** 2).sum(-1), 0.0))  # [n, K']
    logits = -dist
    logits = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    column = np.full(int(max(y.max(initial=0), classes.max(initial=0))) + 1, -1)
    column[classes] = np.arange(classes.shape[0])
    col = column[y]
    q = np.where(col >= 0, p[np.arange(y.shape[0]), np.maximum(col, 0)], 0.0)
    return q, dist.min(axis=1)


def pmr_ratios(q_sums: np.ndarray) -> np.ndarray:
    """rho^m = sum_i q_{m,i} / min_k sum_i q_{k,i} (PMR's ratio for M = 2, BalanceMM's for M = 3)."""
    low = q_sums.min()
    return q_sums / low if low > 0 else np.full_like(q_sums, np.nan)


@register_diagnostic
@dataclass(frozen=True)
class Prototype(Diagnostic):
    """Prototype confidence: how tightly modality m's features cluster around their class prototypes.

    Definition (methods.md §3, PMR). Prototypes c_m^k = mean of the pooled features h_m of the rows of
    class k. They are built on the separate probe data when it was collected (PMR builds them on
    training data), otherwise on a seeded per-class half of the feature rows (``proto_fraction``);
    the scores below are evaluated on the other rows, so a prototype never scores the rows that
    built it. When OOD flags exist, only in-distribution rows build prototypes. A class absent from
    the prototype rows has no prototype and is skipped. Distances are Euclidean on the raw features
    (not standardised, as in PMR), so they carry the encoder's scale.

    * q_{m,i} = softmax_k(-||h_{m,i} - c_m^k||)[y_i] (0 if y_i has no prototype);
      per modality Q_m = mean_i q_{m,i} over evaluated in-distribution rows (headline per
      modality, higher = features closer to their own class). Interval: bootstrap of the rows.
    * PMR's ratio rho^m = sum_i q_{m,i} / min_k sum_i q_{k,i}; for M = 2 the larger one is PMR's
      rho (or 1/rho), for M = 3 it is BalanceMM's form; any M the same way. Headline value:
      max_m rho^m (1 = balanced; PMR helps the modality with the smallest sum).
    * OOD score (the idea of PGAN: an input far from every class prototype is suspect):
      s_{m,i} = min_k ||h_{m,i} - c_m^k||. When the data carries OOD flags, details["ood_auroc"][m]
      is the AUROC of s_m for telling OOD rows from in-distribution ones among the evaluated rows
      (rank form, ties counted one half); otherwise details["ood"] = "no ood flags".

    Cost: no forwards beyond the feature subsample (capped by ``--max-probe-samples``, default
    2000 rows); distances n x K x d per modality. Source: PMR (Fan et al., CVPR 2023), repository
    fanyunfeng-bit/Modal-Imbalance-PMR, ``main_Prototype_grad.py`` (calculate_prototype,
    EU_dist); BalanceMM ``trainer/PMR_trainer.py`` for M = 3. The OOD score follows PGAN's idea of
    prototype distances; PGAN is not in the methods index and no code of it was read.
    """

    name = "prototype"
    summary = "mean softmax(-distance) of each sample to its own class prototype (PMR confidence)"
    needs = frozenset({"features"})
    higher_is_better = True
    default = True
    headline = "max ratio"
    scale = "confidence: mean softmax over the distances to the class prototypes"
    higher_means = "the modality's features cluster more tightly around their class prototypes"
    how_to_read = (
        "A modality with a much lower Q_m (rho of the others >> 1) has features that separate the "
        "classes poorly around prototypes: PMR's prototypical cross-entropy would be added for it. A "
        "high OOD AUROC for m means m's features notice distribution shift."
    )

    proto_fraction: float = 0.5

    limits = {"proto_fraction": Spec("float", minimum=0.0, maximum=0.9, above=True, hint="share of rows for prototypes")}

    def compute(self, ev: Evidence, prior: Mapping[str, Result] | None = None) -> Result:
        ev.require("features")
        assert ev.features is not None and ev.feature_rows is not None
        labels = ev.labels[ev.feature_rows].numpy()
        ood = None if ev.ood is None else ev.ood[ev.feature_rows].numpy().astype(bool)
        use_probe_data = ev.probe_features is not None and ev.probe_labels is not None
        if use_probe_data:
            assert ev.probe_labels is not None
            build_labels = ev.probe_labels.numpy()
            build_rows, eval_rows = None, np.arange(labels.shape[0])
        else:
            # split in-distribution rows by class; OOD rows are always evaluated, never build.
            idd = np.flatnonzero(~ood) if ood is not None else np.arange(labels.shape[0])
            tr, te = stratified_split(labels[idd], 1.0 - self.proto_fraction, self.seed)
            build_rows = idd[tr]
            eval_rows = np.sort(np.concatenate([idd[te], np.flatnonzero(ood) if ood is not None else idd[:0]]))
            build_labels = labels[build_rows]
        eval_labels = labels[eval_rows]
        eval_ood = np.zeros(eval_rows.shape[0], dtype=bool) if ood is None else ood[eval_rows]
        if eval_rows.shape[0] == 0 or (~eval_ood).sum() == 0 or build_labels.shape[0] == 0:
            raise EvidenceError(
                f"prototype needs in-distribution feature rows to build prototypes and to score; found "
                f"{ev.feature_rows.numel()} feature rows. Raise `max_feature_samples`."
            )

        q_cols, s_cols = [], []
        present: list[int] = []
        for m in ev.modalities:
            if use_probe_data:
                assert ev.probe_features is not None
                if m not in ev.probe_features:
                    raise EvidenceError(f"The probe data has no features of modality {m!r}.")
                x_build = as_array(ev.probe_features[m])  # probe data has no OOD flags: every row builds
            else:
                x_build = as_array(ev.features[m])[build_rows]
            classes, protos = class_prototypes(x_build, build_labels, ev.n_classes)
            present = classes.tolist()
            q, s = prototype_scores(as_array(ev.features[m])[eval_rows], eval_labels, classes, protos)
            q_cols.append(q)
            s_cols.append(s)
        q_all = np.stack(q_cols, axis=1)  # [n_eval, M]
        dist = np.stack(s_cols, axis=1)
        q_id = q_all[~eval_ood]
        values = {m: float(q_id[:, j].mean()) for j, m in enumerate(ev.modalities)}
        ratios = pmr_ratios(q_id.sum(axis=0))
        if self.bootstrap > 0 and q_id.shape[0] > 0:
            # one set of resampled column means serves both intervals; the ratio of sums is the
            # ratio of means, undefined (NaN, left out) where a modality's mean confidence is 0
            means = bootstrap_mean_draws(q_id, self.bootstrap, self.seed)
            low = means.min(axis=1)
            max_ratio = np.divide(means.max(axis=1), low, out=np.full_like(low, np.nan), where=low > 0)
            ci = percentile_interval(means, self.level)
            value_ci = percentile_interval(max_ratio[:, None], self.level)[0]
        else:
            ci = np.full((len(ev.modalities), 2), np.nan)
            value_ci = np.full(2, np.nan)
        details: dict[str, object] = {
            "ratio": {m: float(ratios[j]) for j, m in enumerate(ev.modalities)},
            "spread": spread(values),
            "mean_distance": {m: float(dist[~eval_ood, j].mean()) for j, m in enumerate(ev.modalities)},
            "classes_with_prototype": present,
            "n_build": int(build_labels.shape[0]),
            "n_eval": int((~eval_ood).sum()),
            "build_source": "probe_data" if use_probe_data else "split",
            "chance": 1.0 / max(len(present), 1),
        }
        if ood is None:
            details["ood"] = "no ood flags"
        else:
            details["ood_auroc"] = {m: auroc(dist[:, j], eval_ood) for j, m in enumerate(ev.modalities)}
            details["n_ood"] = int(eval_ood.sum())
        headline = float(np.max(ratios))
        return self.result(
            None if math.isnan(headline) else headline,
            values,
            ci={m: [float(ci[j, 0]), float(ci[j, 1])] for j, m in enumerate(ev.modalities)},
            value_ci=[float(value_ci[0]), float(value_ci[1])],
            details=details,
        )
