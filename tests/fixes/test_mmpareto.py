"""MMPareto fix: signals, MGDA weights against brute force, gradients by hand, direction."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmdiag.errors import ConfigError
from mmdiag.fixes import FIXES
from mmdiag.fixes.mmpareto import MMPareto, cosine, min_norm_weight
from tests.helpers.fixkit import BUDGET, SHORT, check_hooks_fire, direction, one_step, plain_accuracy, train


def test_registered_with_methods_defaults():
    assert FIXES.get("mmpareto") is MMPareto
    assert MMPareto().params() == {"gamma": 1.5}
    assert MMPareto.summary and MMPareto.matches


@pytest.mark.parametrize("bad", [{"gamma": 0.0}, {"gamma": float("inf")}, {"gamma": "big"}])
def test_bad_parameters_are_config_errors(bad):
    with pytest.raises(ConfigError, match="mmpareto: "):
        MMPareto(**bad)


def test_every_hook_fires_and_signals_are_cosines():
    run = check_hooks_fire(MMPareto(), rows=SHORT)
    sig = run.fix.signals()
    assert set(sig) == {"cos.audio", "cos.visual"} and all(-1 <= v <= 1 for v in sig.values())
    assert all(r is None for r in run.fix.__dict__["_forward_returns"])


@pytest.mark.parametrize("seed", range(20))
def test_mgda_weight_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    d = 1 + seed % 7
    a, b = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    if seed % 5 == 0:
        b = -0.3 * a + 0.01 * b  # nearly opposite
    grid = torch.linspace(0, 1, 100001, dtype=torch.float64)
    norms = ((grid[:, None] * a + (1 - grid[:, None]) * b) ** 2).sum(1)
    best = grid[norms.argmin()].item()
    got = min_norm_weight(a, b)
    assert 0.0 <= got <= 1.0
    assert got == pytest.approx(best, abs=2e-5)
    assert ((got * a + (1 - got) * b) ** 2).sum() <= norms.min() + 1e-12
    assert min_norm_weight(a, a) == 0.5


def test_encoder_gradients_follow_the_formula_in_both_branches():
    trained = train(MMPareto(), epochs=4)
    branches = set()
    for offset in range(0, 600, 40):
        fix = MMPareto()
        run, step = one_step(fix, n=40, run=trained, offset=offset)
        check_gradients(fix, run, step)
        branches |= {v > 0 for v in fix.signals().values()}
        if branches == {True, False}:
            break
    assert branches == {True, False}, "no conflicting step found: the MGDA branch went untested"


def check_gradients(fix, run, step):
    ad, y = run.adapter, step.labels
    try:
        # independent recomputation of every gradient from a fresh forward of the same batch
        logits, feats = ad.encode(step.inputs)
        fused = F.cross_entropy(logits, y)
        uni = {m: F.cross_entropy(ad.head_forward(step.inputs, ad.masked_features(feats, [m])), y) for m in feats}
        want, cos = {}, {}
        for m in ("audio", "visual"):
            ps = run.ctx.encoder_parameters(m)
            g_mm = torch.autograd.grad(fused, ps, retain_graph=True)
            g_u = torch.autograd.grad(uni[m], ps, retain_graph=True)
            g_sum = torch.autograd.grad(fused + sum(uni.values()), ps, retain_graph=True)
            a = torch.cat([g.flatten() for g in g_mm])
            b = torch.cat([g.flatten() for g in g_u])
            c = torch.dot(a, b) / (a.norm() * b.norm())
            cos[m] = c.item()
            k0 = 0.5 if c > 0 else min_norm_weight(a, b)
            out = []
            for ga, gb, gs in zip(g_mm, g_u, g_sum):
                new = 2 * (k0 * ga + (1 - k0) * gb)
                if gs.norm() / new.norm() > 1:
                    new = new * gs.norm() / new.norm()
                out.append(1.5 * new)
            want[m] = out
        head_before = run.model.head.weight.grad.clone()
        g_head = torch.autograd.grad(fused + sum(uni.values()), run.model.head.weight, retain_graph=True)[0]
        torch.testing.assert_close(head_before, g_head, rtol=1e-5, atol=1e-7)
        fix.after_backward(run.ctx, step)
        # the cosines are measured in after_backward, on the fused gradient the backward left in .grad
        assert fix.signals() == pytest.approx({f"cos.{m}": c for m, c in cos.items()}, abs=1e-5)
        assert step.logs == fix.signals()
        for m in want:
            for p, w in zip(run.ctx.encoder_parameters(m), want[m]):
                torch.testing.assert_close(p.grad, w, rtol=1e-4, atol=1e-6)
        # the head keeps the summed-loss gradient
        assert torch.equal(run.model.head.weight.grad, head_before)
    finally:
        fix.teardown(run.ctx)


def test_cosine_of_zero_vector_is_zero():
    assert cosine(torch.zeros(3), torch.ones(3)) == 0.0


@pytest.mark.parametrize("fusion,strength", [("gated", (3.0, 0.8)), ("film", (3.0, 0.8)), ("concat", (3.0, 0.8, 0.8))])
def test_other_fusions_and_three_modalities(fusion, strength):
    run = train(MMPareto(), strength, 0, fusion=fusion, epochs=1, max_steps=3)
    sig = run.fix.signals()
    assert len(sig) == len(strength) and all(math.isfinite(v) for v in sig.values())


@pytest.mark.slow
def test_direction_raises_weak_modality_unimodal_accuracy():
    fixed, plain, full, _ = direction(MMPareto)
    assert sum(fixed) / len(fixed) > sum(plain) / len(plain) + 0.1, (fixed, plain)
    fused_fix = sum(a["fused"] for a in full) / len(full)
    fused_plain = sum(plain_accuracy(s)["fused"] for s in BUDGET.seeds) / len(BUDGET.seeds)
    assert fused_fix >= fused_plain - 0.02
