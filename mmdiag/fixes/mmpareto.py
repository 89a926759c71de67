"""MMPareto: Pareto integration of multimodal and unimodal gradients (Wei & Hu, ICML 2024), methods.md §7."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmdiag.fixes._common import check_range, reduce_mean, require_encoders
from mmdiag.fixes.base import Fix, FixContext, Step, register_fix


def min_norm_weight(a: Tensor, b: Tensor) -> float:
    """MGDA for two vectors: the γ ∈ [0, 1] minimising ‖γ a + (1 − γ) b‖ (closed form).

    γ* = clip((b − a)·b / ‖a − b‖², 0, 1); 0.5 when a = b.
    """
    a, b = a.double(), b.double()
    diff = a - b
    denom = float(diff.dot(diff))
    if denom <= 0.0:
        return 0.5
    return min(1.0, max(0.0, float((b - a).dot(b)) / denom))


def _flat(grads: Sequence[Tensor | None], params: Sequence[nn.Parameter]) -> Tensor:
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def _unflat(flat: Tensor, params: Sequence[nn.Parameter]) -> list[Tensor]:
    out, start = [], 0
    for p in params:
        out.append(flat[start:start + p.numel()].view_as(p).to(p.device))
        start += p.numel()
    return out


def cosine(a: Tensor, b: Tensor) -> float:
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return 0.0
    return float(a.double().dot(b.double()) / (na.double() * nb.double()))


@register_fix
@dataclass
class MMPareto(Fix):
    """MMPareto: per encoder, combine the multimodal and unimodal gradients with MGDA weights when they conflict.

    What it changes, per encoder m (its trainable parameters θ_m):
        * g_mm = ∇_θm CE(z, y) (the fused loss) and g_u = ∇_θm CE(z_m, y), the unimodal loss of the
          readout z_m = f(h with only m present) through the model's **shared fusion head** (R2).
          MMPareto itself trains a separate linear head per modality; mmdiag uses the shared head
          (no auxiliary module, and the unimodal losses also train the head's block for m, as in
          ARL/UDML). Both are flattened over θ_m; cos_m = cos(g_mm, g_u).
        * (k0, k1) = (0.5, 0.5) when cos_m > 0, else the MGDA min-norm convex weights of the two
          vectors (closed form for two).
        * Per parameter: g̃ = 2(k0 g_mm + k1 g_u); with n0 = ‖∇ of CE(z) + Σ_k CE(z_k)‖ for that
          parameter (the ordinary summed-loss gradient), g̃ ← (n0/‖g̃‖) g̃ when n0/‖g̃‖ > 1 (keep the
          magnitude); final gradient γ · g̃.
        * Every other parameter (fusion head, non-encoder layers) keeps the summed-loss gradient:
          the returned loss is CE(z) + Σ_m CE(z_m).

    Implementation: ``loss`` takes the gradients with ``torch.autograd.grad(..., retain_graph=True)``
    (one call for the fused loss over all encoders, one per unimodal loss), the loop back-propagates
    the summed loss, and ``after_backward`` replaces the encoder gradients.

    Defaults: γ = 1.5 (hard-coded in MMPareto). Under adaptive optimizers (Adam) a constant γ is
    nearly neutral; MMPareto's setting is SGD (lr 0.002).

    Cost: 1F + (M+2)B per step (M+1 backward calls with a retained graph, then the summed loss),
    M head calls, and a tiny MGDA solve per encoder. Memory: two gradient copies per encoder.

    Under torch.distributed both gradients are averaged over the processes (two all-reduces per
    encoder) before the cosine and the combination, matching the averaged gradient of the summed
    loss that data parallelism leaves in ``.grad``.

    Source: GeWu-Lab/MMPareto_ICML2024, ``code/MMPareto.py``, ``code/min_norm_solvers.py``.
    BalanceMM's copy overwrites its modality loop variable with the solver output (methods.md §20);
    mmdiag follows the original. Signals: ``cos.<m>``.
    """

    name: ClassVar[str] = "mmpareto"
    summary: ClassVar[str] = ("MGDA-combine fused and unimodal encoder gradients when they conflict, keep "
                              "magnitude, ×γ")
    matches: ClassVar[str] = "multimodal and unimodal gradients conflict on an encoder (negative cosine)"

    gamma: float = 1.5
    _cos: dict[str, float] = field(default_factory=dict, init=False, repr=False, compare=False)
    _k: dict[str, list[float]] = field(default_factory=dict, init=False, repr=False, compare=False)
    _pending: dict[str, tuple[list[Tensor], list[Tensor]]] = field(default_factory=dict, init=False, repr=False,
                                                                   compare=False)

    def __post_init__(self) -> None:
        check_range(self.name, "gamma", self.gamma, 0, low_open=True)

    def setup(self, ctx: FixContext) -> None:
        require_encoders(ctx, self.name)

    def loss(self, ctx: FixContext, step: Step) -> Tensor:
        assert step.loss is not None
        if step.features is None:
            require_encoders(ctx, self.name)
        mods = ctx.modalities
        params = {m: ctx.encoder_parameters(m) for m in mods}
        uni = {m: F.cross_entropy(step.readout(ctx, [m]), step.labels) for m in mods}
        flat_params = [p for m in mods for p in params[m]]
        g_all = torch.autograd.grad(step.loss, flat_params, retain_graph=True, allow_unused=True)
        self._pending = {}
        offset = 0
        for m in mods:
            ps = params[m]
            g_mm = [g if g is not None else torch.zeros_like(p) for g, p in zip(g_all[offset:offset + len(ps)], ps)]
            offset += len(ps)
            g_u = torch.autograd.grad(uni[m], ps, retain_graph=True, allow_unused=True)
            g_u = [g if g is not None else torch.zeros_like(p) for g, p in zip(g_u, ps)]
            if ctx.world_size > 1:
                # the data-parallel gradients of each loss, as the summed backward will see them
                g_mm = _unflat(reduce_mean(ctx, _flat(g_mm, ps)).to(ps[0].dtype), ps) if ps else g_mm
                g_u = _unflat(reduce_mean(ctx, _flat(g_u, ps)).to(ps[0].dtype), ps) if ps else g_u
            a, b = _flat(g_mm, ps), _flat(g_u, ps)
            c = cosine(a, b)
            k0 = 0.5 if c > 0 else min_norm_weight(a, b)
            self._cos[m] = c
            self._k[m] = [k0, 1.0 - k0]
            self._pending[m] = ([g.detach() for g in g_mm], [g.detach() for g in g_u])
        step.logs.update(self.signals())
        return step.loss + sum(uni.values())

    def after_backward(self, ctx: FixContext, step: Step) -> None:
        for m, (g_mm, g_u) in self._pending.items():
            k0, k1 = self._k[m]
            for p, a, b in zip(ctx.encoder_parameters(m), g_mm, g_u):
                new = 2.0 * (k0 * a + k1 * b)
                if p.grad is not None:
                    n0, n_new = p.grad.norm(), new.norm()
                    if n_new > 0 and n0 / n_new > 1:
                        new = new * (n0 / n_new)
                p.grad = self.gamma * new
        self._pending = {}

    def on_epoch_end(self, ctx: FixContext, epoch: int) -> dict[str, float]:
        return {**self.signals(), **{f"k_fused.{m}": k[0] for m, k in self._k.items()}}

    def teardown(self, ctx: FixContext) -> None:
        self._pending = {}

    def state_dict(self) -> dict[str, Any]:
        return {"cos": dict(self._cos), "k": {m: list(k) for m, k in self._k.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._cos = {str(m): float(v) for m, v in state.get("cos", {}).items()}
        self._k = {str(m): [float(x) for x in v] for m, v in state.get("k", {}).items()}

    def signals(self) -> dict[str, float]:
        return {f"cos.{m}": c for m, c in self._cos.items()}
