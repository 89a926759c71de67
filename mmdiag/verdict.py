"""The verdict: which modality dominates, which are under-used, how badly, and which fix matches.

The primary contribution measure is ``shapley`` (else ``reliance``, else ``unimodal``). With
shares q_m = max(phi_m, 0) / sum_k max(phi_k, 0) and the candidate d = argmax_m q_m, the
*dominance index* is D = (q_d - 1/M) / (1 - 1/M): 0 when every modality contributes equally, 1
when d does everything. A dominance claim needs the bootstrap intervals to separate: d's interval
must lie above the interval of at least one other modality. Severity is ``strong`` when D >=
``strong`` (default 0.5), ``mild`` when D >= ``mild`` (default 0.2), else ``none``. Under-used
modalities are those whose interval lies below d's and whose share is below the fair share 1/M.

Without intervals (``bootstrap = 0``, or a measure that reports none) the same rules run on the point
estimates: d's value must exceed another modality's value, and the reasons say that the call rests
on point estimates.
"""

from __future__ import annotations

import math
import numbers

from dataclasses import dataclass
from typing import Mapping, Sequence

from mmdiag.errors import ConfigError
from mmdiag.report import Result, Verdict
from mmdiag.stats import positive_shares
from mmdiag.validation import THRESHOLDS, check_fields

PRIMARY_ORDER = ("shapley", "reliance", "unimodal")
#: diagnostics whose per-modality values grow with a modality's contribution (compared in the reasons)
CONTRIBUTION_MEASURES = ("shapley", "reliance", "cal", "mdi", "attribution", "ogm", "perceptual")


@dataclass(frozen=True)
class VerdictThresholds:
    """Thresholds of the verdict (all documented in docs/verdict.md).

    Attributes:
        mild: dominance index from which dominance is called mild.
        strong: dominance index from which dominance is called strong.
        require_separation: claim dominance only when bootstrap intervals separate.
        probe_gap: probe accuracy minus unimodal accuracy above which an encoder counts as
            "learned but ignored by the fusion".
        probe_floor: probe accuracy above chance by less than this means "never learned".
        combination_floor: weakest-combination accuracy within this of chance counts as collapsed.
        noise_calibration: Spearman correlation of the UDML noise estimator below which a
            modality is called noisy/unreliable.
    """

    mild: float = 0.2
    strong: float = 0.5
    require_separation: bool = True
    probe_gap: float = 0.15
    probe_floor: float = 0.1
    combination_floor: float = 0.1
    noise_calibration: float = 0.5

    def __post_init__(self) -> None:
        check_fields(self.__dict__, THRESHOLDS, lambda name: f"VerdictThresholds.{name}")
        if not 0 <= self.mild <= self.strong <= 1:
            raise ConfigError(
                f"Verdict thresholds must satisfy 0 <= mild <= strong <= 1; found mild={self.mild}, strong={self.strong}."
            )


def dominance_index(shares: Mapping[str, float]) -> float:
    """(max share - 1/M) / (1 - 1/M): 0 balanced, 1 one modality does everything."""
    m = len(shares)
    return (max(shares.values()) - 1.0 / m) / (1.0 - 1.0 / m)


def _interval(res: Result, m: str) -> tuple[float, float] | None:
    """Modality m's [low, high] interval, or None when none was computed (bootstrap 0: null or NaN ends)."""
    ci = (res.ci or {}).get(m)
    if not isinstance(ci, (list, tuple)) or len(ci) != 2:
        return None
    if any(isinstance(c, bool) or not isinstance(c, numbers.Real) or not math.isfinite(c) for c in ci):
        return None
    return float(ci[0]), float(ci[1])


def _separated(res: Result, hi: str, lo: str) -> bool:
    """hi's interval lies above lo's; on point estimates when either has no interval."""
    a, b = _interval(res, hi), _interval(res, lo)
    if a is None or b is None:
        return res.per_modality[hi] > res.per_modality[lo]
    return a[0] > b[1]


def _point_note(res: Result, modalities: Sequence[str]) -> str | None:
    """The reason saying the call rests on point estimates, when ``res`` has no intervals to judge by."""
    missing = [m for m in modalities if _interval(res, m) is None]
    if not missing:
        return None
    if (res.params or {}).get("bootstrap") == 0:
        return ("no bootstrap intervals were computed (bootstrap = 0), so the call rests on point estimates: "
                "the thresholds are applied to the point values")
    return (f"{res.name} has no interval for {', '.join(missing)}, so the call rests on point estimates: "
            "the thresholds are applied to the point values")


def _below_zero(res: Result, m: str) -> bool:
    """Whether modality m's value is negative, and its interval too when it has one: per-batch
    gradient cosines are noisy, so a mean below 0 whose interval reaches above 0 is no conflict."""
    value, ci = res.per_modality.get(m), _interval(res, m)
    if value is None or value >= 0:
        return False
    return ci is None or ci[1] < 0


def recommend_fix(results: Mapping[str, Result], dominant: str, underused: Sequence[str],
                  t: VerdictThresholds) -> tuple[str, list[str]]:
    """The fix that matches the diagnosis (methods.md §19) and the reasons for it."""
    reasons: list[str] = []
    comb = results.get("combinations")
    if comb is not None and comb.value is not None:
        chance = float(comb.details.get("chance", 0.0))
        if comb.value - chance <= t.combination_floor:
            reasons.append(
                f"combinations: the weakest combination ({comb.details.get('weakest')}) is at "
                f"{comb.value:.2f}, within {t.combination_floor} of chance {chance:.2f}"
            )
            return "modality_dropout", reasons
    udml = results.get("udml")
    if udml is not None:
        cal = udml.details.get("spearman", {})
        noisy = [m for m in underused if cal.get(m) is not None and cal[m] < t.noise_calibration]
        if noisy:
            reasons.append(f"udml: noise estimator poorly calibrated for {', '.join(noisy)} (noisy modality)")
            return "udml", reasons
    probe, uni = results.get("probe"), results.get("unimodal")
    if probe is not None and uni is not None and underused:
        chance = float(uni.details.get("chance", 0.0))
        for m in underused:
            p, u = probe.per_modality.get(m), uni.per_modality.get(m)
            if p is None or u is None:
                continue
            if p - chance <= t.probe_floor:
                reasons.append(f"probe: {m}'s encoder features barely beat chance ({p:.2f}): the encoder never learned it")
                return "cal", reasons
            if p - u >= t.probe_gap:
                reasons.append(f"probe vs unimodal: {m}'s features hold {p:.2f} accuracy but the model uses {u:.2f}")
                return "arl", reasons
    conflict = results.get("gradient_conflict")
    if conflict is not None:
        conflicted = [m for m in underused if _below_zero(conflict, m)]
        if conflicted:
            point = any(_interval(conflict, m) is None for m in conflicted)
            what = "mean cosine below 0, a point estimate" if point else "cosine interval below 0"
            reasons.append(f"gradient_conflict: fused and unimodal gradients conflict on the encoder of "
                           f"{', '.join(conflicted)} ({what})")
            return "mmpareto", reasons
    reasons.append(f"{dominant} dominates the fused head's learning signal; gradient modulation slows it")
    return "ogm_ge", reasons


def judge(results: Mapping[str, Result], modalities: Sequence[str],
          thresholds: VerdictThresholds | None = None) -> Verdict:
    """Combine diagnostic results into a :class:`~mmdiag.report.Verdict`."""
    t = thresholds or VerdictThresholds()
    primary = next((results[n] for n in PRIMARY_ORDER if n in results), None)
    if primary is None:
        return Verdict(None, [], "none", None, ["no contribution diagnostic ran (shapley, reliance or unimodal)"])
    values = {m: float(primary.per_modality[m]) for m in modalities}
    shares = positive_shares(values)
    dominant = max(shares, key=shares.__getitem__)
    index = dominance_index(shares)
    separated = [m for m in modalities if m != dominant and _separated(primary, dominant, m)]
    reasons = [
        f"{primary.name}: {dominant} holds {shares[dominant]:.0%} of the positive contribution "
        f"(dominance index {index:.2f}; " + ", ".join(f"{m} {values[m]:+.3f}" for m in modalities) + ")"
    ]
    point_note = _point_note(primary, modalities)
    if point_note:
        reasons.append(point_note)
    agree, disagree = [], []
    for n in CONTRIBUTION_MEASURES:
        if n in results and n != primary.name and results[n].per_modality:
            top = max(results[n].per_modality, key=results[n].per_modality.__getitem__)
            (agree if top == dominant else disagree).append(f"{n} ({top})" if top != dominant else n)
    if agree:
        reasons.append(f"{', '.join(agree)} agree{'s' if len(agree) == 1 else ''} that {dominant} is relied on most")
    if disagree:
        reasons.append(
            f"{', '.join(disagree)} rank{'s' if len(disagree) == 1 else ''} another modality first: the measures "
            "disagree, which happens when modalities interact; read them side by side"
        )
    if t.require_separation and not separated:
        no_intervals = all(_interval(primary, m) is None for m in modalities)
        why = (f"the point estimates of {dominant} and the other modalities are equal" if no_intervals else
               f"the bootstrap intervals of {dominant} and the other modalities overlap")
        reasons.insert(0, f"{why}, so no dominance is claimed")
        return Verdict(None, [], "none", None, reasons)
    severity = "strong" if index >= t.strong else "mild" if index >= t.mild else "none"
    if severity == "none":
        reasons.insert(0, f"dominance index {index:.2f} is below the mild threshold {t.mild}")
        return Verdict(None, [], "none", None, reasons)
    underused = [m for m in separated if shares[m] < 1.0 / len(modalities)]
    fix, fix_reasons = recommend_fix(results, dominant, underused, t)
    return Verdict(dominant, underused, severity, fix, reasons + fix_reasons)
