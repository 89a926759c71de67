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

The other measures the reasons compare with the primary one are the registered diagnostics that
declare ``contribution``. The recommended fix is a lookup: :data:`RULES` find the problems of
:data:`PROBLEMS` in the results, in order, and the first problem that a registered fix declares in
its ``targets`` (and that can run on the model) names the fix (docs/verdict.md). The problems of
:data:`INDEPENDENT` (missing modalities under the user's deployment distribution) are looked for
without a dominance claim too; a modality whose new data drifted (``ood``) gets a sentence.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterator, Mapping, Sequence

from mmdiag.diagnostics.base import contribution_measures
from mmdiag.errors import ConfigError
from mmdiag.fixes.base import FIXES, Fix
from mmdiag.report import Result, Verdict
from mmdiag.stats import positive_shares
from mmdiag.validation import THRESHOLDS, check_fields

#: the measures the dominance call rests on, in order of preference (its thresholds are set for shares
#: of an accuracy contribution)
PRIMARY_ORDER = ("shapley", "reliance", "unimodal")

#: the problems the verdict can find, in the order it looks for them; fixes declare which they treat
#: (``Fix.targets``) and diagnostics which they argue for (``Diagnostic.argues_for``).
PROBLEMS: dict[str, str] = {
    "missing_modality": ("under the deployment distribution the user gave, missing modalities cost more "
                         "expected accuracy than ``deployment_drop``"),
    "collapsed_combination": "the accuracy of some combination of modalities collapses towards chance",
    "noisy_modality": "an under-used modality is noisy: the noise estimator is poorly calibrated for it",
    "unlearned_encoder": "an under-used modality's encoder never learned it (linear probe near chance)",
    "ignored_features": ("an under-used modality's encoder learned it but the fusion ignores it "
                         "(probe >> unimodal)"),
    "gradient_conflict": "fused and unimodal gradients conflict on an under-used modality's encoder",
    "feature_dominance": ("the dominant modality leads both factors of the dominance index: the fused head's "
                          "gradient and the feature spectrum (mdi flags it)"),
    "gradient_imbalance": "the dominant modality drives the fused head's learning signal",
}


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
        deployment_drop: full-input accuracy minus the expected accuracy under a given deployment
            distribution (``deployment``) above which missing modalities are the problem.
        ood_margin: how far a modality's share of new samples beyond the reference quantile
            (``ood``) must exceed the share the quantile expects (1 - q) to call it drifted.
    """

    mild: float = 0.2
    strong: float = 0.5
    require_separation: bool = True
    probe_gap: float = 0.15
    probe_floor: float = 0.1
    combination_floor: float = 0.1
    noise_calibration: float = 0.5
    deployment_drop: float = 0.05
    ood_margin: float = 0.1

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


def _separated(res: Result, hi: str, lo: str) -> bool:
    """hi's interval lies above lo's; on point estimates when either has no interval."""
    a, b = res.interval(hi), res.interval(lo)
    if a is None or b is None:
        return res.per_modality[hi] > res.per_modality[lo]
    return a[0] > b[1]


def _point_note(res: Result, modalities: Sequence[str]) -> str | None:
    """The reason saying the call rests on point estimates, when ``res`` has no intervals to judge by."""
    missing = [m for m in modalities if res.interval(m) is None]
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
    value, ci = res.per_modality.get(m), res.interval(m)
    if value is None or value >= 0:
        return False
    return ci is None or ci[1] < 0


@dataclass(frozen=True)
class Finding:
    """A problem found in the results (a key of :data:`PROBLEMS`) and the sentence that shows it."""

    problem: str
    reason: str


#: a rule reads the results (with the dominant and under-used modalities) and yields findings in order
Rule = Callable[[Mapping[str, Result], str, Sequence[str], "VerdictThresholds"], Iterator[Finding]]


def _collapsed_combination(results: Mapping[str, Result], dominant: str, underused: Sequence[str],
                           t: VerdictThresholds) -> Iterator[Finding]:
    comb = results.get("combinations")
    if comb is not None and comb.value is not None:
        chance = float(comb.details.get("chance", 0.0))
        if comb.value - chance <= t.combination_floor:
            yield Finding("collapsed_combination",
                          f"combinations: the weakest combination ({comb.details.get('weakest')}) is at "
                          f"{comb.value:.2f}, within {t.combination_floor} of chance {chance:.2f}")


def _missing_modality(results: Mapping[str, Result], dominant: str | None, underused: Sequence[str],
                      t: VerdictThresholds) -> Iterator[Finding]:
    """The expected accuracy under the deployment distribution the user gave (not the uniform
    default) falls more than ``deployment_drop`` below the full-input accuracy."""
    dep = results.get("deployment")
    if dep is None or dep.value is None or dep.details.get("distribution") in (None, "uniform"):
        return
    full = dep.details.get("full_accuracy")
    if isinstance(full, (int, float)) and full - dep.value > t.deployment_drop:
        yield Finding("missing_modality",
                      f"deployment: under {dep.details.get('distribution_text')} the expected accuracy is "
                      f"{dep.value:.2f}, {full - dep.value:.2f} below the full-input accuracy {full:.2f} (more "
                      f"than {t.deployment_drop}); the costliest combination is {dep.details.get('worst')} "
                      f"(accuracy {dep.details.get('worst_accuracy', float('nan')):.2f})")


def _noisy_modality(results: Mapping[str, Result], dominant: str, underused: Sequence[str],
                    t: VerdictThresholds) -> Iterator[Finding]:
    udml = results.get("udml")
    if udml is not None:
        cal = udml.details.get("spearman", {})
        noisy = [m for m in underused if cal.get(m) is not None and cal[m] < t.noise_calibration]
        if noisy:
            yield Finding("noisy_modality",
                          f"udml: noise estimator poorly calibrated for {', '.join(noisy)} (noisy modality)")


def _encoder_probe(results: Mapping[str, Result], dominant: str, underused: Sequence[str],
                   t: VerdictThresholds) -> Iterator[Finding]:
    probe, uni = results.get("probe"), results.get("unimodal")
    if probe is None or uni is None:
        return
    chance = float(uni.details.get("chance", 0.0))
    for m in underused:
        p, u = probe.per_modality.get(m), uni.per_modality.get(m)
        if p is None or u is None:
            continue
        if p - chance <= t.probe_floor:
            yield Finding("unlearned_encoder",
                          f"probe: {m}'s encoder features barely beat chance ({p:.2f}): the encoder never learned it")
        elif p - u >= t.probe_gap:
            yield Finding("ignored_features",
                          f"probe vs unimodal: {m}'s features hold {p:.2f} accuracy but the model uses {u:.2f}")


def _gradient_conflict(results: Mapping[str, Result], dominant: str, underused: Sequence[str],
                       t: VerdictThresholds) -> Iterator[Finding]:
    conflict = results.get("gradient_conflict")
    if conflict is not None:
        conflicted = [m for m in underused if _below_zero(conflict, m)]
        if conflicted:
            point = any(conflict.interval(m) is None for m in conflicted)
            what = "mean cosine below 0, a point estimate" if point else "cosine interval below 0"
            yield Finding("gradient_conflict", f"gradient_conflict: fused and unimodal gradients conflict on the "
                                               f"encoder of {', '.join(conflicted)} ({what})")


def _feature_dominance(results: Mapping[str, Result], dominant: str, underused: Sequence[str],
                       t: VerdictThresholds) -> Iterator[Finding]:
    """mdi flags the dominant modality, which also leads both of its factors: the gradient share and
    the feature-entropy share (the under-used modalities' features span fewer directions)."""
    mdi = results.get("mdi")
    if mdi is None or not mdi.details.get("dominance_flag") or mdi.details.get("dominant") != dominant:
        return
    factors = {k: mdi.details.get(k) or {} for k in ("gradient_share", "entropy_share")}
    leads = all(isinstance(v.get(dominant), (int, float)) and v[dominant] >= max(v.values()) for v in factors.values())
    if leads:
        g, h = factors["gradient_share"][dominant], factors["entropy_share"][dominant]
        yield Finding("feature_dominance", f"mdi: {dominant} dominates the index and leads both of its factors "
                                           f"(gradient share {g:.2f}, feature-entropy share {h:.2f})")


def _gradient_imbalance(results: Mapping[str, Result], dominant: str, underused: Sequence[str],
                        t: VerdictThresholds) -> Iterator[Finding]:
    yield Finding("gradient_imbalance",
                  f"{dominant} dominates the fused head's learning signal; gradient modulation slows it")


#: (the problems a rule can find, the rule), in the order of :data:`PROBLEMS`; within a rule, its
#: findings come in its own order (the probe rule goes through the under-used modalities one by one)
RULES: tuple[tuple[tuple[str, ...], Rule], ...] = (
    (("missing_modality",), _missing_modality),
    (("collapsed_combination",), _collapsed_combination),
    (("noisy_modality",), _noisy_modality),
    (("unlearned_encoder", "ignored_features"), _encoder_probe),
    (("gradient_conflict",), _gradient_conflict),
    (("feature_dominance",), _feature_dominance),
    (("gradient_imbalance",), _gradient_imbalance),
)


#: problems that stand without a dominance claim: looked for in every verdict, balanced models too
INDEPENDENT: frozenset[str] = frozenset({"missing_modality"})


def _drifted(results: Mapping[str, Result], t: VerdictThresholds) -> Iterator[str]:
    """A sentence naming the modality whose new samples drifted (``ood``): the highest share beyond the
    reference quantile, above the share the quantile expects by ``ood_margin`` (and by its interval)."""
    ood = results.get("ood")
    if ood is None or not ood.per_modality:
        return
    expected = float(ood.details.get("expected_share", 0.05))

    def drifted(m: str) -> bool:
        ci = ood.interval(m)
        return ood.per_modality[m] - expected > t.ood_margin and (ci is None or ci[0] > expected)

    found = sorted((m for m in ood.per_modality if drifted(m)), key=lambda m: -ood.per_modality[m])
    if found:
        top = found[0]
        also = f"; also {', '.join(f'{m} ({ood.per_modality[m]:.0%})' for m in found[1:])}" if found[1:] else ""
        yield (f"ood: {top} drifted: {ood.per_modality[top]:.0%} of the new samples lie beyond the reference "
               f"data's {1 - expected:.0%} quantile of {top}'s prototype distance ({expected:.0%} expected){also}")


def fixes_for(problem: str, has_encoders: bool | None = None) -> list[str]:
    """Registered fixes (plug-ins included) whose ``targets`` name ``problem`` and that can run on the
    model, best first.

    A model without known encoders (``has_encoders=False``) rules out the fixes that need them.
    Otherwise the fixes that act on the encoders come first, where the imbalance arises; ties keep
    the registry's order (built-in fixes, then plug-ins).
    """
    found: list[type[Fix]] = [cls for cls in FIXES.classes() if problem in cls.targets]
    if has_encoders is False:
        found = [cls for cls in found if not cls.needs_encoders]
    return [cls.name for cls in sorted(found, key=lambda cls: not cls.needs_encoders)]


def recommend_fix(results: Mapping[str, Result], dominant: str | None, underused: Sequence[str],
                  t: VerdictThresholds, has_encoders: bool | None = None,
                  independent_only: bool = False) -> tuple[str | None, list[str]]:
    """The fix that matches the diagnosis (methods.md §19) and the reasons for it.

    The first finding of :data:`RULES` for which :func:`fixes_for` names a fix decides; a finding no
    registered fix can treat on this model is reported and the search goes on. ``has_encoders``:
    whether the model's encoders are known (None: unknown, treated as known).
    """
    reasons: list[str] = []
    for problems, rule in RULES:
        if independent_only and not set(problems) <= INDEPENDENT:
            continue
        for finding in rule(results, dominant, underused, t):
            reasons.append(finding.reason)
            fixes = fixes_for(finding.problem, has_encoders)
            if fixes:
                return fixes[0], reasons
            where = "a model whose encoders are not known" if has_encoders is False else "this model"
            reasons.append(f"no registered fix that targets {finding.problem} can run on {where}")
    return None, reasons


def judge(results: Mapping[str, Result], modalities: Sequence[str],
          thresholds: VerdictThresholds | None = None, has_encoders: bool | None = None) -> Verdict:
    """Combine diagnostic results into a :class:`~mmdiag.report.Verdict`.

    The dominance call and its fix come first; without a dominance claim, the problems of
    :data:`INDEPENDENT` can still name a fix (a balanced model may not survive missing modalities).
    A sentence naming a drifted modality (``ood``) closes the reasons.

    Args:
        results: diagnostic name -> result.
        modalities: the model's modalities.
        thresholds: the verdict's thresholds (defaults when None).
        has_encoders: whether the model's encoders are known; False rules out the fixes that need
            them (None: unknown, treated as known).
    """
    t = thresholds or VerdictThresholds()
    verdict = _dominance(results, modalities, t, has_encoders)
    if verdict.severity == "none" and verdict.recommended_fix is None:
        fix, fix_reasons = recommend_fix(results, None, [], t, has_encoders, independent_only=True)
        verdict = replace(verdict, recommended_fix=fix, reasons=verdict.reasons + fix_reasons)
    drift = list(_drifted(results, t))
    return replace(verdict, reasons=verdict.reasons + drift) if drift else verdict


def _dominance(results: Mapping[str, Result], modalities: Sequence[str], t: VerdictThresholds,
               has_encoders: bool | None) -> Verdict:
    """The dominant and under-used modalities, the severity, and the fix for a dominance claim."""
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
    for n in contribution_measures():
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
        no_intervals = all(primary.interval(m) is None for m in modalities)
        why = (f"the point estimates of {dominant} and the other modalities are equal" if no_intervals else
               f"the bootstrap intervals of {dominant} and the other modalities overlap")
        reasons.insert(0, f"{why}, so no dominance is claimed")
        return Verdict(None, [], "none", None, reasons)
    severity = "strong" if index >= t.strong else "mild" if index >= t.mild else "none"
    if severity == "none":
        reasons.insert(0, f"dominance index {index:.2f} is below the mild threshold {t.mild}")
        return Verdict(None, [], "none", None, reasons)
    underused = [m for m in separated if shares[m] < 1.0 / len(modalities)]
    fix, fix_reasons = recommend_fix(results, dominant, underused, t, has_encoders)
    return Verdict(dominant, underused, severity, fix, reasons + fix_reasons)
