import json

import pytest

from mmdiag.diagnostics import DIAGNOSTICS
from mmdiag.evidence import mask_of
from tests.helpers.fake import fake_evidence
from tests.helpers.toys import BALANCED, DOMINANT, toy_evidence

Reliance = DIAGNOSTICS.get("reliance")


def acc(z, y):
    return sum(int(z[i].argmax() == y[i]) for i in range(len(y))) / len(y)


@pytest.mark.parametrize("m_count", [2, 3, 5])
def test_matches_loop_reference(m_count):
    ev = fake_evidence(m_count, seed=10 + m_count)
    res = Reliance(bootstrap=50).compute(ev)
    names = list(ev.modalities)
    for m in names:
        rest = [k for k in names if k != m]
        ref = acc(ev.subsets[ev.full_mask], ev.labels) - acc(ev.subsets[mask_of(rest, names)], ev.labels)
        assert res.per_modality[m] == pytest.approx(ref, abs=1e-12)
        only = ev.subsets[mask_of([m], names)]
        dep = sum(float(only[:, k].abs().mean()) for k in range(ev.n_classes))
        assert res.details["dependency"][m] == pytest.approx(dep, rel=1e-6)
    assert sum(res.details["dependency_share"].values()) == pytest.approx(1.0)
    json.dumps(res.to_dict())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_direction(seed):
    dom = Reliance(bootstrap=100).compute(toy_evidence(DOMINANT, seed, kinds=("subsets",)))
    assert dom.per_modality["audio"] > dom.per_modality["visual"] + 0.2
    assert dom.ci["audio"][0] > dom.ci["visual"][1]
    bal = Reliance(bootstrap=100).compute(toy_evidence(BALANCED, seed, kinds=("subsets",)))
    assert abs(bal.per_modality["audio"] - bal.per_modality["visual"]) < 0.15


def test_constant_modality_has_zero_reliance():
    ev = fake_evidence(2, seed=7)
    ev.subsets[ev.full_mask] = ev.subsets[mask_of(["audio"], ev.modalities)]
    ev.logits = ev.subsets[ev.full_mask]
    res = Reliance(bootstrap=20).compute(ev)
    assert res.per_modality["visual"] == 0.0
