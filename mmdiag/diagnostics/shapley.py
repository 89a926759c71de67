"""shapley: exact Shapley value of each modality over all 2^M subsets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping


from mmdiag.diagnostics._common import per_modality_ci, shapley_per_sample, spread, subset_correct, subset_logprob
from mmdiag.diagnostics.base import Diagnostic, register_diagnostic
from mmdiag.evidence import Evidence, subset_name
from mmdiag.report import Result
from mmdiag.stats import positive_shares, shapley_matrix


@register_diagnostic
@dataclass(frozen=True)
class Shapley(Diagnostic):
    """Shapley contribution of each modality to accuracy.

    Definition (methods.md P2): with coalition value v(S) = accuracy of the model when only the
    modalities in S are present (the rest masked),
    phi_m = sum over S not containing m of |S|! (M - |S| - 1)! / M! * [v(S + {m}) - v(S)].
    The values add up to v(all) - v(none) (efficiency). The same is computed with v(S) = mean
    true-class log-probability (in details). Because each phi_m is linear in per-sample
    correctness, phi_m is the mean of per-sample Shapley values, whose bootstrap gives the interval.
    Headline: the spread max_m phi_m - min_m phi_m.

    Cost: 2^M - 1 fusion-head calls per sample with cached features (2^M - 1 full forwards when
    masking inputs); M > 8 is refused unless ``max_subsets`` allows it. Source: BalanceMM
    ``Calculate_Shapley``; AGM's mono-modal responses use the same split.
    """

    name = "shapley"
    summary = "exact Shapley value of each modality for accuracy (sums to v(all) - v(none))"
    needs = frozenset({"subsets"})
    higher_is_better = True
    contribution = True
    shareable = True
    headline = "spread"
    scale = "accuracy added (Shapley value)"
    higher_means = "the modality adds more accuracy, averaged over the orders of adding modalities"
    how_to_read = (
        "phi_m is the accuracy modality m adds on average over every order in which the modalities "
        "could be added. Unlike ``reliance`` it credits redundancy fairly: two modalities that each "
        "suffice alone share the credit."
    )
    argues_for = ("gradient_imbalance",)

    def compute(self, ev: Evidence, prior: Mapping[str, Result] | None = None) -> Result:
        a = shapley_matrix(ev.n_modalities)
        correct = subset_correct(ev)
        per_sample = shapley_per_sample(ev, correct)  # [N, M]
        values = {m: float(per_sample[:, j].mean()) for j, m in enumerate(ev.modalities)}
        logp_phi = a @ subset_logprob(ev).mean(axis=1)
        v = correct.mean(axis=1)
        return self.result(
            spread(values),
            values,
            ci=per_modality_ci(ev, per_sample, self.bootstrap, self.seed, self.level),
            details={
                "logprob": {m: float(logp_phi[j]) for j, m in enumerate(ev.modalities)},
                "coalition_accuracy": {subset_name(s, ev.modalities): float(v[s]) for s in range(v.shape[0])},
                "total": float(v[ev.full_mask] - v[0]),
                "shares": positive_shares(values),
            },
        )
