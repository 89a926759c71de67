"""Small pieces shared by several fixes (they never import each other): gradient scaling at the
encoder outputs, parameter checks, distributed averages and readout statistics."""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

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


def softmax_floats(scores: list[float]) -> list[float]:
    """Softmax of a few plain floats (one per modality): per-step weights without tensor overhead."""
    top = max(scores)
    e = [math.exp(x - top) for x in scores]
    total = sum(e)
    return [x / total for x in e]


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
            "this model. Name them with `encoders={MODALITY: MODULE}`, or choose a fix that needs no encoders "
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
    if ctx.world_size <= 1:
        return values.detach().to(torch.float64, copy=True)  # the single-process value, one copy
    out = ctx.all_reduce_sum(values.detach().double())
    return out / ctx.world_size


def clip_grad_norm(params: Iterable[Tensor], max_norm: float) -> None:
    """``torch.nn.utils.clip_grad_norm_(params, max_norm)``, the same result with less overhead.

    The total 2-norm is computed as torch does (``_foreach_norm``, then the norm of the norms). On
    the CPU the gradients are multiplied by ``max_norm / (total + 1e-6)`` only when that factor is
    below 1 (or not finite): torch multiplies by the factor clamped at 1, and a product with 1.0 is
    exact, so skipping it changes nothing (on accelerators the product is always taken, as torch
    does, to avoid a synchronisation). Mixed devices or dtypes, sparse gradients and tensor
    subclasses go to torch.
    """
    params = [p for p in params if p.grad is not None]
    if not params:
        return
    grads = [p.grad for p in params]
    first = grads[0]
    assert first is not None
    if any(type(g) is not Tensor or g.is_sparse or g.device != first.device or g.dtype != first.dtype
           for g in grads):
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return
    with torch.no_grad():
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))  # type: ignore[arg-type]
        coef = float(max_norm) / (total + 1e-6)
        if first.device.type != "cpu" or not bool(coef >= 1.0):
            torch._foreach_mul_(grads, torch.clamp(coef, max=1.0))  # type: ignore[arg-type]


def mean_abs_logits(z: Tensor) -> float:
    """ARL/UDML dependence D = Σ_k mean_i |z_ik| (batch mean of absolute logits, summed over classes)."""
    return z.detach().abs().mean(dim=0).sum().item()


def mean_entropy(z: Tensor) -> float:
    """Mean entropy of softmax(z) over the batch (nats)."""
    logp = F.log_softmax(z.detach().float(), dim=1)
    return (-(logp.exp() * logp).sum(dim=1)).mean().item()


def readout_stats(z: Tensor) -> Tensor:
    """Batched :func:`mean_abs_logits` and :func:`mean_entropy` of M readouts ``z`` [M, B, C]: a float32
    tensor [2M], the M dependences then the M entropies (the values those functions give, up to
    float rounding)."""
    z = z.detach()
    dependence = z.abs().mean(dim=1).sum(dim=1).float()
    logp = F.log_softmax(z.float(), dim=2)
    entropy = (-(logp.exp() * logp).sum(dim=2)).mean(dim=1)
    return torch.cat([dependence, entropy])
