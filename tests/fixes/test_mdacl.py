"""MDACL fix (proposed form): hooks, teardown, state, MDI parts by hand, GRL, gates, and what it does on the toy.

Measured on the toy dominance fixture (SGD, 16 epochs, seeds 0-2), MDACL at its defaults leaves the
weak modality's unimodal accuracy where plain training leaves it (0.300/0.442/0.385 vs
0.300/0.442/0.393), and stronger settings (λ_hcg = λ_adv = 1, the gradient-rescale companion) do not
change that: HCG and AER act on projected features, not on the head's use of the weak modality. So
the direction test asserts what holds: the running MDI that gates both terms points at the dominant
modality and flips with the knob, and the fix costs no fused or weak-modality accuracy.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fixes._loop import (SEEDS, check_hooks_fire, check_teardown, evaluate, one_step, plain_accuracy, roundtrip,
                         train)
from mmdiag.adapter import pool
from mmdiag.errors import ConfigError
from mmdiag.fixes import FIXES
from mmdiag.fixes.mdacl import (MDACL, grad_reverse, gradient_contribution, mdi_shares, mdi_value,
                                spectral_entropy)


def test_registered_with_methods_defaults():
    assert FIXES.get("mdacl") is MDACL
    p = MDACL().params()
    assert (p["lam"], p["lambda_hcg"], p["lambda_adv"], p["tau"]) == (0.5, 0.1, 0.1, 0.5)
    assert p["threshold"] == pytest.approx(math.log(1.5))
    assert MDACL.summary and MDACL.matches and "PROPOSED" in (MDACL.__doc__ or "")



@pytest.mark.parametrize("bad", [{"lam": -0.1}, {"threshold": 0.0}, {"tau": 0.0}, {"proj_dim": 0}, {"momentum": 1.0}])
def test_bad_parameters_are_config_errors(bad):
    with pytest.raises(ConfigError, match="mdacl: "):
        MDACL(**bad)


def test_every_hook_fires_and_signals():
    run = check_hooks_fire(MDACL())
    sig = run.fix.signals()
    assert set(sig) == {"mdi", "share.audio", "share.visual"}
    assert sig["share.audio"] + sig["share.visual"] == pytest.approx(1.0)
    assert sig["mdi"] == pytest.approx(math.log(sig["share.audio"] / sig["share.visual"]))
    assert {"mdacl_proj_audio", "mdacl_proj_visual", "mdacl_disc"} <= set(run.ctx.aux.keys())


def test_no_hook_survives_teardown_even_after_an_exception():
    check_teardown(lambda: MDACL(rescale=True))


def test_state_dict_roundtrip():
    run = train(MDACL(), epochs=1)
    roundtrip(run.fix)


def test_spectral_entropy_by_hand():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=g)
    xc = (x - x.mean(0)).double().numpy()
    lam = np.clip(np.linalg.eigvalsh(xc.T @ xc), 0, None)
    q = lam / lam.sum()
    q = q[q > 0]
    assert spectral_entropy(x) == pytest.approx(float(-(q * np.log(q)).sum() / math.log(6)), rel=1e-9)
    rank_one = torch.randn(50, 1, generator=g) * torch.randn(1, 6, generator=g)
    assert spectral_entropy(rank_one) == pytest.approx(0.0, abs=1e-6)
    iso = torch.cat([torch.eye(4), -torch.eye(4)])  # centred, equal variance in 4 directions
    assert spectral_entropy(iso) == pytest.approx(1.0)
    assert spectral_entropy(torch.ones(10, 3)) == 0.0


def test_gradient_contribution_shares_and_mdi_by_hand():
    g = torch.tensor([[1.0, 2.0], [0.5, -1.0]])
    h = torch.tensor([[1.0, 1.0], [2.0, 3.0]])
    # per-sample inner products 3 and -2 -> mean |.| = 2.5
    assert gradient_contribution(g, h) == pytest.approx(2.5)
    ent, con = {"a": 0.3, "v": 0.6}, {"a": 3.0, "v": 1.0}
    raw_a, raw_v = 0.75 ** 0.5 * (1 / 3) ** 0.5, 0.25 ** 0.5 * (2 / 3) ** 0.5
    s = mdi_shares(ent, con, 0.5)
    assert s["a"] == pytest.approx(raw_a / (raw_a + raw_v)) and s["v"] == pytest.approx(raw_v / (raw_a + raw_v))
    assert mdi_value(s) == pytest.approx(math.log(raw_a / raw_v))
    assert mdi_value({"x": 0.5, "y": 0.2, "z": 0.3}) == pytest.approx(math.log(0.5 / 0.2))
    assert mdi_shares({"a": 0.0, "v": 0.0}, {"a": 0.0, "v": 0.0}, 0.5) == {"a": 0.5, "v": 0.5}


def test_gradient_reversal_layer():
    x = torch.randn(3, 2, requires_grad=True)
    c = torch.randn(3, 2)
    y = grad_reverse(x, 0.25)
    assert torch.equal(y, x)
    (y * c).sum().backward()
    assert torch.equal(x.grad, -0.25 * c)


def test_gates_by_hand_and_off_when_balanced():
    fix = MDACL()
    fix._share = {"audio": 0.6, "visual": 0.4}
    gap = math.log(0.6 / 0.4)
    assert fix.dominant() == "audio"
    assert fix.hcg_gate("audio") == 0.0
    assert fix.hcg_gate("visual") == pytest.approx(min(1.0, gap / math.log(1.5)))
    assert fix.aer_coeff() == pytest.approx(0.1 * math.tanh(gap / 0.5))
    fix._share = {"audio": 0.5, "visual": 0.5}
    assert fix.hcg_gate("visual") == 0.0 and fix.aer_coeff() == 0.0
    fix._share = {"audio": 0.9, "visual": 0.1}
    assert fix.hcg_gate("visual") == 1.0


def test_running_share_is_an_ema_of_the_batch_mdi():
    fix = MDACL(momentum=0.5)
    run, step = one_step(fix)
    try:
        feats = {m: f.detach().requires_grad_() for m, f in step.features.items()}
        loss = F.cross_entropy(run.adapter.head_forward(step.inputs, feats), step.labels)
        grads = dict(zip(feats, torch.autograd.grad(loss, list(feats.values()))))
        ent = {m: spectral_entropy(pool(f)) for m, f in feats.items()}
        con = {m: gradient_contribution(grads[m], feats[m]) for m in feats}
        batch = mdi_shares(ent, con, 0.5)
        want = {m: 0.5 * 0.5 + 0.5 * batch[m] for m in batch}
        assert fix._batch_share == pytest.approx(batch, rel=1e-6)
        assert fix.signals()["share.audio"] == pytest.approx(want["audio"], rel=1e-6)
    finally:
        fix.teardown(run.ctx)


def test_rescale_companion_scales_encoder_gradients():
    fix = MDACL(rescale=True)
    run, step = one_step(fix)
    try:
        fix._share = {"audio": 0.8, "visual": 0.2}
        before = {m: [p.grad.clone() for p in run.ctx.encoder_parameters(m)] for m in ("audio", "visual")}
        fix.after_backward(run.ctx, step)
        for m, factor in (("audio", 0.625), ("visual", 2.0)):  # clip((1/2)/share, 0.5, 2)
            for p, b in zip(run.ctx.encoder_parameters(m), before[m]):
                torch.testing.assert_close(p.grad, b * factor)
    finally:
        fix.teardown(run.ctx)


@pytest.mark.parametrize("fusion,strength", [("gated", (3.0, 0.8)), ("sum", (3.0, 0.8)), ("concat", (3.0, 0.8, 0.8))])
def test_other_fusions_and_three_modalities(fusion, strength):
    run = train(MDACL(), strength, 0, fusion=fusion, epochs=1, max_steps=3)
    sig = run.fix.signals()
    assert len(sig) == len(strength) + 1 and all(math.isfinite(v) for v in sig.values())
    if len(strength) == 3:
        shares = [v for k, v in sig.items() if k.startswith("share.")]
        assert sig["mdi"] == pytest.approx(math.log(max(shares) / min(shares)))


@pytest.mark.slow
def test_direction_mdi_tracks_the_knob_and_the_fix_costs_nothing():
    runs = [train(MDACL(), (3.0, 0.8), s) for s in SEEDS]
    full = [evaluate(r, (3.0, 0.8), s) for r, s in zip(runs, SEEDS)]
    fixed = [a["visual"] for a in full]
    plain = [plain_accuracy(s)["visual"] for s in SEEDS]
    # no loss of weak-modality or fused accuracy (no gain either on this toy; see the module docstring)
    assert sum(fixed) / len(fixed) >= sum(plain) / len(plain) - 0.03, (fixed, plain)
    fused_fix = sum(a["fused"] for a in full) / len(full)
    assert fused_fix >= sum(plain_accuracy(s)["fused"] for s in SEEDS) / len(SEEDS) - 0.01
    # the running MDI gating HCG/AER points at the dominant modality, and flips with the knob
    audio_dominant = [r.history[-1]["mdi"] for r in runs]
    visual_dominant = [train(MDACL(), (0.8, 3.0), s).history[-1]["mdi"] for s in SEEDS]
    assert sum(audio_dominant) / 3 > 0.2 > -0.2 > sum(visual_dominant) / 3, (audio_dominant, visual_dominant)
