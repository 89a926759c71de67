import itertools
import json
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from mmdiag.diagnostics import DIAGNOSTICS
from mmdiag.evidence import mask_of
from tests.helpers.fake import fake_evidence
from tests.helpers.toys import BALANCED, DOMINANT, toy_evidence

Shapley = DIAGNOSTICS.get("shapley")


def reference_shapley(ev, value):
    """Average marginal contribution over all M! orderings (a different algorithm from the code's)."""
    names = list(ev.modalities)
    out = {m: 0.0 for m in names}
    orders = list(itertools.permutations(names))
    for order in orders:
        present = []
        for m in order:
            before = value(mask_of(present, names))
            present.append(m)
            out[m] += (value(mask_of(present, names)) - before) / len(orders)
    return out


def accuracy_of(ev):
    return lambda mask: float((ev.subsets[mask].argmax(-1) == ev.labels).double().mean())


def logprob_of(ev):
    return lambda mask: float(torch.log_softmax(ev.subsets[mask].double(), -1).gather(1, ev.labels[:, None]).mean())


@pytest.mark.parametrize("m_count", [2, 3, 5])
def test_matches_permutation_reference(m_count):
    ev = fake_evidence(m_count, seed=m_count)
    res = Shapley(bootstrap=50).compute(ev)
    ref = reference_shapley(ev, accuracy_of(ev))
    for m in ev.modalities:
        assert res.per_modality[m] == pytest.approx(ref[m], abs=1e-12)
    ref_lp = reference_shapley(ev, logprob_of(ev))
    for m in ev.modalities:
        assert res.details["logprob"][m] == pytest.approx(ref_lp[m], abs=1e-9)


@settings(max_examples=25, deadline=None)
@given(m_count=st.integers(2, 5), seed=st.integers(0, 10_000))
def test_efficiency_values_sum_to_all_minus_none(m_count, seed):
    ev = fake_evidence(m_count, n=20, seed=seed)
    res = Shapley(bootstrap=0).compute(ev)
    v = accuracy_of(ev)
    assert sum(res.per_modality.values()) == pytest.approx(v(ev.full_mask) - v(0), abs=1e-12)
    assert res.details["total"] == pytest.approx(v(ev.full_mask) - v(0), abs=1e-12)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 1000))
def test_shuffling_samples_changes_nothing(seed):
    ev = fake_evidence(3, n=30, seed=1)
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(seed))
    a = Shapley(bootstrap=0).compute(ev).per_modality
    b = Shapley(bootstrap=0).compute(ev.select_rows(perm)).per_modality
    for m in a:
        assert a[m] == pytest.approx(b[m], abs=1e-12)


def test_renaming_modalities_relabels_results():
    ev = fake_evidence(3, seed=4)
    renamed = fake_evidence(3, seed=4)
    renamed.modalities = ("x", "y", "z")
    a = Shapley(bootstrap=0).compute(ev).per_modality
    b = Shapley(bootstrap=0).compute(renamed).per_modality
    assert list(b.values()) == list(a.values()) and list(b) == ["x", "y", "z"]


def test_interval_contains_value_and_json_round_trip():
    res = Shapley(bootstrap=200).compute(fake_evidence(2, n=200))
    for m, (lo, hi) in res.ci.items():
        assert lo <= res.per_modality[m] <= hi
    assert json.loads(json.dumps(res.to_dict()))["per_modality"] == res.per_modality


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_direction_on_dominance_knob(seed):
    dom = Shapley(bootstrap=200).compute(toy_evidence(DOMINANT, seed, kinds=("subsets",))).per_modality
    assert dom["audio"] > dom["visual"] + 0.2
    bal = Shapley(bootstrap=200).compute(toy_evidence(BALANCED, seed, kinds=("subsets",))).per_modality
    assert abs(bal["audio"] - bal["visual"]) < 0.15


def test_one_class_absent_and_constant_modality():
    ev = fake_evidence(2, absent_class=0)
    assert math.isfinite(Shapley(bootstrap=20).compute(ev).value)
    ev = fake_evidence(2, seed=3)
    ev.subsets[mask_of(["visual"], ev.modalities)] = ev.subsets[0]  # visual alone adds nothing
    ev.subsets[ev.full_mask] = ev.subsets[mask_of(["audio"], ev.modalities)]
    res = Shapley(bootstrap=20).compute(ev)
    assert res.per_modality["visual"] == pytest.approx(0.0, abs=1e-12)
