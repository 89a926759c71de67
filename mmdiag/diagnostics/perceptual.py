"""perceptual: the perceptual score, accuracy lost when one modality is permuted across samples."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from mmdiag.diagnostics._common import spread
from mmdiag.diagnostics.base import Diagnostic, register_diagnostic
from mmdiag.errors import EvidenceError
from mmdiag.evidence import Evidence
from mmdiag.report import Result
from mmdiag.stats import bootstrap_mean_draws, modality_intervals, percentile_interval


def _std(x: np.ndarray) -> np.ndarray:
    """Sample standard deviation over the first axis (ddof 1; 0 with a single permutation)."""
    return x.std(axis=0, ddof=1) if x.shape[0] > 1 else np.zeros(x.shape[1:])


@register_diagnostic
@dataclass(frozen=True)
class Perceptual(Diagnostic):
    """Perceptual score (Gat, Schwartz, Schwing, NeurIPS 2021): reliance measured by permutation.

    Definition (methods.md §15): with A the fused accuracy on the evaluated rows and A(pi_k, m) the
    accuracy when modality m of every row is replaced by that of another row (random permutation
    pi_k, k = 1..K; the other modalities and the label stay), the perceptual score is
    PS_m = A - (1/K) sum_k A(pi_k, m). Per sample, d_{m,i} = c_i - (1/K) sum_k c_{k,m,i} with c the
    0/1 correctness, so PS_m = mean_i d_{m,i}. Headline: the spread max_m PS_m - min_m PS_m (0 = the
    model relies on every modality equally). The paper has two modalities; the definition is per
    modality and applies unchanged to any M.

    Details: ``normalized`` PS_m / A (None when A = 0; the paper reports a normalised score whose
    exact normaliser the paper's text leaves open, so dividing by A is mmdiag's choice); ``loss``
    L(pi, m) - L, the mean true-class cross-entropy under permutation minus the clean one (the
    risk form of the score used in the authors' repository); ``std`` and
    ``loss_std``, the sample standard deviation (ddof 1) of the score over the K permutations (the
    paper stresses averaging over several); ``per_permutation`` the K scores.

    Intervals: bootstrap over rows of d_{m,i} (the K permutations stay fixed); the headline's
    interval recomputes the spread from the same draws.

    Cost: (1 + M K) forwards per sample (fusion-head calls when features are cached).
    Source: Perceptual score (Gat et al., NeurIPS 2021; arXiv 2110.14375), itaigat/perceptual-score
    ``README.md`` and ``nn_utils.py``; captum ``FeaturePermutation`` computes the same permutation.
    """

    name = "perceptual"
    summary = "perceptual score: fused accuracy lost when one modality is permuted across samples"
    needs = frozenset({"permutations"})
    higher_is_better = True
    contribution = True
    shareable = True
    headline = "spread"
    scale = "accuracy lost when the modality is permuted"
    higher_means = "the prediction depends more on the modality"
    how_to_read = (
        "PS_m near 0 means the prediction does not change when m is scrambled, so the model ignores m "
        "(or m carries nothing the others lack). PS_m close to A - chance means the model cannot do "
        "without m. Unlike masking (``reliance``), permutation keeps m's marginal distribution, so the "
        "model never sees out-of-distribution zeros. Because the permuted rows come from the same "
        "evaluation batch, small batches inflate ``std``."
    )
    figures = ("modality_bars", "permutation_spread")

    def compute(self, ev: Evidence, prior: Mapping[str, Result] | None = None) -> Result:
        ev.require("permutations")
        assert ev.perm_correct is not None
        mods = ev.modalities
        pc = ev.perm_correct.detach().double().numpy()  # [K, M, N]
        if pc.ndim != 3 or pc.shape[1] != len(mods) or pc.shape[2] != ev.n_samples:
            raise EvidenceError(
                f"perceptual: perm_correct must be [K, {len(mods)}, {ev.n_samples}]; found {list(pc.shape)}."
            )
        if ev.n_samples == 0 or pc.shape[0] == 0:
            raise EvidenceError("perceptual: the evidence has no rows or no permutations.")
        correct = ev.correct().double().numpy()  # [N]
        acc = float(correct.mean())
        diff = correct[:, None] - pc.mean(axis=0).T  # [N, M]
        ps = diff.mean(axis=0)
        values = {m: float(ps[j]) for j, m in enumerate(mods)}
        per_perm = acc - pc.mean(axis=2)  # [K, M]

        per_mod_ci: dict[str, list[float]] = {}
        value_ci = None
        if self.bootstrap > 0:
            draws = bootstrap_mean_draws(diff, self.bootstrap, self.seed)
            per_mod_ci = modality_intervals(mods, percentile_interval(draws, self.level, finite=True))
            value_ci = percentile_interval(draws.max(axis=1) - draws.min(axis=1), self.level, finite=True).tolist()

        details: dict = {
            "accuracy": acc,
            "permuted_accuracy": {m: float(pc[:, j].mean()) for j, m in enumerate(mods)},
            "normalized": {m: (float(ps[j] / acc) if acc > 0 else None) for j, m in enumerate(mods)},
            "std": {m: float(s) for m, s in zip(mods, _std(per_perm))},
            "per_permutation": {m: [float(x) for x in per_perm[:, j]] for j, m in enumerate(mods)},
            "n_permutations": int(pc.shape[0]),
        }
        if ev.perm_nll is not None:
            nll = ev.perm_nll.detach().double().numpy()  # [K, M, N]
            clean = -torch.log_softmax(ev.logits.detach().double(), dim=-1).gather(
                -1, ev.labels.long()[:, None])[:, 0].numpy()
            loss_per_perm = nll.mean(axis=2) - clean.mean()  # [K, M]
            details["clean_loss"] = float(clean.mean())
            details["loss"] = {m: float(loss_per_perm[:, j].mean()) for j, m in enumerate(mods)}
            details["loss_std"] = {m: float(s) for m, s in zip(mods, _std(loss_per_perm))}
        return self.result(
            spread(values),
            values,
            ci=per_mod_ci,
            value_ci=value_ci,
            details=details,
            per_sample={f"drop_{m}": diff[:, j].copy() for j, m in enumerate(mods)},
        )
