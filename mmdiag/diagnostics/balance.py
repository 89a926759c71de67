"""balance: how evenly the modalities share the model's positive contribution (mmdiag's own summary)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from mmdiag.diagnostics._common import shapley_per_sample, subset_correct, without
from mmdiag.diagnostics._shares import (
    attribution_shares,
    entropy_rows,
    min_max_ratio,
    positive_share_rows,
)
from mmdiag.diagnostics.base import Diagnostic, RegistryView, contribution_measures, register_diagnostic
from mmdiag.errors import ConfigError, EvidenceError
from mmdiag.evidence import Evidence
from mmdiag.registry import closest
from mmdiag.report import Result
from mmdiag.stats import bootstrap_weighted_mean_draws, gini, modality_intervals, percentile_interval

#: measures whose per-sample contributions balance computes itself (so it can bootstrap them).
PER_SAMPLE = ("shapley", "reliance", "attribution")


def measures() -> tuple[str, ...]:
    """The contribution measures balance can summarise: every registered diagnostic that declares
    ``contribution`` and ``shareable`` (plug-ins included), in registry order."""
    return contribution_measures(shareable=True)


@register_diagnostic
@dataclass(frozen=True)
class Balance(Diagnostic):
    """Modality-fairness summary: the normalised entropy of the modalities' contribution shares.

    Definition (mmdiag's own summary, not from a paper): take a contribution c_m per modality from
    the measure ``of`` (default ``shapley``: the Shapley value of accuracy; ``reliance``: the accuracy
    drop when m alone is masked; ``attribution``: the mean Integrated-Gradients share; any other
    registered diagnostic that declares ``contribution`` and ``shareable``, e.g. ``cal``, ``mdi``,
    ``perceptual``: that diagnostic's per-modality values). Shares q_m = max(c_m, 0) / sum_k max(c_k, 0)
    (uniform when no modality contributes positively). Headline: the normalised entropy
    H = -sum_m q_m log q_m / log M, 1 when every modality contributes equally, 0 when one modality
    does everything. per_modality = q_m. Details: the min/max share ratio, the Gini coefficient,
    each modality's gap q_m - 1/M, and the same indices for every other contribution diagnostic that
    ran, with ``agree`` saying whether they all name the same modality as the largest.

    Intervals: bootstrap over the evaluation rows when the contributions are per-sample evidence
    (shapley, reliance: per-sample Shapley and reliance of 0/1 correctness; attribution: per-sample
    IG shares); shares and H are recomputed from the column means of each resample. For the other
    measures the shares come from that diagnostic's result, which has no per-sample evidence here,
    so no interval is given. Cost: none beyond the evidence (2^M - 1 fusion-head calls per sample).
    """

    name = "balance"
    summary = "normalised entropy of the modalities' contribution shares (1 = balanced, 0 = one modality does everything)"
    needs = frozenset({"subsets"})
    uses = RegistryView(measures)
    higher_is_better = True
    headline = "evenness"
    scale = "share of the positive contribution (headline: normalised entropy of the shares)"
    higher_means = "the modality holds more of the contribution (headline: the shares are more even)"
    how_to_read = (
        "For M = 2, shares of 70/30 give H = 0.88, 80/20 give 0.72 and 90/10 give 0.47; H near 1 is "
        "balanced, H below about 0.5 means one modality carries nearly all of the model. The "
        "``measures`` block shows whether masking-based (shapley, reliance) and gradient-based "
        "(attribution, mdi) measures agree."
    )

    of: str = "shapley"

    def __post_init__(self) -> None:
        known = measures()
        if self.of not in known:
            near = closest(self.of, list(known))
            raise ConfigError(
                f"balance: of={self.of!r} is not a contribution measure it can summarise; choose one of "
                f"{', '.join(known)}." + (f" Did you mean {near!r}?" if near else "")
            )

    def compute(self, ev: Evidence, prior: Mapping[str, Result] | None = None) -> Result:
        prior = prior or {}
        mods = ev.modalities
        per_sample = self._per_sample(ev)
        if per_sample is not None:
            if per_sample.shape[0] == 0:
                raise EvidenceError(
                    f"balance: no rows to compute {self.of} contributions from (no evaluated rows, or "
                    "every attributed sample has zero attribution)."
                )
            contrib = per_sample.mean(axis=0)
        else:
            res = prior.get(self.of)
            if res is None:
                raise EvidenceError(
                    f"balance of={self.of!r} reads the result of the {self.of!r} diagnostic, which did not run; "
                    f"include it in the diagnostics (e.g. `only=[{self.of}, balance]`) or choose of=shapley."
                )
            contrib = _values(res, mods)
        shares = positive_share_rows(contrib)
        entropy = float(entropy_rows(shares))
        values = {m: float(shares[j]) for j, m in enumerate(mods)}

        ci: dict[str, list[float]] = {}
        value_ci = None
        if per_sample is not None:
            draws = positive_share_rows(bootstrap_weighted_mean_draws(per_sample, self.bootstrap, self.seed))
            ci = modality_intervals(mods, percentile_interval(draws, self.level))
            value_ci = percentile_interval(entropy_rows(draws), self.level).tolist()

        indices = {self.of: _indices(contrib, mods)}
        for name in measures():
            if name != self.of and name in prior:
                try:
                    indices[name] = _indices(_values(prior[name], mods), mods)
                except EvidenceError:
                    continue
        largest = {name: info["largest"] for name, info in indices.items()}
        details: dict[str, Any] = {
            "of": self.of,
            "contribution": {m: float(contrib[j]) for j, m in enumerate(mods)},
            "no_positive_contribution": bool(not (np.nan_to_num(contrib) > 0).any()),
            "min_max_ratio": min_max_ratio(shares),
            "gini": gini(shares.tolist()),
            "gap_to_fair": {m: float(shares[j] - 1.0 / len(mods)) for j, m in enumerate(mods)},
            "largest": largest[self.of],
            "measures": indices,
            "agree": len(set(largest.values())) == 1,
            "intervals": "bootstrap over evaluation rows" if per_sample is not None
            else f"none: {self.of} has no per-sample evidence to resample",
        }
        if per_sample is not None:
            details["n_rows"] = int(per_sample.shape[0])
        if details["no_positive_contribution"]:
            details["note"] = (f"no modality has a positive {self.of} contribution; shares are set uniform, "
                               "so the entropy of 1 says nothing about balance")
        return self.result(entropy, values, ci=ci, value_ci=value_ci, details=details)

    def _per_sample(self, ev: Evidence) -> np.ndarray | None:
        """[rows, M] per-sample contributions under ``of`` (None when it has no per-sample evidence)."""
        if self.of == "shapley":
            return shapley_per_sample(ev, subset_correct(ev))
        if self.of == "reliance":
            correct = subset_correct(ev)
            return np.stack([correct[ev.full_mask] - correct[without(ev, m)] for m in ev.modalities], axis=1)
        if self.of == "attribution" and ev.has("attribution"):
            shares, _ = attribution_shares(ev)
            return shares
        return None


def _values(res: Result, mods: tuple[str, ...]) -> np.ndarray:
    """[M] per-modality values of a prior result, in the evidence's modality order."""
    missing = [m for m in mods if res.per_modality.get(m) is None]
    if missing:
        raise EvidenceError(f"The {res.name} result has no value for {', '.join(missing)}.")
    return np.array([float(res.per_modality[m]) for m in mods], dtype=np.float64)


def _indices(contrib: np.ndarray, mods: tuple[str, ...]) -> dict[str, Any]:
    """Shares and balance indices of one contribution vector."""
    q = positive_share_rows(contrib)
    return {
        "shares": {m: float(q[j]) for j, m in enumerate(mods)},
        "entropy": float(entropy_rows(q)),
        "gini": gini(q.tolist()),
        "min_max_ratio": min_max_ratio(q),
        "largest": mods[int(np.argmax(q))],
    }
