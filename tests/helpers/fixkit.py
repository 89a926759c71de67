"""The fix test kit: one training budget, one training loop, and the checks every fix passes.

The loop (:func:`train`) runs exactly the hook sequence documented in :mod:`mmdiag.fixes.base`, as a
user's own loop would::

    setup; per batch: fix_step -> zero_grad -> step.loss.backward() -> after_backward -> optimizer.step()
    -> signals(); per epoch: signals() and on_epoch_end; teardown in ``finally``

It does not depend on :mod:`mmdiag.train`; :func:`fit_run` is the one place that drives a fix through
the reference loop instead. Direction tests measure each modality's unimodal accuracy on the toy's
held-out half, masking the other modalities' encoder outputs through the adapter (readout R2 of
methods.md P1), for the fix and for plain training under the same :data:`BUDGET`, so that the
numbers of different fixes are comparable.
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
from mmdiag.examples_data.synthetic import ToyNet
from mmdiag.fixes.base import Fix, FixContext, PlainTraining, fix_step
from tests.helpers.toys import DOMINANT, names_for, toy_split

MODS = ("audio", "visual")


@dataclass(frozen=True)
class Budget:
    """Training budget shared by every direction test (the fix and its plain baseline alike)."""

    epochs: int = 16
    lr: float = 0.01
    #: SGD with momentum, the papers' setting: gradient-scaling fixes act through the gradient's
    #: size, which Adam's per-parameter normalisation would largely cancel.
    optimizer: str = "sgd"
    momentum: float = 0.9
    batch_size: int = 64
    seeds: tuple[int, ...] = (0, 1, 2)


#: the one training budget of the fix tests
BUDGET = Budget()
#: two batches an epoch: enough for the hook, teardown and signal checks
SHORT = slice(0, 128)


class Boom(Exception):
    """Raised on purpose in the middle of training."""


def raised_boom(exc: BaseException | None) -> bool:
    """Whether :class:`Boom` is ``exc`` or in its chain (the adapter wraps errors of a forward)."""
    while exc is not None:
        if isinstance(exc, Boom):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


# --------------------------------------------------------------------------------------- models
def toy_model(seed: int = 0, fusion: str = "concat", m_count: int = 2) -> ToyNet:
    """A fresh (untrained) ToyNet, initialised from ``seed``."""
    torch.manual_seed(seed)
    return ToyNet(names_for(m_count), fusion=fusion)  # type: ignore[arg-type]


class Blob(nn.Module):
    """A black box: one MLP over the concatenated inputs, no submodule named like a modality."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x: dict) -> Tensor:
        return self.net(torch.cat([x["audio"], x["visual"]], 1))


@dataclass
class Run:
    model: nn.Module
    adapter: ModelAdapter
    ctx: FixContext
    fix: Fix
    encoders: dict[str, nn.Module]
    #: one row per epoch: the fix's signals updated with what ``on_epoch_end`` returned
    history: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0


def tensors(data: Mapping[str, Any]) -> tuple[dict[str, Tensor], Tensor]:
    xs = {k: torch.as_tensor(v) for k, v in data.items() if k != "label"}
    return xs, torch.as_tensor(data["label"])


def make_run(fix: Fix, strength=DOMINANT, seed: int = 0, fusion: str = "concat", epochs: int | None = None,
             lr: float | None = None, model: nn.Module | None = None) -> Run:
    """A model (a fresh ToyNet unless given), its adapter, optimizer and fix context."""
    epochs = BUDGET.epochs if epochs is None else epochs
    lr = BUDGET.lr if lr is None else lr
    if model is None:
        model = toy_model(seed, fusion, len(strength))
    names = names_for(len(strength))
    adapter = ModelAdapter(model, tuple(names))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=BUDGET.momentum)
    ctx = FixContext(adapter=adapter, optimizer=opt, epochs=epochs, n_classes=4)
    encoders = {m: adapter.encoder_module(m) for m in names} if adapter.has_encoders else {}
    return Run(model, adapter, ctx, fix, encoders)


def train(fix: Fix, strength=DOMINANT, seed: int = 0, *, fusion: str = "concat", epochs: int | None = None,
          lr: float | None = None, batch_size: int | None = None, rows: slice | None = None,
          fail_at: int | None = None, max_steps: int | None = None, run: Run | None = None,
          on_step: Callable[[Run, Any], None] | None = None, keep_open: bool = False) -> Run:
    """Train a fresh ToyNet (or ``run``'s model) with ``fix`` on the toy's training half (``rows`` of it).

    Raises :class:`Boom` after the forward of step ``fail_at`` (the graph alive, before the
    backward). ``keep_open`` skips the final teardown (not the one after an exception), so that
    training can continue with :func:`continue_steps`.
    """
    epochs = BUDGET.epochs if epochs is None else epochs
    batch_size = BUDGET.batch_size if batch_size is None else batch_size
    run = run or make_run(fix, strength, seed, fusion, epochs, lr)
    xs, y = tensors(toy_split(tuple(strength), seed)[0])
    if rows is not None:
        xs, y = {m: x[rows] for m, x in xs.items()}, y[rows]
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
                fix.signals()  # the progress display reads them after every step
                if on_step is not None:
                    on_step(run, step)
            row = dict(fix.signals())
            row.update(fix.on_epoch_end(ctx, epoch) or {})
            run.history.append(row)
    except BaseException:
        fix.teardown(ctx)
        raise
    if not keep_open:
        fix.teardown(ctx)
    run.model.eval()
    return run


def fit_run(fix: Fix, seed: int = 0, strength=DOMINANT, model: nn.Module | None = None, *, validate: bool = True,
            rows: slice | None = None, **overrides: Any) -> tuple[nn.Module, Any]:
    """(model, history) of the reference loop :func:`mmdiag.train.fit` under :data:`BUDGET` on ``rows``
    of the training half (``overrides`` replace budget settings; ``validate=False`` leaves the
    validation columns out); the only place the kit calls the reference loop."""
    from mmdiag.train import fit

    train_data, val = toy_split(tuple(strength), seed)
    if rows is not None:
        train_data = {k: v[rows] for k, v in train_data.items()}
    model = model if model is not None else toy_model(seed, m_count=len(strength))
    settings = dict(epochs=BUDGET.epochs, optimizer=BUDGET.optimizer, lr=BUDGET.lr, momentum=BUDGET.momentum,
                    batch_size=BUDGET.batch_size)
    settings.update(overrides)
    adapter = ModelAdapter(model, tuple(names_for(len(strength))))
    hist = fit(adapter, train_data, val_data=val if validate else None, fix=fix, seed=seed, device="cpu", **settings)
    return model, hist


# --------------------------------------------------------------------------------------- readouts
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


def plain_accuracy(seed: int, strength=DOMINANT) -> dict[str, float]:
    """Plain training's held-out accuracies under :data:`BUDGET` (cached: every direction test shares it)."""
    return dict(_plain_accuracy(int(seed), tuple(strength)))


@functools.lru_cache(maxsize=None)
def _plain_accuracy(seed: int, strength: tuple[float, ...]) -> dict[str, float]:
    return evaluate(train(PlainTraining(), strength, seed), strength, seed)


def direction(make_fix: Callable[[], Fix], strength=DOMINANT, weak: str = "visual"
              ) -> tuple[list[float], list[float], list[dict[str, float]], list[Run]]:
    """(fix, plain) weak-modality unimodal accuracies per seed of :data:`BUDGET`, the fix's full
    accuracies and its runs."""
    fixed, plain, full, runs = [], [], [], []
    for s in BUDGET.seeds:
        runs.append(train(make_fix(), strength, s))
        acc = evaluate(runs[-1], strength, s)
        full.append(acc)
        fixed.append(acc[weak])
        plain.append(plain_accuracy(s, tuple(strength))[weak])
    return fixed, plain, full, runs


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def batch(strength=DOMINANT, seed: int = 0, n: int = 64, offset: int = 0) -> tuple[dict[str, Tensor], Tensor]:
    """A fixed training batch of the toy split."""
    xs, y = tensors(toy_split(tuple(strength), seed)[0])
    return {m: x[offset:offset + n] for m, x in xs.items()}, y[offset:offset + n]


def one_step(fix: Fix, strength=DOMINANT, seed: int = 0, epoch: int = 0, n: int = 64, fusion: str = "concat",
             run: Run | None = None, offset: int = 0):
    """(run, step) after setup, fix_step and the backward of ``step.loss``: before ``after_backward``.

    ``run`` reuses a model (its ``ctx`` gets ``fix``). The caller calls ``fix.teardown(run.ctx)``.
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


# --------------------------------------------------------------------------------------- hooks
HOOKS = ("setup", "forward", "loss", "after_backward", "on_epoch_end", "teardown", "signals")


def declared_hooks(cls: type[Fix]) -> list[str]:
    """The hooks ``cls`` implements itself (overrides of :class:`Fix`'s no-ops)."""
    return [h for h in HOOKS if getattr(cls, h) is not getattr(Fix, h)]


def counting(fix: Fix) -> Fix:
    """The same fix (parameters and state) with every hook call counted in ``_calls`` and
    ``forward``'s returns recorded in ``_forward_returns``."""
    base = type(fix)

    def wrap(hook: str) -> Callable[..., Any]:
        original = getattr(base, hook)

        def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
            self.__dict__.setdefault("_calls", {h: 0 for h in HOOKS})[hook] += 1
            out = original(self, *args, **kwargs)
            if hook == "forward":
                self.__dict__.setdefault("_forward_returns", []).append(out)
            return out

        return counted

    sub = type(f"Counting{base.__name__}", (base,), {h: wrap(h) for h in HOOKS})
    new = sub.__new__(sub)
    new.__dict__.update(copy.deepcopy(fix.__dict__))
    new.__dict__["_calls"] = {h: 0 for h in HOOKS}
    return new


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_state_dict_hooks", "_load_state_dict_pre_hooks")


def hook_dicts(module: nn.Module) -> list[tuple[str, str, int]]:
    """Every non-empty hook dictionary under ``module`` as (module name, kind, count)."""
    return [(name, k, len(d)) for name, sub in module.named_modules() for k in _HOOK_DICTS
            if (d := getattr(sub, k, None))]


def hook_inventory(model: nn.Module) -> dict[str, Any]:
    """Every module's and parameter's hooks and identity, and torch's global module hooks."""
    from torch.nn.modules import module as module_mod

    inv: dict[str, Any] = {}
    for name, mod in model.named_modules():
        for attr in _HOOK_DICTS:
            inv[f"{name}:{attr}"] = len(getattr(mod, attr, {}) or {})
        inv[f"{name}:class"] = type(mod).__name__
        inv[f"{name}:id"] = id(mod)
    for name, p in model.named_parameters():
        inv[f"{name}:id"] = id(p)
        inv[f"{name}:tensor_hooks"] = len(p._backward_hooks or {})
        inv[f"{name}:post_acc_hooks"] = len(getattr(p, "_post_accumulate_grad_hooks", None) or {})
    for attr in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks"):
        inv[f"global:{attr}"] = len(getattr(module_mod, attr, {}) or {})
    return inv


class HeadTrap:
    """Counts the fusion head's calls in training mode and raises :class:`Boom` on call ``at``
    (evaluation-mode calls are not counted). Installed as a forward pre-hook, so the head keeps its class."""

    def __init__(self, model: nn.Module, at: int | None = None) -> None:
        self.at, self.calls = at, 0
        self._handle = model.head.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any) -> None:
        if module.training:
            self.calls += 1
            if self.calls == self.at:
                raise Boom(f"failure injected inside head call {self.calls}")

    def remove(self) -> None:
        self._handle.remove()


def plain_grads(model: nn.Module, strength=DOMINANT, seed: int = 0) -> dict[str, Tensor]:
    """Gradients of the fused cross-entropy on a fixed batch, via a plain forward/backward."""
    xs, y = batch(strength, seed, 32)
    model.train()
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(xs), y).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


def assert_clean(run: Run, before: Mapping[str, Any]) -> None:
    """Nothing installed survives: the hook inventory is ``before``'s, the original encoders are in
    place, and plain gradients equal those of a fresh ToyNet holding the same weights."""
    model = run.model
    assert hook_inventory(model) == before, hook_dicts(model)
    for m, enc in run.encoders.items():
        assert run.adapter.encoder_module(m) is enc
    fresh = ToyNet(list(model.modalities), fusion=model.fusion)
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


def saved(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` after a trip through ``torch.save`` / ``torch.load(weights_only=True)``."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def roundtrip(fix: Fix) -> Fix:
    """A new instance with ``fix``'s parameters, loaded from its state saved through torch.save."""
    new = type(fix)(**fix.params())
    new.load_state_dict(saved(fix.state_dict()))
    assert_state_equal(new.state_dict(), fix.state_dict())
    assert new.signals() == fix.signals()
    return new


# --------------------------------------------------------------------------------------- checks
def check_hooks_fire(fix: Fix, epochs: int = 2, strength=DOMINANT, fusion: str = "concat",
                     rows: slice | None = None, run: Run | None = None,
                     on_step: Callable[[Run, Any], None] | None = None) -> Run:
    """Train ``counting(fix)`` (on ``run``'s model when given): every hook fires exactly as often as
    the loop calls it."""
    counted = counting(fix)
    if run is not None:
        run.fix = counted
    run = train(counted, strength, 0, epochs=epochs, fusion=fusion, rows=rows, run=run, on_step=on_step)
    calls = counted.__dict__["_calls"]
    steps = run.steps
    assert steps > 0
    # a fix may read its own signals too, so only their minimum count is the loop's
    assert calls["signals"] >= steps + epochs, calls
    assert {h: n for h, n in calls.items() if h != "signals"} == {
        "setup": 1, "forward": steps, "loss": steps, "after_backward": steps, "on_epoch_end": epochs,
        "teardown": 1}, calls
    assert len(run.history) == epochs
    return run


def check_teardown(make_fix: Callable[[], Fix], strength=DOMINANT, fusion: str = "concat",
                   rows: slice | None = None) -> Run:
    """Every hook fires (:func:`check_hooks_fire`) and nothing survives teardown: after normal
    training, after an exception between a step's forward and its backward, and after one raised
    inside the last head call of a step (stubs in place). Returns the normal run."""
    per_step: list[int] = []
    fix = make_fix()
    run = make_run(fix, strength, fusion=fusion)
    reference = hook_inventory(run.model)
    trap = HeadTrap(run.model)
    before = hook_inventory(run.model)
    normal = check_hooks_fire(fix, 2, strength, fusion, rows, run, lambda r, s: per_step.append(trap.calls))
    assert hook_inventory(run.model) == before
    trap.remove()
    assert_clean(run, reference)
    per_epoch = run.steps // 2

    fix = make_fix()
    run = make_run(fix, strength, fusion=fusion)
    before = hook_inventory(run.model)
    with pytest.raises(Boom):
        train(fix, strength, run=run, epochs=2, rows=rows, fail_at=per_epoch + 1)
    assert_clean(run, before)

    at = per_step[per_epoch + 1]  # the last head call of the second step of the second epoch
    fix = make_fix()
    run = make_run(fix, strength, fusion=fusion)
    reference = hook_inventory(run.model)
    trap = HeadTrap(run.model, at)
    before = hook_inventory(run.model)
    with pytest.raises(Exception) as info:
        train(fix, strength, run=run, epochs=2, rows=rows)
    assert raised_boom(info.value), info.value
    assert trap.calls == at
    assert hook_inventory(run.model) == before
    trap.remove()
    assert_clean(run, reference)
    return normal


def hand_readouts(model: nn.Module, inputs: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(encoder outputs, unimodal logits) of a concat ToyNet computed by hand: z_m = W [0..h_m..0] + b,
    the other modalities' blocks of the head's input zeroed (readout R2 with the zero mask)."""
    feats = {m: model.encoders[m](inputs[m]) for m in model.modalities}
    out = {}
    for m in model.modalities:
        blocks = [feats[k] if k == m else torch.zeros_like(feats[k]) for k in model.modalities]
        out[m] = model.head(torch.cat(blocks, dim=1))
    return feats, out
