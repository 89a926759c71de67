"""CAL fix (proposed form): signals, state, W^m by hand, bottleneck, and the direction on the toy."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from mmdiag.errors import ConfigError
from mmdiag.fixes import FIXES
from mmdiag.fixes._common import scale_feature_gradients
from mmdiag.fixes.cal import CAL, GaussianBottleneck, cal_weights, gaussian_kl, positive_share, shapley_values
from tests.helpers.fixkit import BUDGET, SHORT, check_hooks_fire, direction, one_step, plain_accuracy, roundtrip, train


def test_registered_with_methods_defaults():
    assert FIXES.get("cal") is CAL
    p = CAL().params()
    assert (p["tau"], p["lam"], p["warmup"], p["beta0"]) == (4.0, 0.5, 5, 1e-3)
    assert CAL.summary and CAL.matches and "PROPOSED" in (CAL.__doc__ or "")


@pytest.mark.parametrize("bad", [{"tau": -1.0}, {"lam": 1.5}, {"warmup": -1}, {"beta0": -1e-3}, {"potential_momentum": 1.0}])
def test_bad_parameters_are_config_errors(bad):
    with pytest.raises(ConfigError, match="cal: "):
        CAL(**bad)


def test_every_hook_fires_and_signals_are_weights():
    run = check_hooks_fire(CAL(warmup=1), rows=SHORT)
    sig = run.fix.signals()
    assert set(sig) == {"W.audio", "W.visual"} and sum(sig.values()) == pytest.approx(1.0)
    returns = run.fix.__dict__["_forward_returns"]
    half = run.steps // 2
    assert all(r is None for r in returns[:half]) and all(isinstance(r, torch.Tensor) for r in returns[half:])
    # the bottleneck modules live in aux, never in the user's model
    assert {"cal_aib_audio", "cal_aib_visual"} <= set(run.ctx.aux.keys())
    assert not any(k.startswith("cal_") for k in run.model.state_dict())
    # the potential history exists after two epochs
    assert set(run.fix.state_dict()["prev_loss"]) == {"audio", "visual"}


def test_state_dict_roundtrip():
    run = train(CAL(warmup=1), epochs=3)
    new = roundtrip(run.fix)
    assert new.state_dict()["potential"] == run.fix.state_dict()["potential"] != {}


def test_shapley_by_hand_and_efficiency():
    v = {frozenset(): -2.0, frozenset("a"): -0.5, frozenset("v"): -1.5, frozenset("av"): -0.2}
    phi = shapley_values(v, ["a", "v"])
    assert phi["a"] == pytest.approx(0.5 * ((-0.5 + 2.0) + (-0.2 + 1.5)))
    assert phi["v"] == pytest.approx(0.5 * ((-1.5 + 2.0) + (-0.2 + 0.5)))
    g = torch.Generator().manual_seed(0)
    mods = ["x", "y", "z"]
    v3 = {frozenset(s): float(torch.randn(1, generator=g)) for r in range(4) for s in itertools.combinations(mods, r)}
    phi3 = shapley_values(v3, mods)
    assert sum(phi3.values()) == pytest.approx(v3[frozenset(mods)] - v3[frozenset()])


def test_w_by_hand():
    info, conf = {"a": 0.9, "v": -0.1}, {"a": 0.8, "v": 0.2}
    # Î = (1, 0); D̂ = (.8, .2); score = .5 Î + .5 D̂ = (.9, .1); W = softmax(4 score)
    ea, ev = math.exp(4 * 0.9), math.exp(4 * 0.1)
    w = cal_weights(info, conf, tau=4.0, lam=0.5)
    assert w == pytest.approx({"a": ea / (ea + ev), "v": ev / (ea + ev)}, abs=1e-12)
    # with a dynamic potential P̂ = (.25, .75): D̃ = (.525, .475); score = (.7625, .2375)
    w2 = cal_weights(info, conf, 4.0, 0.5, potential={"a": 0.25, "v": 0.75})
    ea, ev = math.exp(4 * 0.7625), math.exp(4 * 0.2375)
    assert w2["a"] == pytest.approx(ea / (ea + ev), abs=1e-12)
    assert positive_share({"a": -1.0, "v": -2.0}) == {"a": 0.5, "v": 0.5}


def test_w_from_the_batch_by_hand():
    fix = CAL(warmup=0, use_potential=False)
    run, step = one_step(fix)
    try:
        feats = {m: f.detach() for m, f in step.features.items()}
        y = step.labels
        ad = run.adapter
        with torch.no_grad():
            def v(s):
                z = ad.head_forward(step.inputs, ad.masked_features(feats, list(s)))
                return F.log_softmax(z, 1)[torch.arange(len(y)), y].mean().item()

            phi_a = 0.5 * ((v(["audio"]) - v([])) + (v(["audio", "visual"]) - v(["visual"])))
            phi_v = 0.5 * ((v(["visual"]) - v([])) + (v(["audio", "visual"]) - v(["audio"])))
            conf = {m: F.softmax(ad.head_forward(step.inputs, ad.masked_features(feats, [m])), 1)[
                torch.arange(len(y)), y].mean().item() for m in feats}
        pos = [max(phi_a, 0), max(phi_v, 0)]
        i_hat = [p / sum(pos) for p in pos] if sum(pos) > 0 else [0.5, 0.5]
        d_hat = [conf["audio"] / sum(conf.values()), conf["visual"] / sum(conf.values())]
        s = [4 * (0.5 * i + 0.5 * d) for i, d in zip(i_hat, d_hat)]
        want = [math.exp(x) / sum(math.exp(t) for t in s) for x in s]
        assert [fix.signals()["W.audio"], fix.signals()["W.visual"]] == pytest.approx(want, abs=1e-6)
    finally:
        fix.teardown(run.ctx)


@pytest.mark.parametrize("fusion,strength", [("concat", (3.0, 0.8)), ("gated", (3.0, 0.8)), ("concat", (3.0, 0.8, 0.8))])
def test_coalition_values_reuse_equals_one_head_call_per_subset(fusion, strength):
    """v(all) and v({m}) come from the fused logits and the readouts; every v(S) must equal its own head call."""
    fix = CAL(warmup=0)
    run, step = one_step(fix, strength=strength, fusion=fusion)
    try:
        ad, y = run.adapter, step.labels
        mods = ad.modalities
        with torch.no_grad():
            readouts = {m: step.readout(run.ctx, [m]) for m in mods}
            subsets, values = fix._coalition_values(run.ctx, step, readouts)
            assert subsets == [frozenset(s) for r in range(len(mods) + 1) for s in itertools.combinations(mods, r)]
            for s, v in zip(subsets, values.tolist()):
                z = ad.head_forward(step.inputs, ad.masked_features(step.features, list(s)))
                assert v == pytest.approx(F.log_softmax(z, 1)[torch.arange(len(y)), y].mean().item(), abs=1e-6)
    finally:
        fix.teardown(run.ctx)


def test_acceleration_uses_one_plus_w():
    h = {"audio": torch.randn(4, 3, requires_grad=True), "visual": torch.randn(4, 3, requires_grad=True)}
    w = {"audio": 0.7, "visual": 0.3}
    out = scale_feature_gradients(h, {m: 1 + x for m, x in w.items()})
    (out["audio"].sum() + 2 * out["visual"].sum()).backward()
    assert torch.equal(h["audio"].grad, torch.full((4, 3), 1.7))
    assert torch.equal(h["visual"].grad, torch.full((4, 3), 2 * 1.3))


def test_bottleneck_starts_as_identity_and_kl_matches_torch():
    b = GaussianBottleneck()
    h = torch.randn(6, 5)
    mu, logvar = b(h)
    torch.testing.assert_close(mu, h)
    assert torch.allclose(logvar, torch.full_like(logvar, 5 * math.tanh(-4 / 5)))
    maps = torch.randn(2, 5, 3, 4)  # channel axis 1, as a 1x1 convolution
    mu2, _ = GaussianBottleneck()(maps)
    torch.testing.assert_close(mu2, maps)
    mu, logvar = torch.randn(6, 5), torch.randn(6, 5)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros(5), torch.ones(5))
    want = torch.distributions.kl_divergence(q, p).sum(1).mean()
    torch.testing.assert_close(gaussian_kl(mu, logvar), want)


def test_bottleneck_weight_follows_one_minus_w():
    fix = CAL(warmup=0, aib_weight=0.0, gamma=0.0)
    run, step = one_step(fix)
    try:
        fix._weights = {"audio": 0.8, "visual": 0.2}
        feats = dict(step.features)
        with torch.no_grad():
            got = fix._bottleneck(run.ctx, step)
            want = 0.0
            for m, wm in fix._weights.items():
                mu, lv = run.ctx.aux[f"cal_aib_{m}"](feats[m])
                want += 1e-3 * (1 - wm) * gaussian_kl(mu, lv)
        assert float(got) == pytest.approx(float(want), rel=1e-6)
    finally:
        fix.teardown(run.ctx)


@pytest.mark.parametrize("fusion,strength", [("gated", (3.0, 0.8)), ("sum", (3.0, 0.8)), ("concat", (3.0, 0.8, 0.8))])
def test_other_fusions_and_three_modalities(fusion, strength):
    run = train(CAL(warmup=0), strength, 0, fusion=fusion, epochs=1, max_steps=3)
    sig = run.fix.signals()
    assert len(sig) == len(strength) and sum(sig.values()) == pytest.approx(1.0)
    assert all(math.isfinite(v) for v in sig.values())


@pytest.mark.slow
def test_direction_raises_weak_modality_unimodal_accuracy():
    fixed, plain, full, _ = direction(CAL)
    assert sum(fixed) / len(fixed) > sum(plain) / len(plain) + 0.1, (fixed, plain)
    fused_fix = sum(a["fused"] for a in full) / len(full)
    fused_plain = sum(plain_accuracy(s)["fused"] for s in BUDGET.seeds) / len(BUDGET.seeds)
    assert fused_fix >= fused_plain - 0.02
