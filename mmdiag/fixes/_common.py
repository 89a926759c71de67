"""Small pieces shared by several fixes (they never import each other): gradient scaling at the
encoder outputs, parameter checks, distributed averages and readout statistics."""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from mmdiag.adapter import map_tensors
from mmdiag.errors import ConfigError
from mmdiag.fixes.base import FixContext


class GradScale(torch.autograd.Function):
    """Identity in the forward pass; multiplies the incoming gradient by ``scale`` in the backward.

    This is ARL's ``GradScale`` (``models/backbone.py``). Applied to a tensor of the current graph
    only, so nothing persists after the step: no module hook is installed.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.scale = float(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad * ctx.scale, None


def grad_scale(x: Tensor, scale: float) -> Tensor:
    """``x`` unchanged, with its gradient multiplied by ``scale`` (no-op for tensors without grad)."""
    if not (x.requires_grad and x.is_floating_point()):
        return x
    return GradScale.apply(x, scale)


def scale_feature_gradients(features: Mapping[str, Any], scales: Mapping[str, float]) -> dict[str, Any]:
    """Encoder outputs whose gradients are multiplied by ``scales[m]`` (nested outputs supported)."""
    return {m: map_tensors(lambda t, s=scales.get(m, 1.0): grad_scale(t, s), f) for m, f in features.items()}


def require_encoders(ctx: FixContext, fix_name: str) -> None:
    """ConfigError unless the adapter knows every modality's encoder."""
    if not ctx.adapter.has_encoders:
        raise ConfigError(
            f"The fix {fix_name!r} works on each modality's encoder output, but no encoder is known for "
            "this model. Name them with --encoder MODALITY=MODULE, or choose a fix that needs no encoders "
            "(see `mmdiag list fixes`)."
        )


def check_range(fix_name: str, field_name: str, value: Any, low: float | None = None, high: float | None = None,
                *, low_open: bool = False, high_open: bool = False, integer: bool = False,
                optional: bool = False) -> None:
    """ConfigError unless ``value`` is a finite number (an int if ``integer``) inside the given bounds."""
    if optional and value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer:
        ok = float(value).is_integer()
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        bounds = " and ".join(b for b in (lo, hi) if b)
        kind = "an integer" if integer else "a finite number"
        extra = " (or None)" if optional else ""
        raise ConfigError(f"{fix_name}: {field_name} must be {kind}{' ' + bounds if bounds else ''}{extra}; "
                          f"found {value!r}.")


def reduce_mean(ctx: FixContext, values: Tensor) -> Tensor:
    """Mean of ``values`` over the processes of a distributed run (a detached copy with one process),
    so that every rank keeps the same fix state."""
    out = ctx.all_reduce_sum(values.detach().double())
    return out / max(ctx.world_size, 1)


def mean_abs_logits(z: Tensor) -> float:
    """ARL/UDML dependence D = Σ_k mean_i |z_ik| (batch mean of absolute logits, summed over classes)."""
    return z.detach().abs().mean(dim=0).sum().item()


def mean_entropy(z: Tensor) -> float:
    """Mean entropy of softmax(z) over the batch (nats)."""
    logp = F.log_softmax(z.detach().float(), dim=1)
    return (-(logp.exp() * logp).sum(dim=1)).mean().item()
