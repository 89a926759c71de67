"""dmrnet: the KL against its closed form, the Gaussian representation at the head's input, the
hard-combination choice and loss, the auxiliary head, direction under a missing dominant modality.

The contract every fix meets (hooks, teardown, state, parameters, distributed) is in test_conformance.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from mmdiag.errors import ConfigError
from mmdiag.fixes import FIXES, fix_step
from mmdiag.fixes._combinations import all_masks, combination_distribution, draw
from mmdiag.fixes.dmrnet import AUX_KEY, DMRNet, LogVarHead, kl_standard_normal, standardise
from tests.helpers.fixkit import (MODS, batch, check_hooks_fire, check_teardown, direction, fit_run, make_run, mean,
                                  roundtrip, toy_model, train)

ROWS = slice(0, 128)


def test_registered_with_metadata() -> None:
    cls = FIXES.get("dmrnet")
    assert cls is DMRNet and cls.needs_encoders and cls.targets == ("missing_modality",)
    assert cls().params() == {"alpha": 1e-3, "beta": 0.2, "detect_epochs": None, "missing": None,
                              "combinations": None}


@pytest.mark.parametrize("bad", [{"alpha": -1.0}, {"beta": float("nan")}, {"detect_epochs": 0},
                                 {"missing": "audio"}, {"combinations": 3}])
def test_bad_params(bad: dict) -> None:
    with pytest.raises(ConfigError, match=next(iter(bad))):
        DMRNet(**bad)


def test_kl_matches_the_closed_form() -> None:
    torch.manual_seed(0)
    mu, logvar = torch.randn(5, 7), torch.randn(5, 7)
    want = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(1).mean()
    assert float(kl_standard_normal(mu, logvar)) == pytest.approx(float(want), rel=1e-5)
    assert float(kl_standard_normal(torch.zeros(3, 4), torch.zeros(3, 4))) == 0.0


def test_standardise_and_the_log_variance_head() -> None:
    torch.manual_seed(0)
    u = torch.randn(16, 6) * torch.tensor([0.1, 1, 10, 1, 1, 1]) + 3
    mu, scale = standardise(u)
    assert torch.allclose(mu.mean(0), torch.zeros(6), atol=1e-5)
    assert torch.allclose(mu.std(0, unbiased=False), torch.ones(6), atol=1e-3)
    assert torch.allclose(mu * scale + u.mean(0), u, atol=1e-4)
    one, s1 = standardise(u[:1])
    assert torch.equal(one, u[:1]) and torch.equal(s1, torch.ones(1, 6))
    head = LogVarHead()
    out = head(mu)
    assert out.shape == (16, 6) and head.weight.shape == (6, 6)
    assert torch.allclose(out.mean(0), torch.zeros(6), atol=1e-5)  # batch-standardised, gamma 1, beta 0
    assert head(mu[:1]).shape == (1, 6)


def test_the_head_receives_mean_plus_scaled_noise_and_the_loss_adds_the_kl() -> None:
    """z = u + s * sigma * eps at the head's input; with sigma -> 0 the logits are the dropout logits."""
    model = toy_model(0)
    fix = DMRNet(alpha=0.5, beta=0.0)
    run = make_run(fix, model=model)
    fix.setup(run.ctx)
    x, y = batch()
    torch.manual_seed(3)
    step = fix_step(run.ctx, fix, x, y)
    head = run.ctx.aux[AUX_KEY]
    with torch.no_grad():
        head.beta.fill_(-80.0)  # sigma ~ 0
    torch.manual_seed(3)
    quiet = fix_step(run.ctx, fix, x, y)
    torch.manual_seed(3)
    index, keep = draw(combination_distribution("dmrnet", MODS), all_masks(MODS), 64, torch.device("cpu"))
    with torch.no_grad():
        feats = [model.encoders[m](x[m]) * keep[:, j:j + 1] for j, m in enumerate(MODS)]
        plain = model.head(torch.cat(feats, 1))
    assert torch.allclose(quiet.logits, plain, atol=1e-4)
    assert not torch.allclose(step.logits, plain, atol=1e-2)  # sigma ~ 1 at the start: noisy
    kl = step.logs["kl"]
    assert float(step.loss.detach()) == pytest.approx(float(F.cross_entropy(step.logits.detach(), y)) + 0.5 * kl, rel=1e-5)
    assert any(p is q for g in run.ctx.optimizer.param_groups for p in g["params"] for q in head.parameters())
    fix.teardown(run.ctx)
    model.train()
    torch.manual_seed(5)
    out1 = model(x)
    out2 = model(x)
    assert torch.equal(out1, out2)  # nothing stochastic remains in the model


def test_hard_combination_is_the_largest_mean_variance_in_the_support() -> None:
    fix = DMRNet(detect_epochs=1)
    run = make_run(fix)
    fix.setup(run.ctx)
    fix._s["epoch_sum"], fix._s["epoch_count"] = [10.0, 30.0, 90.0], [10.0, 10.0, 10.0]
    sig = fix.on_epoch_end(run.ctx, 0)
    assert sig["weak"] == "visual" and sig["weak_var"] == pytest.approx(3.0)  # the full set is no candidate
    assert sig["var.audio+visual"] == pytest.approx(9.0)
    only = DMRNet(detect_epochs=1, combinations="audio=0.5,audio+visual=0.5")
    run = make_run(only)
    only.setup(run.ctx)
    only._s["epoch_sum"], only._s["epoch_count"] = [10.0, 0.0, 90.0], [10.0, 0.0, 10.0]
    assert only.on_epoch_end(run.ctx, 0)["weak"] == "audio"


def test_hard_loss_is_the_weak_samples_cross_entropy_over_the_batch() -> None:
    fix = DMRNet(alpha=0.0, beta=2.0, detect_epochs=1)
    run = make_run(fix)
    fix.setup(run.ctx)
    fix._s["weak"] = 1  # visual only
    x, y = batch()
    torch.manual_seed(7)
    step = fix_step(run.ctx, fix, x, y, epoch=1)
    torch.manual_seed(7)
    index, _ = draw(combination_distribution("dmrnet", MODS), all_masks(MODS), 64, torch.device("cpu"))
    sel = index == 1
    want = F.cross_entropy(step.logits.detach()[sel], y[sel], reduction="sum") / 64
    assert step.logs["hard"] == pytest.approx(float(want), rel=1e-5)
    assert float(step.loss.detach()) == pytest.approx(float(F.cross_entropy(step.logits.detach(), y)) + 2.0 * float(want), rel=1e-5)
    fix.teardown(run.ctx)


def test_detection_then_hard_loss_in_training() -> None:
    run = train(DMRNet(detect_epochs=2), epochs=3, rows=ROWS)
    rows = run.history
    assert "weak" not in rows[0] and rows[1]["weak"] in ("audio", "visual") and rows[2] == rows[1]
    assert all(rows[1][f"var.{c}"] > 0 for c in ("audio", "visual", "audio+visual"))


def test_without_a_known_head_the_encoder_outputs_are_perturbed() -> None:
    fix = DMRNet(detect_epochs=1)
    run = make_run(fix)
    run.adapter.head = None
    train(fix, run=run, epochs=2, rows=ROWS)
    assert run.ctx.aux[AUX_KEY].weight.shape == (32, 32)  # two 16-dim encoder outputs
    assert run.history[-1]["weak"] in ("audio", "visual")


def test_hooks_fire_teardown_is_clean_and_state_round_trips() -> None:
    run = check_hooks_fire(DMRNet(detect_epochs=1), rows=ROWS)
    check_teardown(lambda: DMRNet(detect_epochs=1), rows=ROWS, fusion="gated")
    roundtrip(run.fix)


def test_reference_loop_and_three_modalities() -> None:
    model, hist = fit_run(DMRNet(detect_epochs=1), epochs=2, batch_size=128, validate=False)
    assert hist.last["signal.weak"] in ("audio", "visual") and math.isfinite(hist.last["log.kl"])
    run = train(DMRNet(detect_epochs=1, missing="m0=0.5"), strength=(3.0, 1.0, 0.5), epochs=2, rows=ROWS)
    assert run.history[-1]["weak"] == "m1+m2"  # m1 and m2 are never missing: the only proper combination


@pytest.mark.slow
def test_direction_accuracy_with_the_dominant_modality_missing_rises() -> None:
    """Fused accuracy with audio (the dominant modality) masked at deployment, over 3 seeds."""
    res = direction(DMRNet)
    fixed, plain = res[0], res[1]
    assert mean(fixed) > mean(plain) + 0.1, (fixed, plain)
    assert all(f > p for f, p in zip(fixed, plain)), (fixed, plain)
