"""A minimal training loop for fix tests, independent of :mod:`mmdiag.train`.

It runs exactly the hook sequence documented in :mod:`mmdiag.fixes.base`::

    setup; per batch: fix_step -> zero_grad -> step.loss.backward() -> after_backward -> optimizer.step();
    on_epoch_end per epoch; teardown in ``finally``

and measures per-modality unimodal accuracy on held-out toy data by masking the other modalities'
encoder outputs through the adapter (readout R2 of methods.md P1).
"""

from __future__ import annotations

import copy
import functools
import io
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmdiag.adapter import ModelAdapter
from mmdiag.fixes.base import Fix, FixContext, PlainTraining, fix_step
from mmdiag.synthetic import ToyNet
from toys import DOMINANT, names_for, toy_split

#: training budget of the direction tests (same for the fix and the plain baseline)
EPOCHS = 16
LR = 0.01
OPTIMIZER = "sgd"
BATCH = 64
SEEDS = (0, 1, 2)


class Boom(RuntimeError):
    """Raised on purpose in the middle of training."""


@dataclass
class Run:
    model: nn.Module
    adapter: ModelAdapter
    ctx: FixContext
    fix: Fix
    encoders: dict[str, nn.Module]
    history: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0


def tensors(data: Mapping[str, Any]) -> tuple[dict[str, Tensor], Tensor]:
    xs = {k: torch.as_tensor(v) for k, v in data.items() if k != "label"}
    return xs, torch.as_tensor(data["label"])


def make_run(fix: Fix, strength=DOMINANT, seed: int = 0, fusion: str = "concat", epochs: int | None = None,
             lr: float | None = None) -> Run:
    epochs = EPOCHS if epochs is None else epochs
    lr = LR if lr is None else lr
    torch.manual_seed(seed)
    names = names_for(len(strength))
    model = ToyNet(names, fusion=fusion)  # type: ignore[arg-type]
    adapter = ModelAdapter(model, tuple(names))
    if OPTIMIZER == "sgd":
        # The papers' setting (SGD with momentum): gradient-scaling fixes act through the gradient's
        # size, which Adam's per-parameter normalisation would largely cancel.
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    ctx = FixContext(adapter=adapter, optimizer=opt, epochs=epochs, n_classes=4)
    encoders = {m: adapter.encoder_module(m) for m in names}
    return Run(model, adapter, ctx, fix, encoders)


def train(fix: Fix, strength=DOMINANT, seed: int = 0, *, fusion: str = "concat", epochs: int | None = None,
          lr: float | None = None, batch_size: int = BATCH, fail_at: int | None = None, max_steps: int | None = None,
          run: Run | None = None, on_step: Callable[[Run, Any], None] | None = None) -> Run:
    """Train a fresh ToyNet (or ``run``'s model) with ``fix``; raises :class:`Boom` at step ``fail_at``."""
    epochs = EPOCHS if epochs is None else epochs
    run = run or make_run(fix, strength, seed, fusion, epochs, lr)
    train_data, _ = toy_split(tuple(strength), seed)
    xs, y = tensors(train_data)
    order_gen = torch.Generator().manual_seed(1000 + seed)
    ctx, opt = run.ctx, run.ctx.optimizer
    assert opt is not None
    run.model.train()
    fix.setup(ctx)
    try:
        for epoch in range(epochs):
            order = torch.randperm(len(y), generator=order_gen)
            for index, start in enumerate(range(0, len(y), batch_size)):
                if max_steps is not None and run.steps >= max_steps:
                    break
                idx = order[start:start + batch_size]
                step = fix_step(ctx, fix, {m: x[idx] for m, x in xs.items()}, y[idx], epoch, index)
                if fail_at is not None and run.steps == fail_at:
                    raise Boom(f"failure injected at step {run.steps}")
                opt.zero_grad()
                step.loss.backward()
                fix.after_backward(ctx, step)
                opt.step()
                run.steps += 1
                if on_step is not None:
                    on_step(run, step)
            run.history.append(dict(fix.on_epoch_end(ctx, epoch)))
    finally:
        fix.teardown(ctx)
    run.model.eval()
    return run


@torch.no_grad()
def unimodal_accuracy(adapter: ModelAdapter, data: Mapping[str, Any]) -> dict[str, float]:
    """Accuracy of each modality alone (others zeroed at the encoder output) and of the fused model."""
    was = adapter.model.training
    adapter.model.eval()
    xs, y = tensors(data)
    logits, feats = adapter.encode(xs)
    out = {"fused": (logits.argmax(1) == y).float().mean().item()}
    for m in adapter.modalities:
        z = adapter.head_forward(xs, adapter.masked_features(feats, [m]))
        out[m] = (z.argmax(1) == y).float().mean().item()
    adapter.model.train(was)
    return out


def evaluate(run: Run, strength=DOMINANT, seed: int = 0) -> dict[str, float]:
    return unimodal_accuracy(run.adapter, toy_split(tuple(strength), seed)[1])


def plain_accuracy(seed: int, strength=DOMINANT, epochs: int | None = None) -> dict[str, float]:
    """Plain training's held-out accuracies (cached: shared by every direction test)."""
    return dict(_plain_accuracy(int(seed), tuple(strength), EPOCHS if epochs is None else int(epochs)))


@functools.lru_cache(maxsize=None)
def _plain_accuracy(seed: int, strength: tuple[float, ...], epochs: int) -> dict[str, float]:
    return evaluate(train(PlainTraining(), strength, seed, epochs=epochs), strength, seed)


def direction(make_fix: Callable[[], Fix], strength=DOMINANT, seeds=SEEDS, epochs: int | None = None,
              weak: str = "visual") -> tuple[list[float], list[float], list[dict[str, float]]]:
    """(fix, plain) weak-modality unimodal accuracies per seed, plus the fix's full accuracies."""
    fixed, plain, full = [], [], []
    for s in seeds:
        acc = evaluate(train(make_fix(), strength, s, epochs=epochs), strength, s)
        full.append(acc)
        fixed.append(acc[weak])
        plain.append(plain_accuracy(s, tuple(strength), epochs)[weak])
    return fixed, plain, full


def batch(strength=DOMINANT, seed: int = 0, n: int = 64, offset: int = 0) -> tuple[dict[str, Tensor], Tensor]:
    """A fixed training batch of the toy split."""
    xs, y = tensors(toy_split(tuple(strength), seed)[0])
    return {m: x[offset:offset + n] for m, x in xs.items()}, y[offset:offset + n]


def one_step(fix: Fix, strength=DOMINANT, seed: int = 0, epoch: int = 0, n: int = 64, fusion: str = "concat",
             run: Run | None = None, offset: int = 0):
    """(run, step) after setup, fix_step and the backward of ``step.loss`` — before ``after_backward``.

    ``run`` reuses a trained model (its ``ctx`` gets ``fix``). The caller calls
    ``fix.teardown(run.ctx)`` when done.
    """
    if run is None:
        run = make_run(fix, strength, seed, fusion)
    else:
        run.fix = fix
    run.model.train()
    fix.setup(run.ctx)
    xs, y = batch(strength, seed, n, offset)
    step = fix_step(run.ctx, fix, xs, y, epoch, 0)
    assert run.ctx.optimizer is not None
    run.ctx.optimizer.zero_grad()
    step.loss.backward()
    return run, step


# ---------------------------------------------------------------------------------------------- checks
HOOKS = ("setup", "forward", "loss", "after_backward", "on_epoch_end", "teardown")


def counting(fix: Fix) -> Fix:
    """The same fix with every hook call counted (``fix._calls``) and ``forward``'s returns recorded."""
    base = type(fix)

    class Counting(base):  # type: ignore[misc, valid-type]
        pass

    def wrap(hook: str):
        original = getattr(base, hook)

        def counted(self, *args, **kwargs):
            self.__dict__.setdefault("_calls", {h: 0 for h in HOOKS})[hook] += 1
            out = original(self, *args, **kwargs)
            if hook == "forward":
                self.__dict__.setdefault("_forward_returns", []).append(out)
            return out

        return counted

    for h in HOOKS:
        setattr(Counting, h, wrap(h))
    Counting.__name__ = f"Counting{base.__name__}"
    new = Counting.__new__(Counting)
    new.__dict__.update(copy.deepcopy(fix.__dict__))
    new.__dict__["_calls"] = {h: 0 for h in HOOKS}
    return new


def hook_dicts(module: nn.Module) -> list[tuple[str, str, int]]:
    """Every non-empty hook dictionary under ``module`` as (module name, kind, count)."""
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
             "_state_dict_hooks", "_load_state_dict_pre_hooks")
    found = []
    for name, sub in module.named_modules():
        for k in kinds:
            d = getattr(sub, k, None)
            if d:
                found.append((name, k, len(d)))
    return found


def plain_grads(model: nn.Module, strength=DOMINANT, seed: int = 0, train_mode: bool = True) -> dict[str, Tensor]:
    """Gradients of the fused cross-entropy on a fixed batch, via a plain forward/backward."""
    xs, y = tensors(toy_split(tuple(strength), seed)[0])
    model.train(train_mode)
    model.zero_grad()
    F.cross_entropy(model({m: x[:32] for m, x in xs.items()}), y[:32]).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return grads


def assert_clean(run: Run) -> None:
    """No hook left on the model, original encoders in place, plain gradients as on a fresh copy."""
    model = run.model
    assert hook_dicts(model) == [], hook_dicts(model)
    for m, enc in run.encoders.items():
        assert run.adapter.encoder_module(m) is enc
    names = list(run.encoders)
    fresh = ToyNet(names, fusion=model.fusion)
    fresh.load_state_dict(model.state_dict())
    assert set(fresh.state_dict()) == set(model.state_dict())
    got, want = plain_grads(model), plain_grads(fresh)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=0)


def assert_state_equal(a: Any, b: Any) -> None:
    """Recursive equality of state dicts (tensors exactly)."""
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor) and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, Mapping):
        assert isinstance(b, Mapping) and set(a) == set(b), (a, b)
        for k in a:
            assert_state_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b)
        for x, z in zip(a, b):
            assert_state_equal(x, z)
    else:
        assert a == b, (a, b)


def check_hooks_fire(fix: Fix, epochs: int = 2, strength=DOMINANT, fusion: str = "concat") -> Run:
    """Train ``counting(fix)`` for a few epochs; every hook of the loop must have fired the right number of times."""
    counted = counting(fix)
    run = train(counted, strength, 0, epochs=epochs, fusion=fusion)
    calls = counted.__dict__["_calls"]
    steps = run.steps
    assert steps > 0
    assert calls == {"setup": 1, "forward": steps, "loss": steps, "after_backward": steps,
                     "on_epoch_end": epochs, "teardown": 1}, calls
    assert len(run.history) == epochs
    return run


def check_teardown(make_fix: Callable[[], Fix], strength=DOMINANT) -> None:
    """No hook or swapped module survives teardown, after normal training and after an exception."""
    fix = make_fix()
    run = make_run(fix, strength)
    train(fix, strength, run=run, epochs=2)
    assert_clean(run)
    fix = make_fix()
    run = make_run(fix, strength)
    with pytest.raises(Boom):
        train(fix, strength, run=run, epochs=3, fail_at=12)
    assert_clean(run)


def roundtrip(fix: Fix) -> Fix:
    """Save ``fix``'s state through torch.save, load it into a new instance with the same parameters."""
    buf = io.BytesIO()
    torch.save(fix.state_dict(), buf)
    buf.seek(0)
    new = type(fix)(**fix.params())
    new.load_state_dict(torch.load(buf, weights_only=True))
    assert_state_equal(new.state_dict(), fix.state_dict())
    assert new.signals() == fix.signals()
    return new
