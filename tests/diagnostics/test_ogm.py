"""ogm: OGM-GE discrepancy ratio (methods.md §1)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mmdiag.diagnostics.ogm import OGM
from mmdiag.errors import ConfigError
from mmdiag.evidence import Evidence
from mmdiag.stats import bootstrap_indices
from tests.helpers.toys import BALANCED, DOMINANT, toy_evidence

KINDS = ("subsets",)


# ---------------------------------------------------------------------------- slow reference
def _true_prob(row: list[float], y: int) -> float:
    top = max(row)
    e = [math.exp(v - top) for v in row]
    return e[y] / sum(e)


def reference_readouts(ev: Evidence, use_split: bool) -> list[list[float]]:
    """conf[i][m]: true-class probability of modality m's readout for row i."""
    out = []
    for i in range(ev.n_samples):
        y = int(ev.labels[i])
        row = []
        for j in range(ev.n_modalities):
            z = ev.head_split[j, i] if use_split else ev.subsets[1 << j, i]
            row.append(_true_prob(z.tolist(), y))
        out.append(row)
    return out


def reference(conf: list[list[float]], batch_size: int, alpha: float = 0.1) -> dict:
    n, m_count = len(conf), len(conf[0])
    rhos, coefs = [], []
    for start in range(0, n, batch_size):
        s = [0.0] * m_count
        for i in range(start, min(start + batch_size, n)):
            for j in range(m_count):
                s[j] += conf[i][j]
        rho = [s[j] / min(s) for j in range(m_count)]
        rhos.append(rho)
        coefs.append([1 - math.tanh(alpha * r) if r > 1 else 1.0 for r in rho])
    b = len(rhos)
    mean_rho = [sum(r[j] for r in rhos) / b for j in range(m_count)]
    return {
        "rho": mean_rho,
        "frac": [sum(r[j] > 1 for r in rhos) / b for j in range(m_count)],
        "coef": [sum(c[j] for c in coefs) / b for j in range(m_count)],
        "batches": rhos,
    }


def check_against_reference(ev: Evidence, diag: OGM | None = None) -> None:
    diag = diag or OGM(bootstrap=0)
    res = diag.compute(ev)
    use_split = ev.head_split is not None
    assert res.details["readout"] == ("head_split" if use_split else "masked")
    conf = reference_readouts(ev, use_split)
    ref = reference(conf, diag.batch_size, diag.alpha)
    mods = ev.modalities
    np.testing.assert_allclose([res.per_modality[m] for m in mods], ref["rho"], rtol=1e-9)
    np.testing.assert_allclose([res.details["frac_above_one"][m] for m in mods], ref["frac"], atol=1e-12)
    np.testing.assert_allclose([res.details["coefficient"][m] for m in mods], ref["coef"], rtol=1e-9)
    assert res.value == pytest.approx(max(ref["rho"]), rel=1e-9)
    total = [sum(c[j] for c in conf) for j in range(len(mods))]
    np.testing.assert_allclose([res.details["dataset_ratio"][m] for m in mods],
                               [t / min(total) for t in total], rtol=1e-9)


def tiny_evidence(split: torch.Tensor, labels: list[int], modalities=("audio", "visual")) -> Evidence:
    """Evidence whose m-only subset logits equal the head-split readouts (both readouts available)."""
    m_count, n, c = split.shape
    subsets = torch.zeros(1 << m_count, n, c)
    for j in range(m_count):
        subsets[1 << j] = split[j]
    subsets[-1] = split.sum(0)
    return Evidence(
        modalities=tuple(modalities), n_classes=c, labels=torch.tensor(labels), logits=subsets[-1].clone(),
        index=torch.arange(n), subsets=subsets, head_split=split.clone(),
    )


def hand_split() -> torch.Tensor:
    # [2 modalities, 5 samples, 2 classes]
    return torch.tensor([
        [[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0], [0.5, 0.0]],
        [[0.0, 0.0], [0.0, 0.5], [0.0, 1.0], [0.0, 0.2], [0.0, 0.0]],
    ])


# ---------------------------------------------------------------------------- correctness
def test_matches_reference_on_toy_head_split_and_masked():
    ev = toy_evidence(DOMINANT, 0, kinds=KINDS)
    assert ev.head_split is not None  # ToyNet's concat head: OGM's R1 split is available
    check_against_reference(ev)
    check_against_reference(ev, OGM(bootstrap=0, batch_size=50, alpha=0.8))
    masked = ev.replace(head_split=None)
    check_against_reference(masked)


def test_matches_reference_on_hand_built_evidence():
    ev = tiny_evidence(hand_split(), [0, 1, 0, 1, 0])
    for bs in (1, 2, 3, 5, 64):
        check_against_reference(ev, OGM(bootstrap=0, batch_size=bs))
    # paper form for two modalities: per batch rho^a = s^a / s^v; the larger readout's ratio is
    # max(rho^a, 1 / rho^a) and the share of batches with rho^a > 1 is frac_above_one[audio]
    conf = reference_readouts(ev, True)
    res = OGM(bootstrap=0, batch_size=2).compute(ev)
    paper = []
    for start in range(0, 5, 2):
        sa = sum(conf[i][0] for i in range(start, min(start + 2, 5)))
        sv = sum(conf[i][1] for i in range(start, min(start + 2, 5)))
        paper.append(sa / sv)
    assert res.details["frac_above_one"]["audio"] == pytest.approx(np.mean([r > 1 for r in paper]))
    larger = [max(r, 1 / r) for r in paper]
    ref = reference(conf, 2)
    assert [max(b) for b in ref["batches"]] == pytest.approx(larger)
    assert res.details["n_batches"] == 3


def test_one_batch_equals_dataset_ratio():
    ev = toy_evidence(DOMINANT, 0, kinds=KINDS)
    res = OGM(bootstrap=0, batch_size=10_000).compute(ev)
    assert res.per_modality == pytest.approx(res.details["dataset_ratio"])


def test_bootstrap_interval_matches_slow_resampling():
    ev = tiny_evidence(hand_split(), [0, 1, 0, 1, 0])
    n_boot, seed = 30, 5
    res = OGM(bootstrap=n_boot, seed=seed, batch_size=2, level=0.8).compute(ev)
    conf = reference_readouts(ev, True)
    draws = np.asarray([reference([conf[int(i)] for i in row], 2)["rho"]
                        for idx in bootstrap_indices(ev.n_samples, n_boot, seed) for row in idx])
    for j, m in enumerate(ev.modalities):
        assert res.ci[m] == pytest.approx(list(np.quantile(draws[:, j], [0.1, 0.9])), rel=1e-9)
    assert res.value_ci == pytest.approx(list(np.quantile(draws.max(axis=1), [0.1, 0.9])), rel=1e-9)


# ---------------------------------------------------------------------------- edge cases
def test_class_absent_from_labels():
    ev = toy_evidence(DOMINANT, 0, kinds=KINDS)
    ev = ev.select_rows(torch.nonzero(ev.labels != 1)[:, 0])
    assert 1 not in set(ev.labels.tolist())
    check_against_reference(ev)
    check_against_reference(ev.replace(head_split=None))


def test_constant_modality():
    split = hand_split()
    split[1] = 0.7  # identical logits for every class: p(y) = 1/C = 0.5 everywhere
    ev = tiny_evidence(split, [0, 1, 0, 1, 0])
    res = OGM(bootstrap=20, batch_size=2).compute(ev)
    check_against_reference(ev, OGM(bootstrap=0, batch_size=2))
    assert res.details["confidence"]["visual"] == pytest.approx(0.5)
    # both readouts constant and equal: perfectly balanced, nothing is modulated
    flat = tiny_evidence(torch.full((2, 4, 3), 0.3), [0, 1, 2, 0])
    res = OGM(bootstrap=20).compute(flat)
    assert res.value == pytest.approx(1.0)
    assert res.details["coefficient"] == {"audio": 1.0, "visual": 1.0}
    assert res.details["dominant"] is None
    json.dumps(res.to_dict())


@pytest.mark.parametrize("strength", [(3.0, 0.8, 0.8), (3.0, 0.8, 0.8, 0.8, 0.8)])
def test_more_modalities(strength):
    ev = toy_evidence(strength, 0, kinds=KINDS)
    check_against_reference(ev)
    check_against_reference(ev.replace(head_split=None))
    res = OGM(bootstrap=100).compute(ev)
    assert res.details["dominant"] == "m0"
    assert min(res.per_modality.values()) >= 1.0


# ---------------------------------------------------------------------------- direction
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_direction_on_dominance_knob(seed):
    # measured (seeds 0, 1, 2), head split: DOMINANT headline 2.49, 2.02, 2.13 (audio),
    # BALANCED 1.07, 1.06, 1.04. Thresholds 1.5 and 1.2 leave >= 0.13 margin on each side.
    dom = OGM(bootstrap=200).compute(toy_evidence(DOMINANT, seed, kinds=KINDS))
    assert dom.details["dominant"] == "audio"
    assert dom.value > 1.5
    assert dom.ci["audio"][0] > 1.5
    assert dom.details["frac_above_one"]["audio"] > 0.9
    assert dom.details["coefficient"]["audio"] < 1.0 and dom.details["coefficient"]["visual"] > 0.99
    bal = OGM(bootstrap=0).compute(toy_evidence(BALANCED, seed, kinds=KINDS))
    assert bal.value < 1.2


# ---------------------------------------------------------------------------- contract
def test_deterministic_json_safe_and_does_not_mutate():
    ev = toy_evidence(DOMINANT, 1, kinds=KINDS)
    before = (ev.subsets.clone(), ev.head_split.clone())
    a, b = OGM(bootstrap=100).compute(ev), OGM(bootstrap=100).compute(ev)
    assert a == b
    assert json.loads(json.dumps(a.to_dict()))["details"]["readout"] == "head_split"
    assert torch.equal(ev.subsets, before[0]) and torch.equal(ev.head_split, before[1])
    assert a.value_ci[0] <= a.value <= a.value_ci[1]


def test_rejects_bad_parameters():
    with pytest.raises(ConfigError):
        OGM(batch_size=0)
    with pytest.raises(ConfigError):
        OGM(alpha=-0.1)
