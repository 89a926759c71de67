"""combinations: accuracy under every non-empty combination of modalities."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from mmdiag.diagnostics._common import per_modality_ci, subset_correct, without
from mmdiag.diagnostics.base import Diagnostic, register_diagnostic
from mmdiag.evidence import Evidence, nonempty_subsets
from mmdiag.report import Result
from mmdiag.stats import bootstrap_mean_ci


@register_diagnostic
@dataclass(frozen=True)
class Combinations(Diagnostic):
    """Missing-modality accuracy for every non-empty combination of modalities.

    Definition: A(S) = accuracy with only the modalities in S present, for every non-empty S.
    Headline: A of the weakest combination, min over non-empty S of A(S) (MMANet's "hard
    combination"). Per modality: A(all but m), the accuracy when m is missing.

    Cost: 2^M - 1 fusion-head calls per sample with cached features. Source: MMANet (weak
    combination), DMRNet, missing-modality evaluation protocols.
    """

    name = "combinations"
    summary = "accuracy for every non-empty subset of modalities; headline = weakest combination"
    needs = frozenset({"subsets"})
    higher_is_better = True
    headline = "weakest"
    cells = "without"
    scale = "accuracy"
    higher_means = "the model copes better with the modality missing (the accuracy of all the others)"
    how_to_read = (
        "A combination whose accuracy collapses towards chance is one the model cannot serve if that "
        "sensor fails at test time; ``modality_dropout`` retraining targets it."
    )
    figures = ("modality_bars", "combination_heatmap")
    argues_for = ("collapsed_combination",)

    def compute(self, ev: Evidence, prior: Mapping[str, Result] | None = None) -> Result:
        correct = subset_correct(ev)
        subsets = list(nonempty_subsets(ev.modalities))
        names = ["+".join(members) for _, members in subsets]
        matrix = np.stack([correct[mask] for mask, _ in subsets], axis=1)
        acc = matrix.mean(axis=0)
        ci = bootstrap_mean_ci(matrix, self.bootstrap, self.seed, self.level)
        weakest = int(np.argmin(acc))
        missing_cols = np.stack([correct[without(ev, m)] for m in ev.modalities], axis=1)
        return self.result(
            float(acc[weakest]),
            {m: float(missing_cols[:, j].mean()) for j, m in enumerate(ev.modalities)},
            ci=per_modality_ci(ev, missing_cols, self.bootstrap, self.seed, self.level),
            value_ci=[float(ci[weakest, 0]), float(ci[weakest, 1])],
            details={
                "accuracy": {n: float(a) for n, a in zip(names, acc)},
                "ci": {n: [float(ci[j, 0]), float(ci[j, 1])] for j, n in enumerate(names)},
                "weakest": names[weakest],
                "size": {n: len(members) for n, (_, members) in zip(names, subsets)},
                "chance": 1.0 / ev.n_classes,
            },
        )
