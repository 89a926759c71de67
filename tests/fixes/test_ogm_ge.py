"""ogm_ge: formula, gradient changes, the masked-readout teardown, the black box, and direction on the toy.

The contract every fix meets (hooks, teardown, state, parameters, distributed) is in test_conformance.py.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmdiag.errors import ConfigError, TrainError
from mmdiag.fixes import FIXES
from mmdiag.fixes.ogm_ge import OGMGE, head_split_logits
from tests.helpers.fixkit import (MODS, SHORT, Blob, check_hooks_fire, check_teardown, direction, fit_run, make_run,
                                  mean, one_step, toy_model)
from tests.helpers.toys import DOMINANT, trained_toy


def _step(model: nn.Module, fix: OGMGE, n: int = 32):
    """(ctx, step) of one batch of ``n`` rows through ``model`` with ``fix``, after the backward."""
    run, step = one_step(fix, n=n, run=make_run(fix, model=model))
    fix.teardown(run.ctx)
    return run.ctx, step


def test_registered_with_metadata() -> None:
    cls = FIXES.get("ogm_ge")
    assert cls is OGMGE and cls.needs_encoders
    assert cls().params() == {"alpha": 0.1, "mode": "ogm_ge", "start_epoch": 0, "end_epoch": 50,
                              "scope": "weights", "readout": "auto"}


@pytest.mark.parametrize("bad", [{"alpha": -1.0}, {"mode": "ogm3"}, {"scope": "bias"}, {"readout": "x"},
                                 {"start_epoch": 5, "end_epoch": 2}])
def test_bad_params(bad: dict) -> None:
    with pytest.raises(ConfigError):
        OGMGE(**bad)


def test_ratio_and_coefficient_match_the_formula() -> None:
    """s^m from the head split, rho = s^a/s^v, k = 1 - tanh(alpha rho) for the dominant one."""
    model = copy.deepcopy(trained_toy(DOMINANT, 0))
    fix = OGMGE(alpha=0.3)
    ctx, step = _step(model, fix)
    rho, coeff = fix.ratios(ctx, step)
    assert fix._split is True  # a concat-linear head: readout R1
    with torch.no_grad():
        feats = {m: model.encoders[m](step.inputs[m]) for m in MODS}
        w, b = model.head.weight, model.head.bias
        za = feats["audio"] @ w[:, :16].t() + b / 2
        zv = feats["visual"] @ w[:, 16:].t() + b / 2
        sa = F.softmax(za, 1).gather(1, step.labels[:, None]).sum().item()
        sv = F.softmax(zv, 1).gather(1, step.labels[:, None]).sum().item()
    assert rho["audio"] == pytest.approx(sa / sv, rel=1e-5)
    assert rho["visual"] == pytest.approx(sv / sa, rel=1e-5)
    assert rho["audio"] > 1  # the dominant modality of the toy
    assert coeff["audio"] == pytest.approx(1 - math.tanh(0.3 * sa / sv), rel=1e-5)
    assert coeff["visual"] == 1.0


def test_head_split_helper_splits_bias() -> None:
    head = nn.Linear(6, 3)
    h = {"a": torch.randn(4, 2), "b": torch.randn(4, 4)}
    z = head_split_logits(head, h, ("a", "b"))
    full = head(torch.cat([h["a"], h["b"]], 1))
    assert torch.allclose(z["a"] + z["b"], full, atol=1e-6)


def test_non_linear_fusion_uses_masked_readouts() -> None:
    fix = OGMGE()
    ctx, step = _step(toy_model(0, "gated"), fix)
    rho, _ = fix.ratios(ctx, step)
    assert fix._split is False
    assert all(math.isfinite(v) and v > 0 for v in rho.values())
    with pytest.raises(ConfigError, match="split"):
        OGMGE(readout="split").ratios(*_step(toy_model(0, "gated"), OGMGE(readout="split")))


@pytest.mark.parametrize("mode", ["ogm", "ogm_ge"])
def test_gradient_change(mode: str) -> None:
    """ogm: g <- k g exactly on >1-D encoder params of the dominant modality; ogm_ge adds noise
    of the gradient's own scale; biases and the other modality are untouched (mode ogm)."""
    model = copy.deepcopy(trained_toy(DOMINANT, 0))
    fix = OGMGE(alpha=0.5, mode=mode)
    ctx, step = _step(model, fix)
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    _, coeff = fix.ratios(ctx, step)
    torch.manual_seed(0)
    fix.after_backward(ctx, step)
    k = coeff["audio"]
    assert k < 1
    for n, p in model.named_parameters():
        g0 = before[n]
        if n.startswith("encoders.audio") and p.dim() > 1:
            if mode == "ogm":
                assert torch.allclose(p.grad, k * g0)
            else:
                noise = p.grad - k * g0
                assert not torch.allclose(p.grad, k * g0)
                assert noise.std().item() == pytest.approx(g0.std().item(), rel=0.6)
        elif mode == "ogm" or not (n.startswith("encoders.") and p.dim() > 1):
            assert torch.equal(p.grad, g0), n


def test_outside_the_window_nothing_changes() -> None:
    model = toy_model(0)
    fix = OGMGE(alpha=0.5, start_epoch=3, end_epoch=5)
    ctx, step = _step(model, fix)
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    fix.after_backward(ctx, step)  # epoch 0 < start_epoch
    assert all(torch.equal(p.grad, before[n]) for n, p in model.named_parameters())
    assert fix.signals()["coeff.audio"] == 1.0 and "ratio.audio" in fix.signals()


def test_black_box_model_is_refused_by_the_reference_loop() -> None:
    with pytest.raises(TrainError, match="encoder"):
        fit_run(OGMGE(), model=Blob(), epochs=1)


def test_every_hook_fires_and_signals_are_ratios_and_coefficients() -> None:
    run = check_hooks_fire(OGMGE(), rows=SHORT)
    assert set(run.fix.signals()) == {"ratio.audio", "ratio.visual", "coeff.audio", "coeff.visual"}


def test_no_hook_survives_an_exception_inside_a_masked_readout() -> None:
    """With readout='mask' the ratios come from head calls on stubbed encoders; an exception raised
    inside one of them must leave nothing behind."""
    check_teardown(lambda: OGMGE(readout="mask"))


def test_direction_weak_modality_gains() -> None:
    """On the dominance toy, OGM-GE (alpha 0.8, the CREMA-D setting) leaves the weak modality's
    unimodal accuracy higher than plain training under the same seeds and budget (mean of 3 seeds)."""
    fixed, plain, _, _ = direction(lambda: OGMGE(alpha=0.8))
    assert mean(fixed) > mean(plain), (fixed, plain)
