"""The verdict: separation, severity thresholds, under-used modalities and the fix table."""

from __future__ import annotations

import pytest

from mmdiag.errors import ConfigError
from mmdiag.report import Result
from mmdiag.verdict import VerdictThresholds, dominance_index, judge


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
