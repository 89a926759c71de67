import itertools

import pytest

from mmdiag.diagnostics import DIAGNOSTICS
from mmdiag.evidence import mask_of
from tests.helpers.fake import fake_evidence
from tests.helpers.toys import DOMINANT, toy_evidence

Combinations = DIAGNOSTICS.get("combinations")


@pytest.mark.parametrize("m_count", [2, 3, 5])
def test_every_nonempty_combination_and_weakest(m_count):
    ev = fake_evidence(m_count, seed=30 + m_count)
    res = Combinations(bootstrap=50).compute(ev)
    names = list(ev.modalities)
    expected = {}
    for size in range(1, m_count + 1):
        for combo in itertools.combinations(names, size):
            z = ev.subsets[mask_of(combo, names)]
            expected["+".join(combo)] = float((z.argmax(-1) == ev.labels).float().mean())
    assert res.details["accuracy"] == pytest.approx(expected)
    assert len(expected) == 2**m_count - 1
    weakest = min(expected, key=expected.get)
    assert res.details["weakest"] == weakest and res.value == pytest.approx(expected[weakest])
    lo, hi = res.value_ci
    assert lo <= res.value <= hi


def test_weakest_combination_is_the_lazy_modality():
    res = Combinations(bootstrap=50).compute(toy_evidence(DOMINANT, 0, kinds=("subsets",)))
    assert res.details["weakest"] == "visual"
