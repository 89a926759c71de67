"""pmr: the prototype cross-entropy and the loss by hand, prototypes as class means with momentum,
other fusions, and direction on the toy.

The contract every fix meets (hooks, teardown, state, parameters, distributed) is in test_conformance.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmdiag.errors import ConfigError
from mmdiag.fixes import FIXES
from mmdiag.fixes.pmr import PMR, prototype_logits, slow_modalities
from tests.helpers.fixkit import (BUDGET, SHORT, batch, direction, hand_readouts, make_run, mean, one_step,
                                  plain_accuracy, train)


def test_registered_with_the_scripts_defaults() -> None:
    assert FIXES.get("pmr") is PMR and PMR.needs_encoders
    assert PMR().params() == {"alpha": 2.0, "momentum": 0.0, "start_epoch": 0, "end_epoch": 70}


@pytest.mark.parametrize("bad", [{"momentum": 1.5}, {"start_epoch": 3, "end_epoch": 1}, {"alpha": float("inf")}])
def test_bad_parameters(bad: dict) -> None:
    with pytest.raises(ConfigError, match="pmr: "):
        PMR(**bad)


def test_prototype_logits_are_negative_euclidean_distances() -> None:
    g = torch.Generator().manual_seed(0)
    h, c = torch.randn(5, 3, generator=g), torch.randn(4, 3, generator=g)
    got = prototype_logits(h, c)
    for i in range(5):
        for k in range(4):
            d = math.sqrt(sum((float(h[i, j]) - float(c[k, j])) ** 2 for j in range(3)))
            assert float(got[i, k]) == pytest.approx(-d, rel=1e-5)


def test_slow_modalities_are_those_below_the_top_score() -> None:
    assert slow_modalities({"a": 30.0, "v": 12.0}) == ["v"]
    assert slow_modalities({"a": 10.0, "v": 12.0}) == ["a"]
    assert slow_modalities({"a": 10.0, "v": 10.0}) == []
    assert slow_modalities({"a": 3.0, "b": 1.0, "c": 2.0}) == ["b", "c"]


def _hand_pce(h: torch.Tensor, protos: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(PCE, summed prototype confidence) written out: softmax over -||h - c_k|| of every class."""
    dist = torch.stack([((h - protos[k]) ** 2).sum(1).sqrt() for k in range(protos.shape[0])], dim=1)
    logp = -dist - torch.logsumexp(-dist, dim=1, keepdim=True)
    return -logp[torch.arange(len(y)), y].mean(), float(logp.exp()[torch.arange(len(y)), y].sum())


def test_loss_adds_alpha_pce_of_the_slow_modality() -> None:
    g = torch.Generator().manual_seed(1)
    protos = {m: torch.randn(4, 16, generator=g) for m in ("audio", "visual")}
    fix = PMR(alpha=1.5)
    fix.load_state_dict({"prototypes": protos})
    run, step = one_step(fix, n=64)
    fix.teardown(run.ctx)
    xs, y = batch(n=64)
    with torch.no_grad():
        feats, _ = hand_readouts(run.model, xs)
        fused = F.cross_entropy(run.model(xs), y)
        pce, score = {}, {}
        for m in feats:
            pce[m], score[m] = _hand_pce(feats[m], protos[m], y)
    slow = "visual" if score["audio"] > score["visual"] else "audio"
    want = fused + 1.5 * pce[slow]
    assert float(step.loss.detach()) == pytest.approx(float(want), rel=1e-5)
    assert step.logs == {f"pce.{slow}": pytest.approx(float(pce[slow]), rel=1e-5)}
    other = "audio" if slow == "visual" else "visual"
    assert fix.signals()[f"ratio.{other}"] == pytest.approx(score[other] / score[slow], rel=1e-5)
    assert fix.signals()[f"pce.{slow}"] == 1.5 and fix.signals()[f"pce.{other}"] == 0.0


def test_prototypes_are_class_means_with_momentum() -> None:
    """With lr 0 the model does not move: the prototypes are the class means of the first 128 rows'
    encoder outputs; a second epoch mixes with momentum, an unseen class keeps its prototype."""
    run = train(PMR(momentum=0.25), epochs=1, rows=SHORT, lr=0.0)
    xs, y = batch(n=128)
    with torch.no_grad():
        feats, _ = hand_readouts(run.model, xs)
    protos = run.fix.state_dict()["prototypes"]
    for m in feats:
        for k in range(4):
            torch.testing.assert_close(protos[m][k], feats[m][y == k].mean(0), rtol=1e-5, atol=1e-6)
    fix = PMR(momentum=0.25)
    ctx = make_run(fix).ctx
    old = {m: torch.ones(4, 2) for m in ("audio", "visual")}
    sums = torch.tensor([[2.0, 4.0], [0.0, 0.0], [3.0, 3.0], [1.0, -1.0]], dtype=torch.float64)
    count = torch.tensor([2.0, 0.0, 3.0, 1.0], dtype=torch.float64)
    fix.load_state_dict({"prototypes": old, "acc": {"count": count, "audio": sums, "visual": sums}})
    fix.on_epoch_end(ctx, 1)
    want = torch.tensor([[0.75 * 1 + 0.25, 0.75 * 2 + 0.25], [1.0, 1.0], [1.0, 1.0], [1.0, -0.5]])
    torch.testing.assert_close(fix.state_dict()["prototypes"]["audio"], want)


def test_no_pce_before_prototypes_or_outside_the_window() -> None:
    run, step = one_step(PMR(), n=32)
    run.fix.teardown(run.ctx)
    assert step.logs == {}
    fix = PMR(start_epoch=2)
    fix.load_state_dict({"prototypes": {m: torch.zeros(4, 16) for m in ("audio", "visual")}})
    run, step = one_step(fix, n=32, epoch=1)
    fix.teardown(run.ctx)
    assert step.logs == {} and all(v == 0.0 for k, v in fix.signals().items() if k.startswith("pce."))


@pytest.mark.parametrize("fusion,strength", [("gated", (3.0, 0.8)), ("film", (3.0, 0.8)), ("concat", (3.0, 0.8, 0.8))])
def test_other_fusions_and_three_modalities(fusion: str, strength: tuple) -> None:
    run = train(PMR(), strength, 0, fusion=fusion, epochs=2, rows=SHORT)
    sig = run.history[-1]
    assert len([k for k in sig if k.startswith("ratio.")]) == len(strength)
    assert all(math.isfinite(v) for v in sig.values())


@pytest.mark.slow
def test_direction_raises_weak_modality_unimodal_accuracy() -> None:
    fixed, plain, full, _ = direction(PMR)
    assert mean(fixed) > mean(plain) + 0.05, (fixed, plain)
    fused_plain = mean([plain_accuracy(s)["fused"] for s in BUDGET.seeds])
    assert mean([a["fused"] for a in full]) >= fused_plain - 0.02
