"""modality_dropout: combination draws, feature masking, hardest-combination CE, hygiene, direction."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmdiag.adapter import ModelAdapter
from mmdiag.errors import ConfigError
from mmdiag.fixes import FIXES, FixContext, fix_step
from mmdiag.fixes.modality_dropout import ModalityDropout
from mmdiag.train import fit

from .test_ogm_ge import (MODS, assert_no_leftovers, check_clean_after_error, check_hooks_fire,
                          check_state_round_trip, direction, hook_inventory, toy_model, train_toy)
from toys import DOMINANT, toy_split


def _ctx(model: nn.Module) -> FixContext:
    return FixContext(ModelAdapter(model, MODS), None, epochs=1, n_classes=4)


def _batch(n: int = 64, seed: int = 0) -> tuple[dict, torch.Tensor]:
    train, _ = toy_split(DOMINANT, seed)
    return {m: torch.as_tensor(train[m][:n]) for m in MODS}, torch.as_tensor(train["label"][:n])


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
        x, y = _batch(600)
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
    x, y = _batch()
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
    x, y = _batch()
    step = fix_step(ctx, fix, x, y, epoch=3)
    with torch.no_grad():
        feats = {m: model.encoders[m](x[m]) for m in MODS}
        z = model.head(torch.cat([torch.zeros_like(feats["audio"]), feats["visual"]], 1))
    assert step.logs["hard_loss"] == pytest.approx(float(F.cross_entropy(z, y)), rel=1e-5)


def test_black_box_model_drops_inputs() -> None:
    class Blob(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))

        def forward(self, x: dict) -> torch.Tensor:
            return self.net(torch.cat([x["audio"], x["visual"]], 1))

    train, val = toy_split(DOMINANT, 0)
    torch.manual_seed(0)
    hist = fit(ModelAdapter(Blob(), MODS), train, val_data=val, fix=ModalityDropout(), epochs=2, lr=0.05,
               device="cpu")
    assert hist.last["signal.weakest"] in ("audio", "visual")


def test_every_hook_fires() -> None:
    fix = check_hooks_fire(ModalityDropout)
    assert {"acc.audio", "acc.visual", "acc.audio+visual", "weakest", "weakest_acc"} <= set(
        ModalityDropout.signals_from(fix, {0: 1.0, 1: 0.5, 2: 1.0}))


def test_no_hook_survives_teardown() -> None:
    model = toy_model(0)
    before = hook_inventory(model)
    train, _ = toy_split(DOMINANT, 0)
    train_toy(ModalityDropout(), model=model, epochs=2)
    assert_no_leftovers(model, before, train)


def test_no_hook_survives_an_exception_mid_training() -> None:
    check_clean_after_error(ModalityDropout, at=2)  # raises inside the dropout head call (stubs in place)


def test_state_dict_round_trip() -> None:
    fix = ModalityDropout()
    train_toy(fix, epochs=2)
    assert fix.weakest is not None
    check_state_round_trip(fix, ModalityDropout())


def test_direction_weak_modality_gains() -> None:
    """Modality dropout raises the weak modality's unimodal accuracy over plain training."""
    fixed, plain = direction(ModalityDropout)
    assert sum(fixed) / 3 > sum(plain) / 3 + 0.1, (fixed, plain)
    assert all(f > p for f, p in zip(fixed, plain)), (fixed, plain)
