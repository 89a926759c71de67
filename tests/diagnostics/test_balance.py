"""balance: normalised entropy of the modalities' contribution shares."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmdiag.api import build_diagnostics
from mmdiag.diagnostics import DIAGNOSTICS
from mmdiag.errors import ConfigError, EvidenceError
from mmdiag.evidence import Evidence
from mmdiag.report import Result
from tests.helpers.toys import BALANCED, DOMINANT, names_for, toy_evidence

BAL = DIAGNOSTICS.get("balance")


# ------------------------------------------------------------------------------------ helpers
def random_evidence(seed: int, m_count: int, n: int, n_classes: int = 3, strengths: list[float] | None = None,
                    with_attribution: bool = True) -> Evidence:
    """Subset logits where each present modality adds a noisy vote for the true class."""
    rng = np.random.default_rng(seed)
    strengths = strengths if strengths is not None else list(rng.uniform(0.0, 3.0, size=m_count))
    labels = rng.integers(0, n_classes, size=n)
    votes = rng.normal(size=(m_count, n, n_classes))
    for j, s in enumerate(strengths):
        votes[j, np.arange(n), labels] += s
    subsets = np.zeros((1 << m_count, n, n_classes))
    for mask in range(1 << m_count):
        for j in range(m_count):
            if mask >> j & 1:
                subsets[mask] += votes[j]
    subsets += 0.3 * rng.normal(size=subsets.shape)
    attribution = rng.exponential(size=(n, m_count)) * np.asarray(strengths)[None] if with_attribution else None
    return Evidence(
        modalities=tuple(names_for(m_count)),
        n_classes=n_classes,
        labels=torch.as_tensor(labels),
        logits=torch.as_tensor(subsets[-1], dtype=torch.float32),
        index=torch.arange(n),
        subsets=torch.as_tensor(subsets, dtype=torch.float32),
        attribution=None if attribution is None else torch.as_tensor(attribution, dtype=torch.float32),
        attribution_rows=None if attribution is None else torch.arange(n),
    )


def relabel(ev: Evidence, perm: list[int], names: list[str]) -> Evidence:
    """Evidence with modality j of the new order = modality perm[j] of the old, renamed names[j]."""
    m_count = ev.n_modalities
    new_subsets = torch.empty_like(ev.subsets)
    for new_mask in range(1 << m_count):
        old_mask = sum(1 << perm[j] for j in range(m_count) if new_mask >> j & 1)
        new_subsets[new_mask] = ev.subsets[old_mask]
    kw = ev.to_dict()
    kw.update(modalities=tuple(names), subsets=new_subsets)
    if ev.attribution is not None:
        kw["attribution"] = ev.attribution[:, perm]
    return Evidence.from_dict(kw)


def reference_contributions(ev: Evidence, of: str) -> list[float]:
    """Slow, obviously-correct mean contributions: Shapley as the average marginal gain over all
    orderings of the modalities, reliance as full minus leave-one-out, attribution as mean share."""
    mods = list(ev.modalities)
    m_count = len(mods)
    n = ev.n_samples

    hits = (ev.subsets.argmax(-1) == ev.labels[None]).tolist()  # [2^M][N] correctness per subset

    def correct(present: set[int], i: int) -> float:
        return float(hits[sum(1 << j for j in present)][i])

    out = [0.0] * m_count
    if of == "attribution":
        rows = [r for r in ev.attribution.tolist() if sum(r) > 0]
        for r in rows:
            for j in range(m_count):
                out[j] += r[j] / sum(r) / len(rows)
        return out
    for i in range(n):
        if of == "shapley":
            orders = list(itertools.permutations(range(m_count)))
            for order in orders:
                present: set[int] = set()
                for j in order:
                    before = correct(present, i)
                    present = present | {j}
                    out[j] += (correct(present, i) - before) / len(orders) / n
        else:
            full = correct(set(range(m_count)), i)
            for j in range(m_count):
                out[j] += (full - correct(set(range(m_count)) - {j}, i)) / n
    return out


def reference_indices(contrib: list[float]) -> dict:
    pos = [max(c, 0.0) for c in contrib]
    total = sum(pos)
    q = [p / total for p in pos] if total > 0 else [1.0 / len(pos)] * len(pos)
    entropy = -sum(x * math.log(x) for x in q if x > 0) / math.log(len(q))
    gini = sum(abs(a - b) for a in q for b in q) / (2 * len(q) * sum(q))
    return {"shares": q, "entropy": entropy, "gini": gini, "ratio": min(q) / max(q)}


def check_against_reference(ev: Evidence, res: Result, of: str) -> None:
    ref = reference_indices(reference_contributions(ev, of))
    assert list(res.per_modality.values()) == pytest.approx(ref["shares"], abs=1e-9)
    assert res.value == pytest.approx(ref["entropy"], abs=1e-9)
    assert res.details["gini"] == pytest.approx(ref["gini"], abs=1e-9)
    assert res.details["min_max_ratio"] == pytest.approx(ref["ratio"], abs=1e-9)
    m_count = ev.n_modalities
    for j, m in enumerate(ev.modalities):
        assert res.details["gap_to_fair"][m] == pytest.approx(ref["shares"][j] - 1 / m_count, abs=1e-9)


# ------------------------------------------------------------------------------------ config
def test_unknown_measure_is_a_config_error_listing_the_choices() -> None:
    # the choices are the registry's declared shareable contribution measures, not a list kept here
    choices = tuple(n for n in DIAGNOSTICS.names()
                    if DIAGNOSTICS.get(n).contribution and DIAGNOSTICS.get(n).shareable)
    assert {"shapley", "reliance", "cal", "mdi", "attribution", "perceptual"} <= set(choices)
    assert "ogm" not in choices and "balance" not in choices  # a ratio, and balance itself
    assert BAL.uses == choices
    with pytest.raises(ConfigError, match=", ".join(choices)):
        BAL(of="entropy")
    with pytest.raises(ConfigError, match="Did you mean 'reliance'"):
        BAL(of="relaince")
    # perceptual declares itself shareable, so balance summarises it from its result
    ev = random_evidence(seed=1, m_count=2, n=40)
    first, second = ev.modalities
    perceptual = Result(name="perceptual", value=None, per_modality={first: 0.3, second: 0.1})
    res = BAL(of="perceptual").compute(ev, {"perceptual": perceptual})
    assert res.per_modality == pytest.approx({first: 0.75, second: 0.25}) and res.details["largest"] == first
    with pytest.raises(ConfigError, match="of='shap'"):
        build_diagnostics(["balance"], {"balance": {"of": "shap"}})
    assert BAL.param_names() == ["of"]


# ------------------------------------------------------------------------------------ (a) reference
@pytest.mark.parametrize("m_count", [2, 3, 5])
@pytest.mark.parametrize("of", ["shapley", "reliance", "attribution"])
def test_matches_reference_on_hand_built_evidence(m_count: int, of: str) -> None:
    ev = random_evidence(seed=m_count, m_count=m_count, n=30 if m_count == 5 else 60)
    res = BAL(of=of, bootstrap=200).compute(ev)
    check_against_reference(ev, res, of)
    assert res.details["of"] == of and res.details["intervals"] == "bootstrap over evaluation rows"
    for m in ev.modalities:
        lo, hi = res.ci[m]
        assert 0.0 <= lo <= hi <= 1.0
    assert 0.0 <= res.value_ci[0] <= res.value_ci[1] <= 1.0


@pytest.mark.parametrize("of", ["shapley", "reliance", "attribution"])
def test_matches_reference_on_toy(of: str) -> None:
    ev = toy_evidence(DOMINANT, 0)
    check_against_reference(ev, BAL(of=of, bootstrap=100).compute(ev), of)


def test_agrees_with_the_shapley_and_reliance_diagnostics_and_lists_every_measure() -> None:
    ev = toy_evidence(DOMINANT, 0)
    prior = {n: DIAGNOSTICS.get(n)(bootstrap=50).compute(ev) for n in ("shapley", "reliance", "attribution")}
    res = BAL(bootstrap=100).compute(ev, prior)
    shares = prior["shapley"].details["shares"]
    assert res.per_modality == pytest.approx(shares, abs=1e-12)
    assert set(res.details["measures"]) == {"shapley", "reliance", "attribution"}
    assert list(res.details["measures"]["reliance"]["shares"].values()) == pytest.approx(
        reference_indices(list(prior["reliance"].per_modality.values()))["shares"])
    assert res.details["agree"] is True and res.details["largest"] == "audio"


def test_measures_without_per_sample_evidence_come_from_prior() -> None:
    ev = random_evidence(seed=4, m_count=3, n=40)
    cal = Result(name="cal", value=None, per_modality={"m0": 0.5, "m1": 0.3, "m2": 0.2})
    mdi = Result(name="mdi", value=None, per_modality={"m0": 0.2, "m1": 0.7, "m2": 0.1})
    res = BAL(of="cal").compute(ev, {"cal": cal, "mdi": mdi})
    assert res.per_modality == pytest.approx({"m0": 0.5, "m1": 0.3, "m2": 0.2})
    assert res.ci == {} and res.value_ci is None
    assert res.details["intervals"].startswith("none")
    assert res.details["measures"]["mdi"]["largest"] == "m1"
    assert res.details["agree"] is False
    with pytest.raises(EvidenceError, match="include it"):
        BAL(of="mdi").compute(ev, {"cal": cal})
    # attribution without attribution evidence falls back to the attribution result
    ev.attribution = None
    attr = Result(name="attribution", value=None, per_modality={"m0": 0.6, "m1": 0.2, "m2": 0.2})
    res = BAL(of="attribution").compute(ev, {"attribution": attr})
    assert res.per_modality == pytest.approx({"m0": 0.6, "m1": 0.2, "m2": 0.2}) and res.ci == {}
    with pytest.raises(EvidenceError, match="attribution"):
        BAL(of="attribution").compute(ev, {})


# ------------------------------------------------------------------------------------ (b) edge cases
def test_one_class_absent() -> None:
    ev = toy_evidence(DOMINANT, 0)
    sub = ev.select_rows(torch.nonzero(ev.labels != 1)[:, 0])
    assert 1 not in sub.labels.tolist()
    check_against_reference(sub, BAL(bootstrap=50).compute(sub), "shapley")


def test_constant_modality_gets_zero_share_without_nan() -> None:
    ev = random_evidence(seed=2, m_count=2, n=40, strengths=[2.0, 0.0])
    # make visual irrelevant: masking it never changes the logits
    ev.subsets[2] = ev.subsets[0]
    ev.subsets[3] = ev.subsets[1]
    ev.logits = ev.subsets[3].clone()
    ev.attribution[:, 1] = 0.0
    for of in ("shapley", "reliance", "attribution"):
        res = BAL(of=of, bootstrap=100).compute(ev)
        assert res.per_modality["visual"] == 0.0, of
        assert res.value == 0.0 and res.details["min_max_ratio"] == 0.0
        assert res.details["gini"] == pytest.approx(0.5)
        assert "NaN" not in json.dumps(res.to_dict())


def test_no_positive_contribution_gives_uniform_shares_and_a_note() -> None:
    ev = random_evidence(seed=1, m_count=3, n=20)
    ev.subsets[:] = ev.subsets[0]  # nothing any modality does matters
    res = BAL(bootstrap=50).compute(ev)
    assert res.per_modality == pytest.approx({m: 1 / 3 for m in ev.modalities})
    assert res.value == pytest.approx(1.0)
    assert res.details["no_positive_contribution"] is True and "says nothing" in res.details["note"]


@pytest.mark.parametrize("strength", [(3.0, 0.8, 0.8), (3.0, 0.8, 0.8, 0.8, 0.8)])
def test_more_modalities_on_toy(strength: tuple[float, ...]) -> None:
    ev = toy_evidence(strength, 0, kinds=("attribution", "subsets"))
    res = BAL(bootstrap=100).compute(ev)
    check_against_reference(ev, res, "shapley")
    assert list(res.per_modality) == names_for(len(strength))
    assert res.details["largest"] == "m0"


# ------------------------------------------------------------------------------------ (c) direction
def test_direction_over_seeds() -> None:
    measured = {}
    for seed in (0, 1, 2):
        dom = BAL(bootstrap=200).compute(toy_evidence(DOMINANT, seed))
        bal = BAL(bootstrap=200).compute(toy_evidence(BALANCED, seed))
        measured[seed] = (round(dom.value, 3), round(bal.value, 3))
        assert dom.value < 0.8 and bal.value > 0.95
        assert bal.value - dom.value > 0.2
        assert dom.details["largest"] == "audio"
        assert dom.value_ci[1] < bal.value_ci[0]  # the intervals separate
    # measured entropy (DOMINANT, BALANCED): seed 0 (0.295, 0.996), 1 (0.716, 0.998), 2 (0.697, 0.999)


# ------------------------------------------------------------------------------------ (d) properties
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), m_count=st.sampled_from([2, 3]), n=st.integers(2, 30),
       of=st.sampled_from(["shapley", "reliance", "attribution"]), shuffle_seed=st.integers(0, 1000))
def test_shuffling_rows_leaves_shares_unchanged(seed: int, m_count: int, n: int, of: str, shuffle_seed: int) -> None:
    ev = random_evidence(seed, m_count, n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(shuffle_seed))
    a = BAL(of=of, bootstrap=0).compute(ev)
    b = BAL(of=of, bootstrap=0).compute(ev.select_rows(perm))
    assert b.per_modality == pytest.approx(a.per_modality, abs=1e-12)
    assert b.value == pytest.approx(a.value, abs=1e-12)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), m_count=st.sampled_from([2, 3, 4]), n=st.integers(2, 30),
       of=st.sampled_from(["shapley", "reliance", "attribution"]), data=st.data())
def test_reordering_and_renaming_modalities_relabels_the_shares(seed: int, m_count: int, n: int, of: str, data) -> None:
    ev = random_evidence(seed, m_count, n)
    perm = data.draw(st.permutations(list(range(m_count))))
    names = [f"sensor_{ev.modalities[p]}" for p in perm]
    a = BAL(of=of, bootstrap=0).compute(ev)
    b = BAL(of=of, bootstrap=0).compute(relabel(ev, perm, names))
    assert list(b.per_modality) == names
    for j, p in enumerate(perm):
        assert b.per_modality[names[j]] == pytest.approx(a.per_modality[ev.modalities[p]], abs=1e-12)
    assert b.value == pytest.approx(a.value, abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.one_of(st.floats(-2, 2), st.sampled_from([0.0, 0.5])), min_size=2, max_size=6))
def test_entropy_in_unit_interval_and_one_iff_shares_equal(values: list[float]) -> None:
    mods = tuple(names_for(len(values)))
    ev = Evidence(modalities=mods, n_classes=2, labels=torch.zeros(1, dtype=torch.long),
                  logits=torch.zeros(1, 2), index=torch.arange(1))
    cal = Result(name="cal", value=None, per_modality=dict(zip(mods, values)))
    res = BAL(of="cal").compute(ev, {"cal": cal})
    q = list(res.per_modality.values())
    assert sum(q) == pytest.approx(1.0)
    assert -1e-12 <= res.value <= 1.0 + 1e-12
    if max(q) - min(q) <= 1e-12:
        assert res.value == pytest.approx(1.0, abs=1e-9)
    elif max(q) - min(q) > 1e-6:
        assert res.value < 1.0
    assert res.value == pytest.approx(reference_indices(values)["entropy"], abs=1e-9)


# ------------------------------------------------------------------------------------ (e) determinism
def test_deterministic_json_safe_and_evidence_untouched() -> None:
    ev = toy_evidence(BALANCED, 1)
    before = ev.subsets.clone(), ev.labels.clone(), ev.attribution.clone()
    a = BAL(bootstrap=300, seed=7).compute(ev)
    b = BAL(bootstrap=300, seed=7).compute(ev)
    assert a.to_dict() == b.to_dict()
    assert torch.equal(before[0], ev.subsets) and torch.equal(before[1], ev.labels)
    assert torch.equal(before[2], ev.attribution)
    assert "NaN" not in json.dumps(a.to_dict())
    assert a.higher_is_better is True and BAL.needs == frozenset({"subsets"})
    assert set(BAL.uses) >= {"shapley", "reliance", "cal", "mdi", "attribution"}
