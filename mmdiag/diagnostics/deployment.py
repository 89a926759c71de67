"""deployment: expected accuracy under the combinations of modalities met at test time."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from mmdiag.deployment import Distribution, combination_name, conditional, distribution, forced_present
from mmdiag.diagnostics._common import subset_correct
from mmdiag.diagnostics.base import Diagnostic, register_diagnostic
from mmdiag.evidence import Evidence
from mmdiag.report import Result
from mmdiag.stats import bootstrap_mean_ci


def weights(p: np.ndarray, n_modalities: int) -> np.ndarray:
    """[1 + M, 2^M] linear weights on the subsets' accuracies: row 0 gives E, row 1 + j gives L_j.

    E = sum_S Q(S) A(S) with Q the non-empty part of ``p`` renormalised; L_j = E_j - E with
    E_j = sum_S Q(S) A(S + j), the same served requests with modality j never missing. Neither row
    weighs the empty subset.
    """
    q, _ = conditional(p)
    rows = [q] + [forced_present(q, j) - q for j in range(n_modalities)]
    return np.stack(rows)


def summarise(p: np.ndarray, acc: np.ndarray, ci: np.ndarray, modalities: Sequence[str],
              chance: float) -> dict[str, Any]:
    """The details of a deployment result from the subset probabilities ``p`` [2^M], accuracies
    ``acc`` [2^M] and their intervals ``ci`` [2^M, 2] (the empty subset's are not read)."""
    mods = list(modalities)
    full = (1 << len(mods)) - 1
    q, empty = conditional(p)
    order = sorted(range(1, full + 1), key=lambda s: (bin(s).count("1"), [j for j in range(len(mods)) if s >> j & 1]))
    names = {s: combination_name(s, mods) for s in order}
    expected = float(q @ acc)
    cost = {s: float(q[s] * (acc[full] - acc[s])) for s in order}
    served = [s for s in order if q[s] > 0]
    worst = max(served, key=lambda s: cost[s])  # the first of equal costs, smaller combinations first
    return {
        "expected_accuracy": expected,
        "full_accuracy": float(acc[full]),
        "drop": float(acc[full] - expected),
        "probability": {names[s]: float(q[s]) for s in order},
        "accuracy": {names[s]: float(acc[s]) for s in order},
        "ci": {names[s]: [float(ci[s, 0]), float(ci[s, 1])] for s in order},
        "weighted": {names[s]: float(q[s] * acc[s]) for s in order},
        "cost": {names[s]: cost[s] for s in order},
        "worst": names[worst],
        "worst_accuracy": float(acc[worst]),
        "worst_ci": [float(ci[worst, 0]), float(ci[worst, 1])],
        "worst_cost": cost[worst],
        "p_empty": empty,
        "empty": "excluded: the expected accuracy is over the requests with at least one modality present",
        "expected_empty_at_chance": (1.0 - empty) * expected + empty * chance,
        "chance": chance,
    }


def _describe(dist: Distribution, details: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"distribution": dist.source, "distribution_text": dist.describe()}
    if dist.source == "missing":
        out["missing_rates"] = dict(dist.missing or {})
    if dist.source == "uniform":
        out["note"] = (f"no deployment distribution was given (`missing` or `combinations`): expected accuracy "
                       f"{details['expected_accuracy']:.3f} under the uniform distribution over the "
                       f"{len(details['probability'])} non-empty combinations")
    elif details["p_empty"] > 0:
        out["note"] = (f"the empty combination (every modality missing) has probability {details['p_empty']:.3g}; "
                       "it is excluded and the rest renormalised (counting it at chance would give "
                       f"{details['expected_empty_at_chance']:.3f})")
    return out


@register_diagnostic
@dataclass(frozen=True)
class Deployment(Diagnostic):
    """Deployment robustness: the expected accuracy under the distribution of missing modalities.

    Definition (mmdiag's; the per-combination evaluation is MMANet's and DMRNet's, methods.md §13-14).
    P(S) = probability that exactly the modalities in S are present at test time: from independent
    missing rates r_m, P(S) = prod_{m in S} (1 - r_m) prod_{m not in S} r_m (``missing``); or given
    per combination (``combinations``); or, when neither is given, uniform over the non-empty
    combinations (``details.distribution = "uniform"``, and ``details.note`` says so). The empty
    combination cannot be served: it is excluded and the rest renormalised, Q(S) = P(S) / (1 -
    P(empty)) (``details.p_empty``; ``details.expected_empty_at_chance`` counts it at 1/C instead).
    A(S) = accuracy with only S present (the subset logits, as in ``combinations``).

    * Headline: E = sum_S Q(S) A(S), the expected accuracy. Interval: bootstrap of the rows (E is
      the mean over rows of e_i = sum_S Q(S) 1[correct_i(S)]).
    * Per modality: L_m = E_m - E, the expected accuracy lost because m goes missing, where
      E_m = sum_S Q(S) A(S + m) is the expected accuracy of the same served requests with m never
      missing and the other modalities as available as before (the empty combination stays out, as
      in E). L_m = 0 for a modality that is never missing; lower is better. The L_m need not add up
      to A(all) - E (modalities missing together interact). Interval: bootstrap of the rows.
    * ``details``: per non-empty combination its probability Q, accuracy A and interval, weighted
      accuracy Q(S) A(S) (they add up to E) and cost Q(S) (A(all) - A(S)); ``worst`` = the
      combination of largest cost among those with Q > 0, with ``worst_accuracy`` (gate key
      ``deployment.worst``) and ``worst_ci``; ``full_accuracy`` and ``drop`` = A(all) - E.

    Cost: no model call beyond the 2^M - 1 subset evaluations that ``combinations`` and ``shapley``
    share. Source: the missing-modality evaluation protocols of MMANet (Wei et al., CVPR 2023) and
    DMRNet (Wei et al., ECCV 2024); the expected accuracy, the loss per modality and the handling of
    the empty combination are mmdiag's definitions.
    """

    name = "deployment"
    summary = "expected accuracy under the test-time distribution of missing modalities (uniform when none given)"
    needs = frozenset({"subsets"})
    higher_is_better = False
    headline = "expected"
    cells = "loss when missing"
    scale = "expected accuracy lost because the modality goes missing"
    higher_means = "the modality's absence costs more expected accuracy at deployment"
    how_to_read = (
        "The headline is the accuracy to expect when modalities go missing as often as ``missing`` (or "
        "``combinations``) says; ``details.worst`` is the combination that costs the most of it. A "
        "modality with a large per-modality loss is the one whose absence hurts: make it more reliable, "
        "or retrain for missing modalities (``mmanet``, ``dmrnet``, ``restore``)."
    )
    figures = ("modality_bars", "combination_heatmap")
    argues_for = ("missing_modality",)
    gate_keys = {"worst": ("worst_accuracy", "worst_ci")}

    #: independent missing rates, modality -> probability (``rgb=0.3,depth=0.5`` as text)
    missing: Any = None
    #: explicit distribution, combination (``rgb+depth``) -> probability
    combinations: Any = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.distribution()  # a distribution that does not parse fails when the diagnostic is built

    def distribution(self) -> Distribution:
        """The deployment distribution of the parameters (ConfigError when they do not parse)."""
        return distribution(self.missing, self.combinations)

    def params(self) -> dict[str, Any]:
        """Parameters with the distribution in its parsed form (JSON-safe)."""
        return {**super().params(), "missing": None, "combinations": None, **self.distribution().params()}

    def check(self, modalities: Sequence[str]) -> None:
        self.distribution().probabilities(modalities)

    def compute(self, ev: Evidence, prior: Mapping[str, Result] | None = None) -> Result:
        dist = self.distribution()
        p = dist.probabilities(ev.modalities)
        correct = subset_correct(ev)  # [2^M, N]
        w = weights(p, ev.n_modalities)
        columns = np.concatenate([(w @ correct).T, correct.T], axis=1)  # [N, 1 + M + 2^M]
        means = columns.mean(axis=0)
        ci = bootstrap_mean_ci(columns, self.bootstrap, self.seed, self.level)
        k = 1 + ev.n_modalities
        details = summarise(p, means[k:], ci[k:], ev.modalities, 1.0 / ev.n_classes)
        details.update(_describe(dist, details))
        res = self.result(
            float(means[0]),
            {m: float(means[1 + j]) for j, m in enumerate(ev.modalities)},
            ci={m: [float(ci[1 + j, 0]), float(ci[1 + j, 1])] for j, m in enumerate(ev.modalities)},
            value_ci=[float(ci[0, 0]), float(ci[0, 1])],
            details=details,
        )
        return dataclasses.replace(res, headline=_headline(dist))


def _headline(dist: Distribution) -> str:
    """What the headline is, with the distribution behind it (the summary table shows it)."""
    return "expected (uniform)" if dist.source == "uniform" else "expected (given)"


def reweighted(res: Result, modalities: Sequence[str], dist: Distribution) -> Result:
    """A deployment result for another distribution, from its per-combination accuracies.

    The point values are exact (E and L_m are linear in the accuracies); intervals need the rows,
    so the headline and per-modality ones are dropped (the per-combination ones, and ``worst_ci``,
    do not depend on the distribution and stay). ``res`` itself when the distribution is the one
    it was computed under.
    """
    mods = list(modalities)
    before = distribution(res.params.get("missing"), res.params.get("combinations")).probabilities(mods)
    p = dist.probabilities(mods)
    if np.allclose(p, before, rtol=0.0, atol=1e-12):
        return res
    n = 1 << len(mods)
    acc, ci = np.zeros(n), np.full((n, 2), np.nan)
    for s in range(1, n):
        name = combination_name(s, mods)
        acc[s] = float(res.details["accuracy"][name])
        bounds = (res.details.get("ci") or {}).get(name) or [None, None]
        ci[s] = [np.nan if b is None else float(b) for b in bounds]
    values = weights(p, len(mods)) @ acc
    details = summarise(p, acc, ci, mods, float(res.details.get("chance", 0.0)))
    details.update(_describe(dist, details))
    details["reweighted"] = (f"recomputed by the gate from the report's per-combination accuracies for "
                             f"{dist.describe()} (the analysis used "
                             f"{res.details.get('distribution_text', 'another distribution')}): point "
                             "values only; rerun the analysis with this distribution for intervals")
    params = {**res.params, "missing": None, "combinations": None, **dist.params()}
    return dataclasses.replace(res, value=float(values[0]), headline=_headline(dist),
                               per_modality={m: float(values[1 + j]) for j, m in enumerate(mods)},
                               ci={}, value_ci=None, params=params, details=details)
