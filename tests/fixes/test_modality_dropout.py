"""modality_dropout: combination draws, feature masking, hardest-combination CE, the black box, direction.

The contract every fix meets (hooks, teardown, state, parameters, distributed) is in test_conformance.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmdiag.errors import ConfigError
from mmdiag.fixes import FIXES, FixContext, fix_step
from mmdiag.fixes.modality_dropout import ModalityDropout
from tests.helpers.fixkit import (MODS, SHORT, Blob, batch, check_hooks_fire, direction, fit_run, make_run, mean,
                                  roundtrip, toy_model, train)


def _ctx(model: nn.Module) -> FixContext:
    return make_run(ModalityDropout(), model=model).ctx


def test_registered_with_metadata() -> None:
    cls = FIXES.get("modality_dropout")
    assert cls is ModalityDropout and not cls.needs_encoders
    assert cls().params() == {"beta": 0.2, "begin_epoch": 1, "hard": "dropped"}


@pytest.mark.parametrize("bad", [{"beta": -0.1}, {"hard": "some"}, {"begin_epoch": -1}])
def test_bad_params(bad: dict) -> None:
    with pytest.raises(ConfigError):
        ModalityDropout(**bad)


def test_combinations_are_every_non_empty_subset() -> None:
    assert ModalityDropout.combinations(("a", "v")) == [("a",), ("v",), ("a", "v")]
    assert len(ModalityDropout.combinations(("a", "b", "c"))) == 7


def test_draws_are_uniform_and_dropped_features_are_masked() -> None:
    """Per sample, one combination uniformly; the head sees zeros for the absent modalities."""
    model = toy_model(0)
    seen: list[torch.Tensor] = []
    hook = model.head.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    try:
        x, y = batch(n=600)
        fix = ModalityDropout()
        ctx = _ctx(model)
        fix.setup(ctx)
        torch.manual_seed(0)
        step = fix_step(ctx, fix, x, y)
    finally:
        hook.remove()
    fused_in = seen[-1]  # the dropout head call: [B, 32] = [audio 16 | visual 16]
    audio_on = fused_in[:, :16].abs().sum(1) > 0
    visual_on = fused_in[:, 16:].abs().sum(1) > 0
    assert bool((audio_on | visual_on).all())  # never both dropped
    frac = torch.stack([(audio_on & ~visual_on), (~audio_on & visual_on), (audio_on & visual_on)]).float().mean(1)
    assert torch.allclose(frac, torch.full((3,), 1 / 3), atol=0.06), frac
    # the loss is the fused CE of the dropout outputs
    assert torch.allclose(step.loss, F.cross_entropy(model.head(fused_in), y), atol=1e-5)


def test_weakest_combination_and_hard_loss() -> None:
    model = toy_model(0)
    fix = ModalityDropout(beta=0.5, begin_epoch=1)
    ctx = _ctx(model)
    fix.setup(ctx)
    fix._correct, fix._seen = [90.0, 30.0, 95.0], [100.0, 100.0, 100.0]
    sig = fix.on_epoch_end(ctx, 0)
    assert fix.weakest == "visual" and sig["weakest"] == "visual" and sig["weakest_acc"] == pytest.approx(0.3)
    assert sig["acc.audio+visual"] == pytest.approx(0.95)
    assert fix._seen == [0.0, 0.0, 0.0]  # accumulators reset for the next epoch
    x, y = batch()
    torch.manual_seed(1)
    step0 = fix_step(ctx, fix, x, y, epoch=0)  # before begin_epoch: no extra term
    assert "hard_loss" not in step0.logs
    torch.manual_seed(1)
    step1 = fix_step(ctx, fix, x, y, epoch=1)
    hard = step1.logs["hard_loss"]
    assert hard > 0
    assert float(step1.loss.detach()) == pytest.approx(float(step0.loss.detach()) + 0.5 * hard, rel=1e-5)


def test_hard_all_supervises_every_sample_on_the_weakest_combination() -> None:
    model = toy_model(0)
    fix = ModalityDropout(beta=1.0, hard="all")
    ctx = _ctx(model)
    fix.setup(ctx)
    fix._weakest = 1  # visual only
    x, y = batch()
    step = fix_step(ctx, fix, x, y, epoch=3)
    with torch.no_grad():
        feats = {m: model.encoders[m](x[m]) for m in MODS}
        z = model.head(torch.cat([torch.zeros_like(feats["audio"]), feats["visual"]], 1))
    assert step.logs["hard_loss"] == pytest.approx(float(F.cross_entropy(z, y)), rel=1e-5)


def test_black_box_model_drops_inputs() -> None:
    torch.manual_seed(0)
    _, hist = fit_run(ModalityDropout(), model=Blob(), epochs=2, lr=0.05)
    assert hist.last["signal.weakest"] in ("audio", "visual")


def test_every_hook_fires_and_signals_name_the_combinations() -> None:
    run = check_hooks_fire(ModalityDropout(), rows=SHORT)
    assert {"acc.audio", "acc.visual", "acc.audio+visual", "weakest", "weakest_acc"} <= set(
        ModalityDropout.signals_from(run.fix, {0: 1.0, 1: 0.5, 2: 1.0}))


def test_state_after_training_names_the_weakest_combination() -> None:
    run = train(ModalityDropout(), epochs=2)
    assert run.fix.weakest is not None
    roundtrip(run.fix)


def test_direction_weak_modality_gains() -> None:
    """Modality dropout raises the weak modality's unimodal accuracy over plain training."""
    fixed, plain, _, _ = direction(ModalityDropout)
    assert mean(fixed) > mean(plain) + 0.1, (fixed, plain)
    assert all(f > p for f, p in zip(fixed, plain)), (fixed, plain)
