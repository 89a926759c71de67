"""UDML fix: a live encoder pre-hook, state (noise generator), weights by hand, direction."""

from __future__ import annotations

import math

import pytest
import torch

from mmdiag.errors import ConfigError
from mmdiag.fixes import FIXES
from mmdiag.fixes.udml import UDML, fusion_weights, target_weights
from tests.helpers.fixkit import (BUDGET, SHORT, check_hooks_fire, direction, hook_dicts, make_run, one_step,
                                  plain_accuracy, roundtrip, tensors, train)
from tests.helpers.toys import DOMINANT, toy_split


def test_registered_with_methods_defaults():
    assert FIXES.get("udml") is UDML
    p = UDML().params()
    assert (p["gamma"], p["noise_levels"], p["noise_loss_weight"], p["hidden"]) == (4.0, 11, 0.1, 256)
    assert UDML.summary and UDML.matches


@pytest.mark.parametrize("bad", [{"gamma": -1.0}, {"noise_levels": 1}, {"clean_fraction": 1.5}, {"cycle_epoch": -2}, {"hidden": 0}])
def test_bad_parameters_are_config_errors(bad):
    with pytest.raises(ConfigError, match="udml: "):
        UDML(**bad)


def test_every_hook_fires_and_the_noise_hook_is_live_during_training():
    seen = []
    fix = UDML(cycle_epoch=0, weight_warmup=1)
    run = check_hooks_fire(fix, rows=SHORT)
    sig = run.fix.signals()
    assert set(sig) == {"w.audio", "w.visual", "sigma.audio", "sigma.visual"}
    assert sig["w.audio"] + sig["w.visual"] == pytest.approx(2.0)  # mean 1
    assert all(isinstance(r, torch.Tensor) for r in run.fix.__dict__["_forward_returns"])
    run2 = train(UDML(cycle_epoch=0), epochs=1, max_steps=2, on_step=lambda r, s: seen.append(hook_dicts(r.model)))
    assert seen and all(any(k == "_forward_pre_hooks" for _, k, _ in found) for found in seen)
    assert hook_dicts(run2.model) == []


def test_state_dict_roundtrip_continues_the_noise_stream():
    run = train(UDML(cycle_epoch=0, weight_warmup=1), epochs=2)
    new = roundtrip(run.fix)
    # both continue with the same noise plan after setup on a fresh run
    a, b = make_run(run.fix), make_run(new)
    run.fix.setup(a.ctx)
    new.setup(b.ctx)
    try:
        pa, pb = run.fix._draw_plan(16), new._draw_plan(16)
        for m in ("audio", "visual"):
            assert torch.equal(pa["levels"][m], pb["levels"][m])
    finally:
        run.fix.teardown(a.ctx)
        new.teardown(b.ctx)


def test_target_and_fusion_weights_by_hand():
    sa, sv = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.5])
    t = target_weights({"a": 2 * sa.log(), "v": 2 * sv.log()})  # the estimator outputs o = log σ̂²
    torch.testing.assert_close(t["a"], 2 * sv**2 / (sa**2 + sv**2))
    torch.testing.assert_close(t["v"], 2 * sa**2 / (sa**2 + sv**2))
    w = fusion_weights({"a": torch.tensor([1.2]), "v": torch.tensor([0.8])}, {"a": 3.0, "v": 1.0})
    # w' = (0.4, 0.8), mean 0.6
    torch.testing.assert_close(w["a"], torch.tensor([0.4 / 0.6]))
    torch.testing.assert_close(w["v"], torch.tensor([0.8 / 0.6]))
    # huge σ̂ differences stay finite
    t2 = target_weights({"a": torch.tensor([300.0]), "v": torch.tensor([-300.0])})
    assert torch.isfinite(t2["a"]).all() and t2["v"].item() == pytest.approx(2.0)


def test_fused_logits_are_the_head_on_rescaled_features():
    fix = UDML(cycle_epoch=0, weight_warmup=0)
    run, step = one_step(fix)
    try:
        dep = dict(fix._dep)  # the loss updated it; recompute this step's weights with the stored σ̂
        assert set(dep) == {"audio", "visual"} and all(v > 0 for v in dep.values())
        # replay a forward by hand on fresh features
        xs, y = step.inputs, step.labels
        with torch.no_grad():
            run.model.eval()
            _, feats = run.adapter.encode(xs)
            run.model.train()
            o = {m: run.ctx.aux[f"udml_noise_{m}"].eval()(run.adapter.pooled(m, feats[m])).squeeze(1) for m in feats}
            t = {m: 2 * torch.exp(-o[m]) / (torch.exp(-o["audio"]) + torch.exp(-o["visual"])) for m in o}
            raw = {m: t[m] / dep[m] for m in t}
            mean = (raw["audio"] + raw["visual"]) / 2
            w = {m: raw[m] / mean for m in raw}
            want = run.model.head(torch.cat([feats[m] * (1 + w[m][:, None]) for m in ("audio", "visual")], 1))
            from mmdiag.fixes.base import Step

            s2 = Step(epoch=5, index=0, inputs=xs, labels=y, logits=torch.zeros(1), features=dict(feats))
            got = fix.forward(run.ctx, s2)
        torch.testing.assert_close(got, want)
    finally:
        fix.teardown(run.ctx)


def test_noise_plan_half_clean_and_scaled_to_the_batch_std():
    fix = UDML(cycle_epoch=0)
    run = make_run(fix)
    fix.setup(run.ctx)
    try:
        plan = fix._draw_plan(64)
        clean = (plan["levels"]["audio"] == 1) & (plan["levels"]["visual"] == 1)
        assert clean.sum() >= 32
        for m in ("audio", "visual"):
            assert plan["levels"][m].min() >= 1 and plan["levels"][m].max() <= 11
        # the hook: clean rows untouched, level-11 rows get noise of the batch's std, eval mode untouched
        enc = run.adapter.encoder_module("visual")
        hook = fix._corrupt_hook("visual", 2)
        x = torch.randn(2000, 8) * 3.0
        fix._plan = {"size": 2000, "levels": {"audio": torch.ones(2000, dtype=torch.long),
                                               "visual": torch.tensor([1, 11] * 1000)}, "used": set()}
        enc.train()
        (noisy,) = hook(enc, (x,))
        assert torch.equal(noisy[0::2], x[0::2])
        assert (noisy[1::2] - x[1::2]).std().item() == pytest.approx(x.std().item(), rel=0.05)
        enc.eval()
        assert hook(enc, (x,)) is None
        enc.train()
        with torch.no_grad():
            assert hook(enc, (x,)) is None
    finally:
        fix.teardown(run.ctx)


def test_clean_before_cycle_epoch():
    fix = UDML()  # cycle = epochs // 2 = 8 on the 16-epoch budget
    run = make_run(fix)
    fix.setup(run.ctx)
    try:
        x = torch.randn(32, 8)
        fix._epoch = 0
        enc = run.adapter.encoder_module("audio")
        enc.train()
        assert fix._corrupt_hook("audio", 2)(enc, (x,)) is None
    finally:
        fix.teardown(run.ctx)


@pytest.mark.parametrize("fusion,strength", [("gated", (3.0, 0.8)), ("film", (3.0, 0.8)), ("concat", (3.0, 0.8, 0.8))])
def test_other_fusions_and_three_modalities(fusion, strength):
    run = train(UDML(cycle_epoch=0, weight_warmup=0), strength, 0, fusion=fusion, epochs=1, max_steps=3)
    sig = run.fix.signals()
    assert len(sig) == 2 * len(strength) and all(math.isfinite(v) for v in sig.values())
    w = [v for k, v in sig.items() if k.startswith("w.")]
    assert sum(w) / len(w) == pytest.approx(1.0, rel=1e-5)


def test_estimator_tracks_the_noise_level():
    run = train(UDML(cycle_epoch=0), epochs=8)
    xs, _ = tensors(toy_split(DOMINANT, 0)[1])
    g = torch.Generator().manual_seed(5)
    run.ctx.aux.eval()
    sigma = {}
    with torch.no_grad():
        for level in (1, 11):
            noisy = {m: x + (level - 1) / 10 * x.std() * torch.randn(x.shape, generator=g) for m, x in xs.items()}
            _, f = run.adapter.encode(noisy)
            sigma[level] = {m: torch.exp(0.5 * run.ctx.aux[f"udml_noise_{m}"](run.adapter.pooled(m, f[m]))).mean().item() for m in f}
    for m in ("audio", "visual"):
        assert sigma[11][m] > sigma[1][m] + 0.3, sigma


@pytest.mark.slow
def test_direction_raises_weak_modality_unimodal_accuracy():
    fixed, plain, full, _ = direction(UDML)
    assert sum(fixed) / len(fixed) > sum(plain) / len(plain) + 0.1, (fixed, plain)
    fused_fix = sum(a["fused"] for a in full) / len(full)
    fused_plain = sum(plain_accuracy(s)["fused"] for s in BUDGET.seeds) / len(BUDGET.seeds)
    assert fused_fix >= fused_plain - 0.02
