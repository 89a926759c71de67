"""cal: CAL contribution weight W^m (mmdiag's proposed definition, methods.md §17.2)."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from mmdiag.diagnostics.cal import CAL
from mmdiag.errors import ConfigError
from mmdiag.evidence import Evidence
from mmdiag.stats import bootstrap_indices
from tests.helpers.toys import BALANCED, DOMINANT, toy_evidence

KINDS = ("subsets",)


# ---------------------------------------------------------------------------- slow reference
def _logprob(row: list[float], y: int) -> float:
    top = max(row)
    return row[y] - top - math.log(sum(math.exp(v - top) for v in row))


def _coalition_values(ev: Evidence, rows: list[int]) -> dict[frozenset, float]:
    """v(S) = mean true-class log-probability with only S present, for every S (plain loops)."""
    mods = ev.modalities
    out = {}
    for size in range(len(mods) + 1):
        for combo in itertools.combinations(range(len(mods)), size):
            mask = sum(1 << j for j in combo)
            z = ev.subsets[mask].tolist()
            total = 0.0
            for i in rows:
                total += _logprob(z[i], int(ev.labels[i]))
            out[frozenset(combo)] = total / len(rows)
    return out


def _shapley_by_orderings(v: dict[frozenset, float], m_count: int) -> list[float]:
    """Average marginal contribution over all M! orderings (independent of the weight formula)."""
    phi = [0.0] * m_count
    orders = list(itertools.permutations(range(m_count)))
    for order in orders:
        present: set[int] = set()
        for j in order:
            before = v[frozenset(present)]
            present.add(j)
            phi[j] += v[frozenset(present)] - before
    return [p / len(orders) for p in phi]


def reference(ev: Evidence, lam: float = 0.5, tau: float = 4.0, rows: list[int] | None = None) -> dict:
    rows = list(range(ev.n_samples)) if rows is None else rows
    m_count = ev.n_modalities
    phi = _shapley_by_orderings(_coalition_values(ev, rows), m_count)
    pos = [max(p, 0.0) for p in phi]
    ih = [p / sum(pos) for p in pos] if sum(pos) > 0 else [1.0 / m_count] * m_count
    d = []
    for j in range(m_count):
        z = ev.subsets[1 << j].tolist()
        d.append(sum(math.exp(_logprob(z[i], int(ev.labels[i]))) for i in rows) / len(rows))
    dh = [x / sum(d) for x in d]
    score = [tau * (lam * ih[j] + (1 - lam) * dh[j]) for j in range(m_count)]
    e = [math.exp(s - max(score)) for s in score]
    w = [x / sum(e) for x in e]
    return {"I": phi, "Ih": ih, "D": d, "Dh": dh, "W": w}


def check_against_reference(ev: Evidence, diag: CAL | None = None) -> None:
    diag = diag or CAL(bootstrap=0)
    res = diag.compute(ev)
    ref = reference(ev, diag.lam, diag.tau)
    mods = ev.modalities
    np.testing.assert_allclose([res.per_modality[m] for m in mods], ref["W"], atol=1e-9)
    np.testing.assert_allclose([res.details["I"][m] for m in mods], ref["I"], atol=1e-9)
    np.testing.assert_allclose([res.details["I_share"][m] for m in mods], ref["Ih"], atol=1e-9)
    np.testing.assert_allclose([res.details["D"][m] for m in mods], ref["D"], atol=1e-9)
    np.testing.assert_allclose([res.details["D_share"][m] for m in mods], ref["Dh"], atol=1e-9)
    assert res.value == pytest.approx(max(ref["W"]) - min(ref["W"]), abs=1e-9)
    assert sum(res.per_modality.values()) == pytest.approx(1.0)


def tiny_evidence(subsets: torch.Tensor, labels: list[int], modalities=("audio", "visual")) -> Evidence:
    n = len(labels)
    return Evidence(
        modalities=tuple(modalities), n_classes=subsets.shape[-1], labels=torch.tensor(labels),
        logits=subsets[-1].clone(), index=torch.arange(n), subsets=subsets,
    )


def hand_subsets() -> torch.Tensor:
    # [4 subsets, 4 samples, 3 classes]; mask 1 = audio only, 2 = visual only, 3 = both
    return torch.tensor([
        [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
        [[2.0, 0.0, 0.0], [0.0, 1.5, 0.0], [0.0, 0.0, 0.5], [1.0, 0.0, 0.0]],
        [[0.3, 0.0, 0.0], [0.0, 0.0, 0.2], [0.0, 0.1, 0.0], [0.0, 0.4, 0.0]],
        [[2.5, 0.0, 0.0], [0.0, 1.4, 0.3], [0.0, 0.2, 0.6], [1.2, 0.3, 0.0]],
    ])


# ---------------------------------------------------------------------------- correctness
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference_on_toy(seed):
    check_against_reference(toy_evidence(DOMINANT, seed, kinds=KINDS))


def test_matches_reference_on_hand_built_evidence():
    ev = tiny_evidence(hand_subsets(), [0, 1, 2, 0])
    check_against_reference(ev)
    check_against_reference(ev, CAL(bootstrap=0, lam=0.2, tau=8.0))
    res = CAL(bootstrap=0).compute(ev)
    # audio alone is the informative readout here: it must get the larger weight
    assert res.per_modality["audio"] > res.per_modality["visual"]
    assert res.details["coalition_logprob"]["none"] == pytest.approx(math.log(1 / 3))


def test_bootstrap_interval_matches_slow_resampling():
    ev = tiny_evidence(hand_subsets(), [0, 1, 2, 0])
    n_boot, seed = 40, 3
    res = CAL(bootstrap=n_boot, seed=seed, level=0.9).compute(ev)
    draws = [reference(ev, rows=[int(i) for i in row])["W"]
             for idx in bootstrap_indices(ev.n_samples, n_boot, seed) for row in idx]
    draws = np.asarray(draws)
    for j, m in enumerate(ev.modalities):
        lo, hi = np.quantile(draws[:, j], [0.05, 0.95])
        assert res.ci[m] == pytest.approx([lo, hi], abs=1e-9)


def test_interval_brackets_estimate_on_toy():
    res = CAL(bootstrap=300).compute(toy_evidence(DOMINANT, 0, kinds=KINDS))
    for m, (lo, hi) in res.ci.items():
        assert lo <= res.per_modality[m] <= hi
    assert res.value_ci[0] <= res.value <= res.value_ci[1]


# ---------------------------------------------------------------------------- edge cases
def test_class_absent_from_labels():
    ev = toy_evidence(DOMINANT, 0, kinds=KINDS)
    ev = ev.select_rows(torch.nonzero(ev.labels != 0)[:, 0])
    assert 0 not in set(ev.labels.tolist())
    check_against_reference(ev)


def test_constant_modality_gets_no_information_share():
    # visual adds nothing to any coalition and its own readout is flat (identical logits)
    subsets = hand_subsets()
    subsets[2] = 0.0            # visual only == nothing present
    subsets[3] = subsets[1]     # both == audio only
    ev = tiny_evidence(subsets, [0, 1, 2, 0])
    res = CAL(bootstrap=50).compute(ev)
    check_against_reference(ev)
    assert res.details["I"]["visual"] == pytest.approx(0.0, abs=1e-12)
    assert res.details["I_share"]["visual"] == 0.0
    assert res.details["D"]["visual"] == pytest.approx(1 / 3)
    assert res.per_modality["audio"] > res.per_modality["visual"]


def test_nothing_positive_gives_uniform_information_share():
    subsets = torch.zeros(4, 3, 2)
    ev = tiny_evidence(subsets, [0, 1, 1])
    res = CAL(bootstrap=20).compute(ev)
    assert res.details["I_share"] == {"audio": 0.5, "visual": 0.5}
    assert res.per_modality["audio"] == pytest.approx(0.5)
    assert res.value == pytest.approx(0.0)


@pytest.mark.parametrize("strength", [(3.0, 0.8, 0.8), (3.0, 0.8, 0.8, 0.8, 0.8)])
def test_more_modalities(strength):
    ev = toy_evidence(strength, 0, kinds=KINDS)
    check_against_reference(ev)
    res = CAL(bootstrap=100).compute(ev)
    assert max(res.per_modality, key=res.per_modality.get) == "m0"
    assert set(res.ci) == set(ev.modalities)


# ---------------------------------------------------------------------------- direction
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_direction_on_dominance_knob(seed):
    # measured (seeds 0, 1, 2): DOMINANT W_audio = 0.946, 0.903, 0.913 (spread 0.89, 0.81, 0.83);
    # BALANCED spread = 0.09, 0.08, 0.04. 0.8 and 0.2 leave margins of >= 0.1 on both sides.
    dom = CAL(bootstrap=200).compute(toy_evidence(DOMINANT, seed, kinds=KINDS))
    assert dom.per_modality["audio"] > 0.8
    assert dom.ci["audio"][0] > dom.ci["visual"][1]
    bal = CAL(bootstrap=0).compute(toy_evidence(BALANCED, seed, kinds=KINDS))
    assert bal.value < 0.2


# ---------------------------------------------------------------------------- contract
def test_deterministic_json_safe_and_does_not_mutate():
    ev = toy_evidence(DOMINANT, 1, kinds=KINDS)
    before = ev.subsets.clone()
    a, b = CAL(bootstrap=100).compute(ev), CAL(bootstrap=100).compute(ev)
    assert a == b
    text = json.dumps(a.to_dict())
    assert json.loads(text)["name"] == "cal"
    assert torch.equal(ev.subsets, before)
    assert len(a.per_sample["I_audio"]) == ev.n_samples


def test_rejects_bad_parameters():
    with pytest.raises(ConfigError):
        CAL(lam=1.5)
    with pytest.raises(ConfigError):
        CAL(tau=-1.0)
