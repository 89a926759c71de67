import pytest

from mmdiag.diagnostics import DIAGNOSTICS
from mmdiag.evidence import mask_of
from tests.helpers.fake import fake_evidence
from tests.helpers.toys import BALANCED, DOMINANT, toy_evidence

Unimodal = DIAGNOSTICS.get("unimodal")


@pytest.mark.parametrize("m_count", [2, 3, 5])
def test_matches_loop_reference_and_per_class(m_count):
    ev = fake_evidence(m_count, seed=20 + m_count, absent_class=1)
    res = Unimodal(bootstrap=50).compute(ev)
    for m in ev.modalities:
        z = ev.subsets[mask_of([m], ev.modalities)]
        hits = [int(z[i].argmax() == ev.labels[i]) for i in range(ev.n_samples)]
        assert res.per_modality[m] == pytest.approx(sum(hits) / len(hits))
        assert res.details["per_class"][m]["1"] is None  # the absent class
        for k in (0, 2, 3):
            rows = [i for i in range(ev.n_samples) if ev.labels[i] == k]
            assert res.details["per_class"][m][str(k)] == pytest.approx(sum(hits[i] for i in rows) / len(rows))
    assert res.value == pytest.approx(max(res.per_modality.values()) - min(res.per_modality.values()))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_direction(seed):
    dom = Unimodal(bootstrap=100).compute(toy_evidence(DOMINANT, seed, kinds=("subsets",))).per_modality
    assert dom["audio"] > dom["visual"] + 0.2
    bal = Unimodal(bootstrap=100).compute(toy_evidence(BALANCED, seed, kinds=("subsets",))).per_modality
    assert abs(bal["audio"] - bal["visual"]) < 0.15
