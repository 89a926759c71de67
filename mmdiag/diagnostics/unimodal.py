"""unimodal: accuracy of the model with only one modality present."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from mmdiag.diagnostics._common import only, per_class_accuracy, per_modality_ci, spread, subset_correct
from mmdiag.diagnostics.base import Diagnostic, register_diagnostic
from mmdiag.evidence import Evidence
from mmdiag.report import Result


@register_diagnostic
@dataclass(frozen=True)
class Unimodal(Diagnostic):
    """Unimodal accuracy: what the model gets right from modality m alone.

    Definition: A_m = mean_i 1[argmax z_{m,i} = y_i], where z_m are the logits with every modality
    but m masked (methods.md P1, readouts R2 at the feature level or R3 at the input level, as the
    adapter masks). Headline: the spread max_m A_m - min_m A_m (0 = every modality alone is equally
    good). Details: per-class accuracy of each modality and the fused accuracy.

    Cost: M extra fusion-head calls per sample with cached features (M full forwards when masking
    inputs). Source: OGM-GE, PMR, BalanceMM's ``limit_modality`` evaluation.
    """

    name = "unimodal"
    summary = "accuracy with only one modality present (others masked)"
    needs = frozenset({"subsets"})
    higher_is_better = True
    headline = "spread"
    scale = "accuracy"
    higher_means = "the model does better from the modality alone"
    how_to_read = (
        "A modality whose A_m sits near chance while the fused accuracy is high is ignored by the "
        "model *or* uninformative; compare ``probe`` to tell which."
    )
    figures = ("modality_bars", "per_class_heatmap")
    argues_for = ("unlearned_encoder", "ignored_features", "gradient_imbalance")

    def compute(self, ev: Evidence, prior: Mapping[str, Result] | None = None) -> Result:
        correct = subset_correct(ev)
        cols = np.stack([correct[only(ev, m)] for m in ev.modalities], axis=1)
        values = {m: float(cols[:, j].mean()) for j, m in enumerate(ev.modalities)}
        labels = ev.labels.numpy()
        return self.result(
            spread(values),
            values,
            ci=per_modality_ci(ev, cols, self.bootstrap, self.seed, self.level),
            details={
                "fused_accuracy": float(correct[ev.full_mask].mean()),
                "chance": 1.0 / ev.n_classes,
                "per_class": {m: per_class_accuracy(cols[:, j], labels, ev.n_classes)
                              for j, m in enumerate(ev.modalities)},
            },
        )
