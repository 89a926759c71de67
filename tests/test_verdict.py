"""The verdict: separation, severity thresholds, under-used modalities and the fix table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest

from mmdiag.diagnostics import Diagnostic
from mmdiag.errors import ConfigError
from mmdiag.fixes import FIXES, Fix
from mmdiag.report import Result
from mmdiag.verdict import PROBLEMS, RULES, VerdictThresholds, dominance_index, fixes_for, judge


def res(name, values, half_width=0.02, **details):
    return Result(name=name, value=None, per_modality=values,
                  ci={m: [v - half_width, v + half_width] for m, v in values.items()}, details=details)


MODS = ["audio", "visual"]


def test_strong_mild_none_by_dominance_index():
    strong = judge({"shapley": res("shapley", {"audio": 0.6, "visual": 0.05})}, MODS)
    assert strong.severity == "strong" and strong.dominant == "audio" and strong.underused == ["visual"]
    assert strong.recommended_fix == "ogm_ge"
    mild = judge({"shapley": res("shapley", {"audio": 0.4, "visual": 0.2})}, MODS)
    assert mild.severity == "mild"
    none = judge({"shapley": res("shapley", {"audio": 0.32, "visual": 0.3})}, MODS)
    assert none.severity == "none" and none.dominant is None


def test_no_claim_when_intervals_overlap():
    v = judge({"shapley": res("shapley", {"audio": 0.6, "visual": 0.05}, half_width=0.4)}, MODS)
    assert v.severity == "none" and "overlap" in v.reasons[0]
    v = judge({"shapley": res("shapley", {"audio": 0.6, "visual": 0.05}, half_width=0.4)}, MODS,
              VerdictThresholds(require_separation=False))
    assert v.severity == "strong"


def test_fix_table():
    base = {"shapley": res("shapley", {"audio": 0.6, "visual": 0.05}),
            "unimodal": res("unimodal", {"audio": 0.9, "visual": 0.3}, chance=0.1)}
    assert judge({**base, "probe": res("probe", {"audio": 0.9, "visual": 0.8})}, MODS).recommended_fix == "arl"
    assert judge({**base, "probe": res("probe", {"audio": 0.9, "visual": 0.15})}, MODS).recommended_fix == "cal"
    comb = Result("combinations", 0.12, {"audio": 0.3, "visual": 0.9}, details={"chance": 0.1, "weakest": "visual"})
    assert judge({**base, "combinations": comb}, MODS).recommended_fix == "modality_dropout"
    udml = res("udml", {"audio": 1.0, "visual": 1.0}, spearman={"audio": 0.9, "visual": 0.2})
    assert judge({**base, "udml": udml}, MODS).recommended_fix == "udml"
    conflict = res("gradient_conflict", {"audio": 0.5, "visual": -0.3})
    assert judge({**base, "gradient_conflict": conflict}, MODS).recommended_fix == "mmpareto"
    # a negative mean whose interval reaches above 0 is batch noise, not a conflict
    noisy = Result("gradient_conflict", -0.3, {"audio": 0.5, "visual": -0.3},
                   ci={"audio": [0.3, 0.7], "visual": [-0.6, 0.2]})
    assert judge({**base, "gradient_conflict": noisy}, MODS).recommended_fix == "ogm_ge"
    clear = Result("gradient_conflict", -0.3, {"audio": 0.5, "visual": -0.3},
                   ci={"audio": [0.3, 0.7], "visual": [-0.5, -0.1]})
    v = judge({**base, "gradient_conflict": clear}, MODS)
    assert v.recommended_fix == "mmpareto" and any("interval below 0" in r for r in v.reasons)


def test_disagreeing_measures_are_reported():
    v = judge({"shapley": res("shapley", {"audio": 0.6, "visual": 0.05}),
               "attribution": res("attribution", {"audio": 0.3, "visual": 0.7})}, MODS)
    assert any("disagree" in r and "attribution (visual)" in r for r in v.reasons)


def test_dominance_index_range_and_threshold_validation():
    assert dominance_index({"a": 0.5, "b": 0.5}) == 0
    assert dominance_index({"a": 1.0, "b": 0.0, "c": 0.0}) == pytest.approx(1.0)
    with pytest.raises(ConfigError):
        VerdictThresholds(mild=0.6, strong=0.5)


def point_only(name, values, bootstrap=0, empty=False):
    """A result as bootstrap = 0 leaves it: point values, no intervals (null or NaN ends, or none)."""
    ci = {} if empty else {m: [float("nan"), float("nan")] for m in values}
    return Result(name=name, value=None, per_modality=values, ci=ci, params={"bootstrap": bootstrap})


@pytest.mark.parametrize("ci", ["nan", "null", "empty", "none"])
def test_without_intervals_the_call_rests_on_point_estimates(ci):
    values = {"audio": 0.594, "visual": 0.006}  # audio holds 99% of the contribution
    if ci == "nan":
        r = point_only("shapley", values)
    elif ci == "null":  # as read back from report.json
        r = Result("shapley", None, values, ci={m: [None, None] for m in values}, params={"bootstrap": 0})
    elif ci == "empty":
        r = point_only("shapley", values, empty=True)
    else:
        r = Result("shapley", None, values, ci=None, params={"bootstrap": 0})  # type: ignore[arg-type]
    v = judge({"shapley": r}, MODS)
    assert v.dominant == "audio" and v.severity == "strong" and v.underused == ["visual"]
    text = " ".join(v.reasons)
    assert "point estimates" in text and "bootstrap = 0" in text
    assert "interval" not in text.replace("no bootstrap intervals were computed", "")


def test_point_estimates_keep_the_thresholds_and_never_cite_overlap():
    mild = judge({"shapley": point_only("shapley", {"audio": 0.4, "visual": 0.2})}, MODS)
    assert mild.severity == "mild"
    none = judge({"shapley": point_only("shapley", {"audio": 0.32, "visual": 0.3})}, MODS)
    assert none.severity == "none" and "below the mild threshold" in none.reasons[0]
    tie = judge({"shapley": point_only("shapley", {"audio": 0.3, "visual": 0.3})}, MODS)
    assert tie.severity == "none" and "point estimates" in tie.reasons[0]
    for v in (mild, none, tie):
        assert not any("overlap" in r for r in v.reasons)


def test_point_estimates_in_the_fix_reasons_do_not_mention_intervals():
    base = {"shapley": point_only("shapley", {"audio": 0.6, "visual": 0.05})}
    conflict = point_only("gradient_conflict", {"audio": 0.5, "visual": -0.3})
    v = judge({**base, "gradient_conflict": conflict}, MODS)
    assert v.recommended_fix == "mmpareto"
    assert any("point estimate" in r for r in v.reasons) and not any("cosine interval" in r for r in v.reasons)


def test_missing_intervals_without_bootstrap_0_are_named_too():
    r = point_only("shapley", {"audio": 0.6, "visual": 0.05}, bootstrap=1000)
    v = judge({"shapley": r}, MODS)
    assert v.severity == "strong"
    assert any("shapley has no interval for audio, visual" in x and "point estimates" in x for x in v.reasons)


# ------------------------------------------------------------------- the fix lookup over declarations


def mdi_result(flag=True, dominant="audio", gradient=(0.8, 0.2), entropy=(0.6, 0.4)):
    return Result("mdi", 0.9, {"audio": 0.7, "visual": 0.3},
                  details={"dominance_flag": flag, "dominant": dominant if flag else None,
                           "gradient_share": dict(zip(MODS, gradient)), "entropy_share": dict(zip(MODS, entropy))})


def test_agm_is_recommended_for_a_black_box_where_ogm_ge_cannot_run():
    results = {"shapley": res("shapley", {"audio": 0.6, "visual": 0.05})}
    assert judge(results, MODS).recommended_fix == "ogm_ge"
    assert judge(results, MODS, has_encoders=True).recommended_fix == "ogm_ge"
    v = judge(results, MODS, has_encoders=False)
    assert v.recommended_fix == "agm" and "gradient modulation slows it" in v.reasons[-1]
    # a collapsed combination is still modality_dropout's, which needs no encoders either
    comb = Result("combinations", 0.12, {"audio": 0.3, "visual": 0.9}, details={"chance": 0.1, "weakest": "visual"})
    assert judge({**results, "combinations": comb}, MODS, has_encoders=False).recommended_fix == "modality_dropout"


def test_mdacl_when_mdi_flags_the_dominant_modality_leading_both_factors():
    base = {"shapley": res("shapley", {"audio": 0.6, "visual": 0.05})}
    v = judge({**base, "mdi": mdi_result()}, MODS)
    assert v.recommended_fix == "mdacl" and any("leads both of its factors" in r for r in v.reasons)
    # driven by the gradient alone (visual's features are the richer ones): gradient modulation
    assert judge({**base, "mdi": mdi_result(entropy=(0.4, 0.6))}, MODS).recommended_fix == "ogm_ge"
    assert judge({**base, "mdi": mdi_result(flag=False)}, MODS).recommended_fix == "ogm_ge"
    assert judge({**base, "mdi": mdi_result(dominant="visual")}, MODS).recommended_fix == "ogm_ge"
    # the more specific findings come first
    conflict = res("gradient_conflict", {"audio": 0.5, "visual": -0.3})
    assert judge({**base, "mdi": mdi_result(), "gradient_conflict": conflict}, MODS).recommended_fix == "mmpareto"
    # on a black box mdi cannot run, and mdacl needs encoders anyway
    assert judge({**base, "mdi": mdi_result()}, MODS, has_encoders=False).recommended_fix == "agm"


@dataclass
class BlackBoxPareto(Fix):
    """A registered fix that treats gradient conflicts without encoders."""

    name: ClassVar[str] = "black_box_pareto"
    summary: ClassVar[str] = "test fix"
    targets: ClassVar[tuple[str, ...]] = ("gradient_conflict",)
    needs_encoders: ClassVar[bool] = False


def test_the_recommendation_is_a_lookup_over_the_registered_fixes(monkeypatch):
    base = {"shapley": res("shapley", {"audio": 0.6, "visual": 0.05}),
            "gradient_conflict": res("gradient_conflict", {"audio": 0.5, "visual": -0.3})}
    # without a fix for the finding on a black box, the verdict says so and goes on
    v = judge(base, MODS, has_encoders=False)
    assert v.recommended_fix == "agm"
    assert any("no registered fix that targets gradient_conflict can run" in r for r in v.reasons)
    monkeypatch.setattr(FIXES, "_items", {**FIXES._items, BlackBoxPareto.name: BlackBoxPareto})
    assert fixes_for("gradient_conflict") == ["mmpareto", "black_box_pareto"]  # encoder-level first
    assert judge(base, MODS, has_encoders=False).recommended_fix == "black_box_pareto"
    assert judge(base, MODS).recommended_fix == "mmpareto"
    # no fix registered for anything: no recommendation, and reasons for each finding
    monkeypatch.setattr(FIXES, "_items", {})
    v = judge(base, MODS)
    assert v.recommended_fix is None and v.dominant == "audio"


def test_problems_fixes_and_diagnostics_declare_one_vocabulary():
    from mmdiag.diagnostics import DIAGNOSTICS

    assert [p for problems, _ in RULES for p in problems] == list(PROBLEMS)  # one rule each, in order
    for cls in FIXES.classes():
        assert set(cls.targets) <= set(PROBLEMS), cls.name
        assert cls.targets or cls.name == "none", f"{cls.name} declares no targets: the verdict can never recommend it"
    argued = set()
    for cls in DIAGNOSTICS.classes():
        assert set(cls.argues_for) <= set(PROBLEMS), cls.name
        argued |= set(cls.argues_for)
    for problem in PROBLEMS:
        assert fixes_for(problem), f"no registered fix targets {problem}"
        assert problem in argued, f"no diagnostic argues for {problem}"
    for name in FIXES.names():  # every built-in fix can be recommended
        if name != "none":
            assert any(name in fixes_for(p, has) for p in PROBLEMS for has in (True, False)), name


@dataclass(frozen=True)
class Loudness(Diagnostic):
    """A stand-in contribution measure registered for one test."""

    name: ClassVar[str] = "loudness"
    summary: ClassVar[str] = "test measure"
    contribution: ClassVar[bool] = True

    def compute(self, ev, prior=None):  # pragma: no cover - never run here
        raise NotImplementedError


def test_the_compared_measures_are_the_declared_contribution_measures(monkeypatch):
    from mmdiag.diagnostics import DIAGNOSTICS

    results = {"shapley": res("shapley", {"audio": 0.6, "visual": 0.05}),
               "loudness": res("loudness", {"audio": 0.1, "visual": 0.9}),
               "unimodal": res("unimodal", {"audio": 0.2, "visual": 0.9}, chance=0.1)}
    assert not any("loudness" in r for r in judge(results, MODS).reasons)  # not registered: not compared
    monkeypatch.setattr(DIAGNOSTICS, "_items", {**DIAGNOSTICS._items, "loudness": Loudness})
    reasons = judge(results, MODS).reasons
    assert any("loudness (visual)" in r and "disagree" in r for r in reasons)
    assert not any("unimodal (" in r for r in reasons)  # unimodal declares no contribution


def test_the_analysis_tells_the_verdict_whether_the_encoders_are_known():
    from mmdiag.api import analyze_evidence
    from tests.helpers.toys import DOMINANT, toy_evidence

    ev = toy_evidence(DOMINANT, 0)
    ev.meta["encoders"] = None  # what the adapter records for a black box
    black_box = analyze_evidence(ev, only=["shapley"], bootstrap=50).verdict
    assert black_box.dominant == "audio" and black_box.recommended_fix == "agm"
    ev.meta["encoders"] = {"audio": "audio_net", "visual": "visual_net"}
    assert analyze_evidence(ev, only=["shapley"], bootstrap=50).verdict.recommended_fix == "ogm_ge"
