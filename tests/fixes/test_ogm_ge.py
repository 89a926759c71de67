"""ogm_ge: formula, gradient changes, hook hygiene, state round-trip, and direction on the toy.

The helpers at the top (counting subclass, hook inventory, training on the toy) are shared with
``test_agm.py`` and ``test_modality_dropout.py``.
"""

from __future__ import annotations

import copy
import io
import math
from collections import Counter
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmdiag.adapter import ModelAdapter
from mmdiag.errors import ConfigError, TrainError
from mmdiag.fixes import FIXES, Fix, FixContext, fix_step
from mmdiag.fixes.ogm_ge import OGMGE, head_split_logits
from mmdiag.synthetic import ToyNet
from mmdiag.train import fit
from toys import DOMINANT, toy_split

MODS = ("audio", "visual")
HOOKS = ("setup", "forward", "loss", "after_backward", "on_epoch_end", "teardown", "signals")
#: the direction-test budget: plain SGD, as OGM-GE and AGM were designed for
BUDGET = dict(epochs=10, optimizer="sgd", lr=0.01, batch_size=64)


# ------------------------------------------------------------------------------------- helpers
def counting(cls: type[Fix]) -> type[Fix]:
    """A subclass of ``cls`` that counts every hook call in ``self.calls``."""
    ns: dict[str, Any] = {}
    for hook in HOOKS:
        def wrapper(self: Any, *args: Any, _hook: str = hook, **kwargs: Any) -> Any:
            self.__dict__.setdefault("calls", Counter())[_hook] += 1
            return getattr(super(sub, self), _hook)(*args, **kwargs)
        ns[hook] = wrapper
    sub = type(f"Counting{cls.__name__}", (cls,), ns)
    return sub


class Boom(nn.Module):
    """Wraps a head and raises on its ``at``-th call in training mode (to interrupt training
    mid-step; the adapter checks in eval mode run first and are not counted)."""

    def __init__(self, inner: nn.Module, at: int) -> None:
        super().__init__()
        self.inner, self.at, self.calls = inner, at, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                raise RuntimeError("boom")
        return self.inner(x)


def toy_model(seed: int = 0, fusion: str = "concat") -> ToyNet:
    torch.manual_seed(seed)
    return ToyNet(list(MODS), fusion=fusion)  # type: ignore[arg-type]


def hook_inventory(model: nn.Module) -> dict[str, Any]:
    """Every hook container of every module and parameter, plus the encoder objects."""
    inv: dict[str, Any] = {}
    for name, mod in model.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                     "_state_dict_hooks", "_load_state_dict_pre_hooks"):
            inv[f"{name}:{attr}"] = len(getattr(mod, attr, {}) or {})
        inv[f"{name}:class"] = type(mod).__name__
        inv[f"{name}:id"] = id(mod)
    for name, p in model.named_parameters():
        inv[f"{name}:tensor_hooks"] = len(p._backward_hooks or {})
        inv[f"{name}:post_acc_hooks"] = len(getattr(p, "_post_accumulate_grad_hooks", None) or {})
    from torch.nn.modules import module as module_mod

    for attr in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks"):
        inv[f"global:{attr}"] = len(getattr(module_mod, attr, {}) or {})
    return inv


def plain_grads(model: nn.Module, data: dict) -> dict[str, torch.Tensor]:
    """Gradients of the plain fused CE on a fixed batch."""
    model.zero_grad(set_to_none=True)
    x = {m: torch.as_tensor(data[m][:64]) for m in MODS}
    F.cross_entropy(model(x), torch.as_tensor(data["label"][:64])).backward()
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


def assert_no_leftovers(model: nn.Module, before: dict[str, Any], data: dict) -> None:
    """No hook survives, the encoders are the original modules, and gradients are plain ones."""
    assert hook_inventory(model) == before
    twin = copy.deepcopy(model)
    got, ref = plain_grads(model, data), plain_grads(twin, data)
    for n in ref:
        assert torch.equal(got[n], ref[n]), n


def train_toy(fix: Fix, seed: int = 0, strength: tuple = DOMINANT, model: nn.Module | None = None,
              **kw: Any) -> tuple[nn.Module, Any]:
    train, val = toy_split(strength, seed)
    model = model if model is not None else toy_model(seed)
    settings = {**BUDGET, **kw}
    hist = fit(ModelAdapter(model, MODS), train, val_data=val, fix=fix, seed=seed, device="cpu", **settings)
    return model, hist


def check_hooks_fire(cls: type[Fix], **params: Any) -> Fix:
    fix = counting(cls)(**params)
    train_toy(fix, epochs=2)
    calls = fix.calls  # type: ignore[attr-defined]
    for hook in HOOKS:
        assert calls[hook] > 0, f"{hook} never fired"
    assert calls["setup"] == 1 and calls["teardown"] == 1 and calls["on_epoch_end"] == 2
    return fix


def check_clean_after_error(cls: type[Fix], at: int, **params: Any) -> None:
    """Interrupt training by an exception raised inside the ``at``-th head call."""
    model = toy_model(0)
    train, _ = toy_split(DOMINANT, 0)
    reference = hook_inventory(model)
    original_head = model.head
    model.head = Boom(model.head, at)  # type: ignore[assignment]
    before = hook_inventory(model)
    encoders = {m: model.encoders[m] for m in MODS}
    fix = counting(cls)(**params)
    with pytest.raises(Exception, match="boom"):  # the adapter may wrap it in an AdapterError
        fit(ModelAdapter(model, MODS, head="head"), train, fix=fix, epochs=2, lr=0.01, device="cpu")
    assert fix.calls["setup"] == 1 and fix.calls["teardown"] == 1  # type: ignore[attr-defined]
    assert model.head.calls == at
    assert hook_inventory(model) == before
    assert all(model.encoders[m] is encoders[m] for m in MODS)
    model.head = original_head  # type: ignore[assignment]
    assert hook_inventory(model) == reference
    assert_no_leftovers(model, reference, train)


def check_state_round_trip(fix: Fix, fresh: Fix) -> None:
    state = fix.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    fresh.load_state_dict(loaded)
    assert fresh.state_dict() == state
    assert fresh.signals() == fix.signals()


def direction(make_fix: Callable[[], Fix], seeds: tuple[int, ...] = (0, 1, 2)) -> tuple[list[float], list[float]]:
    """Weak-modality (visual) unimodal validation accuracy with the fix and with plain training."""
    fixed, plain = [], []
    for seed in seeds:
        _, h = train_toy(make_fix(), seed)
        fixed.append(h.last["unimodal_acc.visual"])
        _, h0 = train_toy(FIXES.get("none")(), seed)
        plain.append(h0.last["unimodal_acc.visual"])
    return fixed, plain


# ------------------------------------------------------------------------------------- tests
def test_registered_with_metadata() -> None:
    cls = FIXES.get("ogm_ge")
    assert cls is OGMGE and cls.needs_encoders
    assert cls().params() == {"alpha": 0.1, "mode": "ogm_ge", "start_epoch": 0, "end_epoch": 50,
                              "scope": "weights", "readout": "auto"}


@pytest.mark.parametrize("bad", [{"alpha": -1.0}, {"mode": "ogm3"}, {"scope": "bias"}, {"readout": "x"},
                                 {"start_epoch": 5, "end_epoch": 2}])
def test_bad_params(bad: dict) -> None:
    with pytest.raises(ConfigError):
        OGMGE(**bad)


def _ctx_step(model: nn.Module, fix: Fix, n: int = 32, seed: int = 0) -> tuple[FixContext, Any]:
    train, _ = toy_split(DOMINANT, seed)
    adapter = ModelAdapter(model, MODS)
    ctx = FixContext(adapter, torch.optim.SGD(model.parameters(), lr=0.1), epochs=1, n_classes=4)
    x = {m: torch.as_tensor(train[m][:n]) for m in MODS}
    step = fix_step(ctx, fix, x, torch.as_tensor(train["label"][:n]))
    return ctx, step


def test_ratio_and_coefficient_match_the_formula() -> None:
    """s^m from the head split, rho = s^a/s^v, k = 1 - tanh(alpha rho) for the dominant one."""
    from toys import trained_toy

    model = copy.deepcopy(trained_toy(DOMINANT, 0))
    fix = OGMGE(alpha=0.3)
    ctx, step = _ctx_step(model, fix)
    rho, coeff = fix.ratios(ctx, step)
    assert fix._split is True  # a concat-linear head: readout R1
    with torch.no_grad():
        feats = {m: model.encoders[m](step.inputs[m]) for m in MODS}
        w, b = model.head.weight, model.head.bias
        za = feats["audio"] @ w[:, :16].t() + b / 2
        zv = feats["visual"] @ w[:, 16:].t() + b / 2
        sa = F.softmax(za, 1).gather(1, step.labels[:, None]).sum().item()
        sv = F.softmax(zv, 1).gather(1, step.labels[:, None]).sum().item()
    assert rho["audio"] == pytest.approx(sa / sv, rel=1e-5)
    assert rho["visual"] == pytest.approx(sv / sa, rel=1e-5)
    assert rho["audio"] > 1  # the dominant modality of the toy
    assert coeff["audio"] == pytest.approx(1 - math.tanh(0.3 * sa / sv), rel=1e-5)
    assert coeff["visual"] == 1.0


def test_head_split_helper_splits_bias() -> None:
    head = nn.Linear(6, 3)
    h = {"a": torch.randn(4, 2), "b": torch.randn(4, 4)}
    z = head_split_logits(head, h, ("a", "b"))
    full = head(torch.cat([h["a"], h["b"]], 1))
    assert torch.allclose(z["a"] + z["b"], full, atol=1e-6)


def test_non_linear_fusion_uses_masked_readouts() -> None:
    fix = OGMGE()
    ctx, step = _ctx_step(toy_model(0, "gated"), fix)
    rho, _ = fix.ratios(ctx, step)
    assert fix._split is False
    assert all(math.isfinite(v) and v > 0 for v in rho.values())
    with pytest.raises(ConfigError, match="split"):
        OGMGE(readout="split").ratios(*_ctx_step(toy_model(0, "gated"), OGMGE(readout="split")))


@pytest.mark.parametrize("mode", ["ogm", "ogm_ge"])
def test_gradient_change(mode: str) -> None:
    """ogm: g <- k g exactly on >1-D encoder params of the dominant modality; ogm_ge adds noise
    of the gradient's own scale; biases and the other modality are untouched (mode ogm)."""
    from toys import trained_toy

    model = copy.deepcopy(trained_toy(DOMINANT, 0))
    fix = OGMGE(alpha=0.5, mode=mode)
    ctx, step = _ctx_step(model, fix)
    step.loss.backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    _, coeff = fix.ratios(ctx, step)
    torch.manual_seed(0)
    fix.after_backward(ctx, step)
    k = coeff["audio"]
    assert k < 1
    for n, p in model.named_parameters():
        g0 = before[n]
        if n.startswith("encoders.audio") and p.dim() > 1:
            if mode == "ogm":
                assert torch.allclose(p.grad, k * g0)
            else:
                noise = p.grad - k * g0
                assert not torch.allclose(p.grad, k * g0)
                assert noise.std().item() == pytest.approx(g0.std().item(), rel=0.6)
        elif mode == "ogm" or not (n.startswith("encoders.") and p.dim() > 1):
            assert torch.equal(p.grad, g0), n


def test_outside_the_window_nothing_changes() -> None:
    model = toy_model(0)
    fix = OGMGE(alpha=0.5, start_epoch=3, end_epoch=5)
    ctx, step = _ctx_step(model, fix)
    step.loss.backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    fix.after_backward(ctx, step)  # epoch 0 < start_epoch
    assert all(torch.equal(p.grad, before[n]) for n, p in model.named_parameters())
    assert fix.signals()["coeff.audio"] == 1.0 and "ratio.audio" in fix.signals()


def test_black_box_model_is_refused() -> None:
    class Blob(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(16, 4)

        def forward(self, x: dict) -> torch.Tensor:
            return self.net(torch.cat([x["audio"], x["visual"]], 1))

    train, _ = toy_split(DOMINANT, 0)
    with pytest.raises(TrainError, match="encoder"):
        fit(ModelAdapter(Blob(), MODS), train, fix=OGMGE(), epochs=1, device="cpu")


def test_every_hook_fires_and_signals_reach_history() -> None:
    fix = check_hooks_fire(OGMGE)
    assert set(fix.signals()) == {"ratio.audio", "ratio.visual", "coeff.audio", "coeff.visual"}


def test_no_hook_survives_teardown() -> None:
    model = toy_model(0)
    before = hook_inventory(model)
    train, _ = toy_split(DOMINANT, 0)
    train_toy(OGMGE(), model=model, epochs=1)
    assert_no_leftovers(model, before, train)


def test_no_hook_survives_an_exception_mid_training() -> None:
    check_clean_after_error(OGMGE, at=3, readout="mask")  # raises inside a masked readout (stubs in place)


def test_state_dict_round_trip() -> None:
    fix = OGMGE()
    train_toy(fix, epochs=1)
    check_state_round_trip(fix, OGMGE())


def test_direction_weak_modality_gains() -> None:
    """On the dominance toy, OGM-GE (alpha 0.8, the CREMA-D setting) leaves the weak modality's
    unimodal accuracy higher than plain training under the same seed and budget (mean of 3 seeds)."""
    fixed, plain = direction(lambda: OGMGE(alpha=0.8))
    assert sum(fixed) / 3 > sum(plain) / 3, (fixed, plain)
