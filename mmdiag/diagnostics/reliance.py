"""reliance: how much accuracy the model loses when one modality goes missing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from mmdiag.diagnostics._common import only, per_modality_ci, spread, subset_correct, subset_logprob, without
from mmdiag.diagnostics.base import Diagnostic, register_diagnostic
from mmdiag.evidence import Evidence
from mmdiag.report import Result


@register_diagnostic
@dataclass(frozen=True)
class Reliance(Diagnostic):
    """Modality-dropout reliance: the accuracy drop when modality m alone is masked.

    Definition: R_m = A(all) - A(all but m), with A the accuracy of the fused logits and
    "all but m" the logits with m masked (modality dropout at evaluation, as in UDML, DMRNet and
    MMANet). Headline: the spread max_m R_m - min_m R_m (0 = the model leans on every modality
    equally). Details: the drop in mean true-class log-probability, and UDML's dependency statistic
    dep_m = sum_k mean_i |z_{m,i,k}| (mean absolute logit magnitude of the m-only readout, methods.md
    section 12) with its shares dep_m / sum_k dep_k.

    Cost: M fusion-head calls per sample with cached features. Source: UDML (dependency bias via
    modality dropout), DMRNet and MMANet (missing-modality evaluation).
    """

    name = "reliance"
    summary = "accuracy drop when one modality alone is masked (modality-dropout reliance)"
    needs = frozenset({"subsets"})
    higher_is_better = None
    contribution = True
    shareable = True
    headline = "spread"
    scale = "accuracy lost when the modality alone is masked"
    higher_means = "the model needs the modality more"
    how_to_read = (
        "R_m near 0 for a modality means the model works as well without it; a large R_m for one "
        "modality and small ones for the rest is the signature of dominance."
    )
    argues_for = ("gradient_imbalance",)

    def compute(self, ev: Evidence, prior: Mapping[str, Result] | None = None) -> Result:
        correct = subset_correct(ev)
        logp = subset_logprob(ev)
        full = ev.full_mask
        cols = np.stack([correct[full] - correct[without(ev, m)] for m in ev.modalities], axis=1)
        values = {m: float(cols[:, j].mean()) for j, m in enumerate(ev.modalities)}
        assert ev.subsets is not None
        dep = {m: float(ev.subsets[only(ev, m)].abs().mean(0).sum()) for m in ev.modalities}
        dep_total = sum(dep.values())
        return self.result(
            spread(values),
            values,
            ci=per_modality_ci(ev, cols, self.bootstrap, self.seed, self.level),
            details={
                "logprob_drop": {m: float((logp[full] - logp[without(ev, m)]).mean()) for m in ev.modalities},
                "dependency": dep,
                "dependency_share": {m: (v / dep_total if dep_total > 0 else 1.0 / len(dep)) for m, v in dep.items()},
                "accuracy_without": {m: float(correct[without(ev, m)].mean()) for m in ev.modalities},
            },
        )
