"""Every registered diagnostic: finite values, keys = modalities, JSON round trip, determinism,
evidence not mutated, intervals around the value; and the default analysis on the toy."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from mmdiag.api import analyze_evidence
from mmdiag.diagnostics import DIAGNOSTICS
from mmdiag.report import Report, Result
from toys import DOMINANT, toy_evidence

NAMES = DIAGNOSTICS.names()


@pytest.fixture(scope="module")
def evidence():
    return toy_evidence(DOMINANT, 0)


def prior_for(name, ev):
    """Results of the diagnostics this one reads (computed fresh)."""
    out = {}
    for dep in DIAGNOSTICS.get(name).uses:
        if dep in DIAGNOSTICS:
            try:
                out[dep] = DIAGNOSTICS.get(dep)(bootstrap=20).compute(ev, out)
            except Exception:  # noqa: BLE001 - a missing dependency is allowed
                pass
    return out


def snapshot(ev):
    return {k: (v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)) for k, v in ev.__dict__.items()}


def same(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("name", NAMES)
def test_conformance(name, evidence):
    cls = DIAGNOSTICS.get(name)
    assert cls.name == name and cls.summary and cls.__doc__ and len(cls.__doc__) > 200
    before = snapshot(evidence)
    prior = prior_for(name, evidence)
    a = cls(bootstrap=50, seed=1).compute(evidence, prior)
    b = cls(bootstrap=50, seed=1).compute(evidence, prior)
    assert isinstance(a, Result) and a.name == name
    assert set(a.per_modality) == set(evidence.modalities)
    assert all(math.isfinite(v) for v in a.per_modality.values())
    assert a.value is None or math.isfinite(a.value)
    assert a.to_dict() == b.to_dict(), "not deterministic"
    back = Result.from_dict(json.loads(json.dumps(a.to_dict())))
    assert back.to_dict() == a.to_dict()
    for m, interval in a.ci.items():
        lo, hi = interval
        if lo is not None and hi is not None:
            assert lo <= hi
    after = snapshot(evidence)
    assert all(same(before[k], after[k]) for k in before), "evidence was mutated"


def test_default_analysis_has_no_errors_and_round_trips(evidence):
    report = analyze_evidence(evidence, bootstrap=50)
    errors = [f for f in report.failures if f.kind == "error"]
    assert not errors, errors
    again = Report.from_dict(json.loads(report.to_json()))
    assert again.to_dict() == report.to_dict()
    assert report.verdict.dominant == "audio"
