"""ARL fix: signals, state, GradScale, the ω formula by hand, and the direction on the toy."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmdiag.errors import ConfigError
from mmdiag.fixes import FIXES
from mmdiag.fixes._common import (GradScale, clip_grad_norm, grad_scale, mean_abs_logits, mean_entropy,
                                  readout_stats, scale_feature_gradients)
from mmdiag.fixes.arl import ARL, arl_weights
from mmdiag.fixes.base import FixContext
from tests.helpers.fixkit import BUDGET, SHORT, check_hooks_fire, direction, one_step, plain_accuracy, roundtrip, train


def test_registered_with_methods_defaults():
    assert FIXES.get("arl") is ARL
    assert ARL().params() == {"gamma": 4.0, "temperature": 8.0, "start": 5, "min_entropy_share": 0.3,
                              "clip_norm": 40.0}
    assert ARL.summary and ARL.matches and ARL.needs_encoders


@pytest.mark.parametrize("bad", [{"gamma": -1.0}, {"temperature": float("nan")}, {"start": 1.5}, {"min_entropy_share": 2.0}, {"clip_norm": 0.0}])
def test_bad_parameters_are_config_errors(bad):
    with pytest.raises(ConfigError, match="arl: "):
        ARL(**bad)


def test_every_hook_fires_and_signals_are_weights():
    run = check_hooks_fire(ARL(start=1), rows=SHORT)
    sig = run.fix.signals()
    assert set(sig) == {"omega.audio", "omega.visual"}
    assert math.isclose(sum(sig.values()), 1.0, rel_tol=1e-9)
    returns = run.fix.__dict__["_forward_returns"]
    per_epoch = run.steps // 2
    assert all(r is None for r in returns[:per_epoch])  # warm-up: the model's own logits
    assert all(isinstance(r, torch.Tensor) for r in returns[per_epoch:])


def test_state_dict_roundtrip():
    run = train(ARL(start=1), epochs=2)
    new = roundtrip(run.fix)
    assert new.signals() == run.fix.signals() and set(new.signals()) == {"omega.audio", "omega.visual"}


def test_grad_scale_multiplies_the_gradient_exactly():
    x = torch.randn(5, 3, requires_grad=True)
    c = torch.randn(5, 3)
    (grad_scale(x, 1.37) * c).sum().backward()
    assert torch.equal(x.grad, c * 1.37)
    y = GradScale.apply(x, 2.0)
    assert torch.equal(y, x)
    no_grad = torch.randn(2)
    assert grad_scale(no_grad, 3.0) is no_grad


def test_readout_stats_match_the_per_readout_statistics():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 50, 4, generator=g) * 3
    got = readout_stats(z).tolist()
    for j in range(3):
        assert got[j] == pytest.approx(mean_abs_logits(z[j]), rel=1e-6)
        assert got[3 + j] == pytest.approx(mean_entropy(z[j]), rel=1e-6)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3, float("inf"), float("nan")])
def test_clip_grad_norm_is_torch_clip_grad_norm(scale):
    g = torch.Generator().manual_seed(1)
    ps = [torch.nn.Parameter(torch.randn(4, 3, generator=g)) for _ in range(3)]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    for p, q in zip(ps, qs):
        p.grad = torch.randn(4, 3, generator=g) * 20
        p.grad[0, 0] *= scale
        q.grad = p.grad.clone()
    ps[1].grad = qs[1].grad = None
    torch.nn.utils.clip_grad_norm_(ps, 40.0)
    clip_grad_norm(qs, 40.0)
    for p, q in zip(ps, qs):
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad.nan_to_num(), q.grad.nan_to_num())
    clip_grad_norm([torch.nn.Parameter(torch.ones(2))], 1.0)  # no gradient at all: a no-op


def test_omega_by_hand():
    dep, ent = {"a": 3.0, "v": 1.0}, {"a": 0.5, "v": 1.5}
    # D̂ = (.75, .25); Ĥ = (.25, .75) -> clamped (.3, .75); a = (1/.3, 1/.75) / (1/.3 + 1/.75)
    a_a, a_v = (1 / 0.3) / (1 / 0.3 + 1 / 0.75), (1 / 0.75) / (1 / 0.3 + 1 / 0.75)
    # released two-modality cross terms: softmax(T [D̂_v a_a, D̂_a a_v])
    ea, ev = math.exp(8 * 0.25 * a_a), math.exp(8 * 0.75 * a_v)
    got = arl_weights(dep, ent, temperature=8.0)
    assert got["a"] == pytest.approx(ea / (ea + ev), abs=1e-12)
    assert got["v"] == pytest.approx(ev / (ea + ev), abs=1e-12)
    # three modalities: softmax(T a_m (1 - D̂_m)), no clamp active
    dep3, ent3 = {"x": 1.0, "y": 1.0, "z": 2.0}, {"x": 1.0, "y": 1.0, "z": 1.0}
    w = arl_weights(dep3, ent3, temperature=4.0)
    s = [4 * (1 / 3) * (1 - d / 4) for d in (1.0, 1.0, 2.0)]
    e = [math.exp(v) for v in s]
    assert [w[k] for k in "xyz"] == pytest.approx([v / sum(e) for v in e], abs=1e-12)


def test_omega_computed_from_the_batch_readouts_and_applied_at_the_next_step():
    fix = ARL(start=0)
    run, step = one_step(fix)
    try:
        feats = {m: f.detach() for m, f in step.features.items()}
        dep, ent = {}, {}
        with torch.no_grad():
            for m in ("audio", "visual"):
                z = run.adapter.head_forward(step.inputs, run.adapter.masked_features(feats, [m]))
                dep[m] = z.abs().mean(0).sum().item()
                p = F.softmax(z, 1)
                ent[m] = (-(p * p.log()).sum(1)).mean().item()
        expected = arl_weights(dep, ent, 8.0)
        assert fix.signals() == pytest.approx({f"omega.{m}": v for m, v in expected.items()}, abs=1e-6)
        # the next step's fused logits get gradient (1 + ω) at each encoder output
        h = {m: f.detach().requires_grad_() for m, f in feats.items()}
        ref = {m: f.detach().requires_grad_() for m, f in feats.items()}
        scaled = scale_feature_gradients(h, {m: 1 + w for m, w in expected.items()})
        F.cross_entropy(run.adapter.head_forward(step.inputs, scaled), step.labels).backward()
        F.cross_entropy(run.adapter.head_forward(step.inputs, ref), step.labels).backward()
        for m in h:
            torch.testing.assert_close(h[m].grad, ref[m].grad * (1 + expected[m]))
    finally:
        fix.teardown(run.ctx)


def test_loss_adds_gamma_weighted_unimodal_ces_after_warmup():
    for epoch, gamma in ((0, 1.0), (5, 4.0)):
        fix = ARL()
        run, step = one_step(fix, epoch=epoch)
        with torch.no_grad():
            feats = {m: f.detach() for m, f in step.features.items()}
            fused = run.adapter.head_forward(step.inputs, feats)
            uni = sum(F.cross_entropy(run.adapter.head_forward(step.inputs, run.adapter.masked_features(feats, [m])),
                                      step.labels) for m in feats)
        assert step.loss.item() == pytest.approx(F.cross_entropy(fused, step.labels).item() + gamma * uni.item(),
                                                 rel=1e-5)
        fix.teardown(run.ctx)


def test_black_box_model_is_refused_clearly():
    from mmdiag.adapter import ModelAdapter
    from mmdiag.examples_data.synthetic import ToyNet

    adapter = ModelAdapter(ToyNet(["audio", "visual"]), ("audio", "visual"), encoders=None)
    adapter.encoders = None
    with pytest.raises(ConfigError, match="no encoder is known"):
        ARL().setup(FixContext(adapter=adapter, optimizer=None, epochs=1, n_classes=4))


@pytest.mark.parametrize("fusion,strength", [("gated", (3.0, 0.8)), ("film", (3.0, 0.8)), ("concat", (3.0, 0.8, 0.8))])
def test_other_fusions_and_three_modalities(fusion, strength):
    run = train(ARL(start=0), strength, 0, fusion=fusion, epochs=1, max_steps=3)
    sig = run.fix.signals()
    assert len(sig) == len(strength) and all(math.isfinite(v) for v in sig.values())
    assert sum(sig.values()) == pytest.approx(1.0)


@pytest.mark.slow
def test_direction_raises_weak_modality_unimodal_accuracy():
    fixed, plain, full, _ = direction(ARL)
    assert sum(fixed) / len(fixed) > sum(plain) / len(plain) + 0.1, (fixed, plain)
    fused_fix = sum(a["fused"] for a in full) / len(full)
    fused_plain = sum(plain_accuracy(s)["fused"] for s in BUDGET.seeds) / len(BUDGET.seeds)
    assert fused_fix >= fused_plain - 0.02
