"""Every registered diagnostic through one contract (a new diagnostic is covered by registering it).

Finite values keyed by the modalities, a JSON round trip, determinism, evidence not mutated, every
value inside its interval (per modality and headline); with ``bootstrap=0`` the same values and no
intervals. Nothing is skipped: the toy evidence must hold every kind a diagnostic needs, and the
results it reads (``uses``) are computed first, so a broken dependency fails the test. A missing
evidence kind makes the diagnostic a Failure record, and so does a broken ``uses`` dependency that
it cannot do without; one it can do without leaves the result it gives when that dependency did not run.
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import pytest
import torch

from mmdiag.api import analyze_evidence, run_diagnostics
from mmdiag.diagnostics import DIAGNOSTICS
from mmdiag.errors import EvidenceError, MmdiagError
from mmdiag.report import Report, Result
from tests.helpers.toys import DOMINANT, toy_evidence, with_new_data

NAMES = DIAGNOSTICS.names()


@pytest.fixture(scope="module")
def evidence():
    """Every evidence kind of the trained dominance toy, plus new data for the drift diagnostic."""
    return with_new_data(toy_evidence(DOMINANT, 0))


def dependencies(name: str) -> list[str]:
    """The registered diagnostics ``name`` reads, each after those it reads itself."""
    order: list[str] = []

    def visit(n: str) -> None:
        for dep in DIAGNOSTICS.get(n).uses:
            if dep in DIAGNOSTICS and dep not in order and dep != name:
                visit(dep)
                order.append(dep)

    visit(name)
    return order


def prior_for(name: str, ev: Any, bootstrap: int = 20) -> dict[str, Result]:
    """Results of the diagnostics ``name`` reads, computed in order; one that fails fails the test."""
    out: dict[str, Result] = {}
    for dep in dependencies(name):
        out[dep] = DIAGNOSTICS.get(dep)(bootstrap=bootstrap).compute(ev, out)
    return out


def assert_fed(name: str, ev: Any) -> None:
    missing = [k for k in sorted(DIAGNOSTICS.get(name).needs) if not ev.has(k)]
    assert not missing, (f"the toy evidence has no {missing} evidence, which {name} needs: conformance never "
                         "skips, so give the toy evidence (tests/helpers/toys.py) what it needs")


def snapshot(ev: Any) -> dict:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)) for k, v in ev.__dict__.items()}


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def finite(x: Any) -> bool:
    return x is not None and math.isfinite(x)


_RESULTS: dict[tuple[str, int, int], Result] = {}


def computed(name: str, ev: Any, bootstrap: int = 50) -> Result:
    """``name``'s result on ``ev`` (seed 1), computed once per module: a later fresh computation
    must equal it (determinism)."""
    key = (name, bootstrap, id(ev))
    if key not in _RESULTS:
        prior = prior_for(name, ev, bootstrap=20 if bootstrap else 0)
        _RESULTS[key] = DIAGNOSTICS.get(name)(bootstrap=bootstrap, seed=1).compute(ev, prior)
    return _RESULTS[key]


@pytest.mark.parametrize("name", NAMES)
def test_conformance(name: str, evidence: Any) -> None:
    cls = DIAGNOSTICS.get(name)
    assert cls.name == name and cls.summary and cls.__doc__ and len(cls.__doc__) > 200
    assert_fed(name, evidence)
    before = snapshot(evidence)
    a = computed(name, evidence)
    b = cls(bootstrap=50, seed=1).compute(evidence, prior_for(name, evidence))
    assert isinstance(a, Result) and a.name == name
    assert set(a.per_modality) == set(evidence.modalities)
    assert all(math.isfinite(v) for v in a.per_modality.values())
    assert a.value is None or math.isfinite(a.value)
    assert a.to_dict() == b.to_dict(), "not deterministic"
    back = Result.from_dict(json.loads(json.dumps(a.to_dict())))
    assert back.to_dict() == a.to_dict()
    after = snapshot(evidence)
    assert all(same(before[k], after[k]) for k in before), "evidence was mutated"
    # every value inside its interval, where there is one
    assert set(a.ci) <= set(evidence.modalities), a.ci
    for m, (lo, hi) in a.ci.items():
        assert finite(lo) and finite(hi), (m, lo, hi)
        assert lo <= a.per_modality[m] <= hi, (m, lo, a.per_modality[m], hi)
    if a.value_ci is not None:
        lo, hi = a.value_ci
        assert a.value is not None and finite(lo) and finite(hi), (a.value, a.value_ci)
        assert lo <= a.value <= hi, (lo, a.value, hi)


@pytest.mark.parametrize("name", NAMES)
def test_bootstrap_zero_gives_the_values_without_intervals(name: str, evidence: Any) -> None:
    assert_fed(name, evidence)
    with_ci = computed(name, evidence)
    res = computed(name, evidence, bootstrap=0)
    assert set(res.per_modality) == set(evidence.modalities)
    assert all(math.isfinite(v) for v in res.per_modality.values())
    assert res.per_modality == pytest.approx(with_ci.per_modality, rel=1e-9, abs=1e-12)
    assert (res.value is None) == (with_ci.value is None)
    if res.value is not None:
        assert res.value == pytest.approx(with_ci.value, rel=1e-9, abs=1e-12)
    # no interval: absent, or without a finite bound
    assert not any(finite(x) for interval in res.ci.values() for x in interval), res.ci
    assert res.value_ci is None or not any(finite(x) for x in res.value_ci), res.value_ci
    back = Result.from_dict(json.loads(json.dumps(res.to_dict())))
    assert back.to_dict() == res.to_dict()


# ------------------------------------------------------------------------------------ broken dependencies
def missing_kinds() -> list[Any]:
    return [pytest.param(n, k, id=f"{n}-without-{k}") for n in NAMES for k in sorted(DIAGNOSTICS.get(n).needs)]


@pytest.mark.parametrize("name, kind", missing_kinds())
def test_a_missing_evidence_kind_makes_a_failure_record(name: str, kind: str) -> None:
    """Evidence collected without one kind the diagnostic needs (a model whose encoders are known,
    so the kind is not ruled out): the run records an error Failure naming the kind. ``compute``
    called directly raises an EvidenceError or manages without it, never crashes otherwise."""
    kinds = sorted(DIAGNOSTICS.get(name).needs - {kind})
    ev = with_new_data(toy_evidence(DOMINANT, 0, kinds=kinds))
    assert not ev.has(kind)
    results, failures = run_diagnostics(ev, [DIAGNOSTICS.get(name)(bootstrap=0)])
    assert name not in results
    assert [(f.diagnostic, f.kind) for f in failures] == [(name, "error")], failures
    assert kind in failures[0].error
    try:
        assert isinstance(DIAGNOSTICS.get(name)(bootstrap=0).compute(ev, {}), Result)
    except EvidenceError:
        pass


def broken(dep: str) -> Any:
    """A diagnostic registered as ``dep`` whose compute crashes."""
    base = DIAGNOSTICS.get(dep)

    class Broken(base):  # type: ignore[misc, valid-type]
        def compute(self, ev: Any, prior: Any = None) -> Result:
            raise RuntimeError(f"{dep} broken on purpose")

    return Broken(bootstrap=0)


def used() -> list[Any]:
    cases = [pytest.param(n, dep, {}, id=f"{n}-broken-{dep}") for n in NAMES
             for dep in DIAGNOSTICS.get(n).uses if dep in DIAGNOSTICS]
    # balance summarises the measure ``of``: reading one without per-sample evidence needs its result
    cases += [pytest.param("balance", dep, {"of": dep}, id=f"balance-of-{dep}-broken")
              for dep in DIAGNOSTICS.get("balance").uses if dep in DIAGNOSTICS]
    return cases


@pytest.mark.parametrize("name, dep, params", used())
def test_a_broken_dependency_is_a_failure_record(name: str, dep: str, params: dict, evidence: Any) -> None:
    """The broken dependency is recorded as an error Failure; the dependent then gives the result it
    gives when the dependency did not run, or, if it cannot do without it, an error Failure."""
    diag = DIAGNOSTICS.get(name)(bootstrap=0, **params)
    results, failures = run_diagnostics(evidence, [broken(dep), diag])
    assert dep not in results
    assert any(f.diagnostic == dep and f.kind == "error" and "broken on purpose" in f.error for f in failures)
    try:
        alone = diag.compute(evidence, {})
    except MmdiagError:
        alone = None
    if alone is None:
        assert name not in results
        assert [(f.diagnostic, f.kind) for f in failures if f.diagnostic == name] == [(name, "error")]
    else:
        assert not [f for f in failures if f.diagnostic == name], failures
        assert results[name].to_dict() == alone.to_dict()


# ------------------------------------------------------------------------------------ the default analysis
@pytest.mark.parametrize("bootstrap", [50, 0])
def test_default_analysis_has_no_errors_and_round_trips(bootstrap: int, evidence: Any) -> None:
    report = analyze_evidence(evidence, bootstrap=bootstrap)
    errors = [f for f in report.failures if f.kind == "error"]
    assert not errors, errors
    again = Report.from_dict(json.loads(report.to_json()))
    assert again.to_dict() == report.to_dict()
    assert report.verdict.dominant == "audio"
