"""perceptual: perceptual score by permutation (methods.md §15)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mmdiag.diagnostics.perceptual import Perceptual
from mmdiag.evidence import Evidence
from mmdiag.stats import bootstrap_indices
from tests.helpers.toys import BALANCED, DOMINANT, toy_evidence

KINDS = ("permutations",)


# ---------------------------------------------------------------------------- slow reference
def reference(ev: Evidence, rows: list[int] | None = None) -> dict:
    rows = list(range(ev.n_samples)) if rows is None else rows
    k_count, m_count = ev.perm_correct.shape[0], ev.perm_correct.shape[1]
    logits, labels = ev.logits.tolist(), ev.labels.tolist()
    correct, clean = [], []
    for i in rows:
        z, y = logits[i], labels[i]
        correct.append(1.0 if max(range(len(z)), key=lambda c: z[c]) == y else 0.0)
        top = max(z)
        clean.append(-(z[y] - top - math.log(sum(math.exp(v - top) for v in z))))
    acc = sum(correct) / len(rows)
    ps, per_perm, loss, loss_per_perm = [], [], [], []
    for m in range(m_count):
        accs, losses = [], []
        for k in range(k_count):
            accs.append(sum(float(ev.perm_correct[k, m, i]) for i in rows) / len(rows))
            if ev.perm_nll is not None:
                losses.append(sum(float(ev.perm_nll[k, m, i]) for i in rows) / len(rows))
        ps.append(acc - sum(accs) / k_count)
        per_perm.append([acc - a for a in accs])
        if losses:
            loss_per_perm.append([x - sum(clean) / len(rows) for x in losses])
            loss.append(sum(losses) / k_count - sum(clean) / len(rows))
    return {"acc": acc, "ps": ps, "per_perm": per_perm, "loss": loss, "loss_per_perm": loss_per_perm}


def check_against_reference(ev: Evidence) -> None:
    res = Perceptual(bootstrap=0).compute(ev)
    ref = reference(ev)
    mods = ev.modalities
    np.testing.assert_allclose([res.per_modality[m] for m in mods], ref["ps"], atol=1e-12)
    assert res.details["accuracy"] == pytest.approx(ref["acc"])
    assert res.value == pytest.approx(max(ref["ps"]) - min(ref["ps"]), abs=1e-12)
    for j, m in enumerate(mods):
        assert res.details["per_permutation"][m] == pytest.approx(ref["per_perm"][j], abs=1e-12)
        want_std = float(np.std(ref["per_perm"][j], ddof=1)) if len(ref["per_perm"][j]) > 1 else 0.0
        assert res.details["std"][m] == pytest.approx(want_std, abs=1e-12)
        if ref["acc"] > 0:
            assert res.details["normalized"][m] == pytest.approx(ref["ps"][j] / ref["acc"], abs=1e-12)
        if ref["loss"]:
            assert res.details["loss"][m] == pytest.approx(ref["loss"][j], abs=1e-5)
            assert res.details["loss_std"][m] == pytest.approx(float(np.std(ref["loss_per_perm"][j], ddof=1)), abs=1e-5)


def tiny_evidence() -> Evidence:
    # 4 samples, 2 classes, K = 2 permutations, audio matters (permuting it breaks samples), visual not
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.3, 0.1]])
    labels = torch.tensor([0, 1, 0, 1])  # fused correctness 1, 1, 1, 0
    perm_correct = torch.tensor([
        [[False, True, False, False], [True, True, True, False]],
        [[True, False, False, True], [True, True, False, False]],
    ])
    perm_nll = torch.tensor([
        [[2.0, 0.4, 1.5, 0.9], [0.2, 0.3, 0.3, 0.8]],
        [[0.1, 1.8, 2.2, 0.5], [0.2, 0.3, 0.9, 0.8]],
    ])
    return Evidence(modalities=("audio", "visual"), n_classes=2, labels=labels, logits=logits,
                    index=torch.arange(4), perm_correct=perm_correct, perm_nll=perm_nll)


# ---------------------------------------------------------------------------- correctness
def test_matches_reference_on_toy():
    check_against_reference(toy_evidence(DOMINANT, 0, kinds=KINDS))


def test_matches_reference_on_hand_built_evidence():
    ev = tiny_evidence()
    check_against_reference(ev)
    res = Perceptual(bootstrap=0).compute(ev)
    # by hand: A = 3/4; audio permuted accuracies 1/4 and 2/4; visual 3/4 and 2/4
    assert res.per_modality["audio"] == pytest.approx(0.75 - 0.375)
    assert res.per_modality["visual"] == pytest.approx(0.75 - 0.625)
    assert res.value == pytest.approx(0.25)
    assert res.details["normalized"]["audio"] == pytest.approx(0.375 / 0.75)


def test_bootstrap_interval_matches_slow_resampling():
    ev = tiny_evidence()
    n_boot, seed = 40, 2
    res = Perceptual(bootstrap=n_boot, seed=seed, level=0.9).compute(ev)
    draws = np.asarray([reference(ev, [int(i) for i in row])["ps"]
                        for idx in bootstrap_indices(ev.n_samples, n_boot, seed) for row in idx])
    for j, m in enumerate(ev.modalities):
        assert res.ci[m] == pytest.approx(list(np.quantile(draws[:, j], [0.05, 0.95])), abs=1e-12)
    spreads = draws.max(axis=1) - draws.min(axis=1)
    assert res.value_ci == pytest.approx(list(np.quantile(spreads, [0.05, 0.95])), abs=1e-12)


# ---------------------------------------------------------------------------- edge cases
def test_class_absent_from_labels():
    ev = toy_evidence(DOMINANT, 0, kinds=KINDS)
    ev = ev.select_rows(torch.nonzero(ev.labels != 2)[:, 0])
    assert 2 not in set(ev.labels.tolist())
    check_against_reference(ev)


def test_constant_modality_scores_zero():
    # a modality the model ignores: permuting it changes nothing
    ev = toy_evidence(DOMINANT, 0, kinds=KINDS)
    pc, nll = ev.perm_correct.clone(), ev.perm_nll.clone()
    pc[:, 1] = ev.correct().bool()[None]
    nll[:, 1] = -ev.true_logprob()[None]
    ev = Evidence(modalities=ev.modalities, n_classes=ev.n_classes, labels=ev.labels, logits=ev.logits,
                  index=ev.index, perm_correct=pc, perm_nll=nll)
    res = Perceptual(bootstrap=50).compute(ev)
    assert res.per_modality["visual"] == 0.0
    assert res.ci["visual"] == [0.0, 0.0]
    assert res.details["std"]["visual"] == 0.0
    assert res.details["loss"]["visual"] == pytest.approx(0.0, abs=1e-6)
    check_against_reference(ev)


def test_single_permutation_and_zero_accuracy():
    ev = tiny_evidence()
    one = Evidence(modalities=ev.modalities, n_classes=2, labels=ev.labels, logits=ev.logits,
                   index=ev.index, perm_correct=ev.perm_correct[:1], perm_nll=None)
    res = Perceptual(bootstrap=10).compute(one)
    assert res.details["n_permutations"] == 1
    assert res.details["std"] == {"audio": 0.0, "visual": 0.0}
    assert "loss" not in res.details
    check_against_reference(one)
    wrong = Evidence(modalities=ev.modalities, n_classes=2, labels=torch.tensor([1, 0, 1, 1]), logits=ev.logits,
                     index=ev.index, perm_correct=ev.perm_correct)
    res = Perceptual(bootstrap=10).compute(wrong)
    assert res.details["accuracy"] == 0.0
    assert res.details["normalized"] == {"audio": None, "visual": None}
    json.dumps(res.to_dict())


@pytest.mark.parametrize("strength", [(3.0, 0.8, 0.8), (3.0, 0.8, 0.8, 0.8, 0.8)])
def test_more_modalities(strength):
    ev = toy_evidence(strength, 0, kinds=KINDS)
    assert ev.perm_correct.shape[1] == len(strength)
    check_against_reference(ev)
    res = Perceptual(bootstrap=100).compute(ev)
    assert max(res.per_modality, key=res.per_modality.get) == "m0"


# ---------------------------------------------------------------------------- direction
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_direction_on_dominance_knob(seed):
    # measured (seeds 0, 1, 2): DOMINANT PS audio 0.74, 0.73, 0.73 / visual 0.015, 0.001, 0.008;
    # BALANCED spread 0.006, 0.003, 0.039 with both PS in 0.37-0.42. Thresholds leave wide margins.
    dom = Perceptual(bootstrap=200).compute(toy_evidence(DOMINANT, seed, kinds=KINDS))
    assert dom.per_modality["audio"] > 0.5 and dom.per_modality["visual"] < 0.05
    assert dom.ci["audio"][0] > dom.ci["visual"][1]
    assert dom.details["loss"]["audio"] > dom.details["loss"]["visual"]
    bal = Perceptual(bootstrap=0).compute(toy_evidence(BALANCED, seed, kinds=KINDS))
    assert bal.value < 0.1
    assert min(bal.per_modality.values()) > 0.25


# ---------------------------------------------------------------------------- contract
def test_deterministic_json_safe_and_does_not_mutate():
    ev = toy_evidence(DOMINANT, 1, kinds=KINDS)
    before = (ev.perm_correct.clone(), ev.perm_nll.clone(), ev.logits.clone())
    a, b = Perceptual(bootstrap=100).compute(ev), Perceptual(bootstrap=100).compute(ev)
    assert a == b
    assert json.loads(json.dumps(a.to_dict()))["name"] == "perceptual"
    assert torch.equal(ev.perm_correct, before[0]) and torch.equal(ev.perm_nll, before[1])
    assert torch.equal(ev.logits, before[2])
    assert len(a.per_sample["drop_audio"]) == ev.n_samples
