"""MMPareto: Pareto integration of multimodal and unimodal gradients (Wei & Hu, ICML 2024), methods.md §7."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmdiag.adapter import map_tensors
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


def _cut(feature: Any, pairs: list[tuple[Tensor, Tensor]]) -> Any:
    """``feature`` with every tensor that carries gradient replaced by a detached leaf requiring grad;
    appends (original, leaf) to ``pairs`` (nested outputs supported)."""

    def leaf(t: Tensor) -> Tensor:
        if not (t.requires_grad and t.is_floating_point()):
            return t
        d = t.detach().requires_grad_()
        pairs.append((t, d))
        return d

    return map_tensors(leaf, feature)


def _min_norm_from_gram(aa: float, bb: float, ab: float) -> float:
    """:func:`min_norm_weight` from a·a, b·b and a·b: clip((b·b − a·b) / (a·a − 2a·b + b·b), 0, 1).

    Used when a·b ≤ 0 (conflict), where every term is non-negative: no cancellation.
    """
    denom = aa - 2.0 * ab + bb
    if denom <= 0.0:
        return 0.5
    return min(1.0, max(0.0, (bb - ab) / denom))


def _cosine_from_gram(aa: float, bb: float, ab: float) -> float:
    """cos(a, b) from a·a, b·b and a·b (0 when either vector is zero)."""
    if aa <= 0.0 or bb <= 0.0:
        return 0.0
    return ab / (math.sqrt(aa) * math.sqrt(bb))


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

    Implementation (two backward passes through each encoder, the minimum for two distinct
    gradients): the unimodal readouts read each encoder output h_m through a detached leaf, so
    ``loss`` takes g_u = J_mᵀ ∂CE(z_m)/∂h_m with one head-only ``torch.autograd.grad`` (all M
    readouts) and one ``autograd.grad`` through encoder m (graph retained). The loop's backward of
    the summed loss then gives the head (and any non-encoder layer) the summed-loss gradient, while
    the unimodal paths stop at the leaves: it leaves exactly g_mm in the encoders' ``.grad`` (so the
    loop must zero the gradients before it, as the hook contract says). ``after_backward`` measures
    the cosines, solves the MGDA weights, takes n0 = ‖g_mm + g_u‖ per parameter (the summed loss's
    gradient, by linearity: each unimodal loss reaches only its own encoder) and writes the
    combined gradients, all encoders at once with ``torch._foreach`` ops. The signals and
    ``step.logs`` are therefore updated in ``after_backward``.

    Defaults: γ = 1.5 (hard-coded in MMPareto). Under adaptive optimizers (Adam) a constant γ is
    nearly neutral; MMPareto's setting is SGD (lr 0.002).

    Cost: 1F + 2B per step through the encoders (the unimodal pass in ``loss`` with a retained
    graph, and the loop's backward; methods.md §7(e) counts M + 2 backward calls, which the
    linearity above reduces to two passes), M head calls for the readouts, one head-only backward,
    and a tiny MGDA solve per encoder. Memory: one gradient copy per encoder plus the retained graph.

    Under torch.distributed both gradients are averaged over the processes (the unimodal one in
    ``loss``; the fused one is already averaged by DDP in ``.grad`` and averaging it again in
    ``after_backward`` is idempotent) before the cosine and the combination.

    Source: GeWu-Lab/MMPareto_ICML2024, ``code/MMPareto.py``, ``code/min_norm_solvers.py``.
    BalanceMM's copy overwrites its modality loop variable with the solver output (methods.md §20);
    mmdiag follows the original. Signals: ``cos.<m>``.
    """

    name: ClassVar[str] = "mmpareto"
    summary: ClassVar[str] = ("MGDA-combine fused and unimodal encoder gradients when they conflict, keep "
                              "magnitude, ×γ")
    matches: ClassVar[str] = "multimodal and unimodal gradients conflict on an encoder (negative cosine)"
    targets: ClassVar[tuple[str, ...]] = ("gradient_conflict",)

    gamma: float = 1.5
    _cos: dict[str, float] = field(default_factory=dict, init=False, repr=False, compare=False)
    _k: dict[str, list[float]] = field(default_factory=dict, init=False, repr=False, compare=False)
    #: per modality: its encoder's parameters and g_u, from ``loss`` to ``after_backward``
    _pending: dict[str, tuple[list[nn.Parameter], list[Tensor]]] = field(default_factory=dict, init=False,
                                                                          repr=False, compare=False)

    def __post_init__(self) -> None:
        check_range(self.name, "gamma", self.gamma, 0, low_open=True)

    def setup(self, ctx: FixContext) -> None:
        require_encoders(ctx, self.name)

    def loss(self, ctx: FixContext, step: Step) -> Tensor:
        assert step.loss is not None
        if step.features is None:
            require_encoders(ctx, self.name)
        mods = ctx.modalities
        feats = step.features
        assert feats is not None
        # The unimodal readouts read each encoder output through a detached leaf: the loop's backward
        # of the summed loss then brings the unimodal gradients to the head but stops at the leaves,
        # so it leaves exactly g_mm (the fused loss's gradient) on the encoder parameters.
        pairs: dict[str, list[tuple[Tensor, Tensor]]] = {m: [] for m in mods}
        cut = {m: _cut(feats[m], pairs[m]) for m in mods}
        uni = {m: F.cross_entropy(step.readout(ctx, [m], cut), step.labels) for m in mods}
        leaves = [leaf for m in mods for _, leaf in pairs[m]]
        # ∂L_m/∂h_m for every m in one head-only backward (L_k, k ≠ m, does not read h_m: it is masked)
        d_h = torch.autograd.grad(list(uni.values()), leaves, retain_graph=True, allow_unused=True) if leaves else ()
        self._pending = {}
        offset = 0
        for m in mods:
            ps = ctx.encoder_parameters(m)
            outs = [(h, g) for (h, _), g in zip(pairs[m], d_h[offset:offset + len(pairs[m])]) if g is not None]
            offset += len(pairs[m])
            g_u: Sequence[Tensor | None] = [None] * len(ps)
            if ps and outs:
                # g_u = J_m^T ∂L_m/∂h_m: one backward through encoder m only
                g_u = torch.autograd.grad([h for h, _ in outs], ps, [g for _, g in outs], retain_graph=True,
                                          allow_unused=True)
            g_u = [g.detach() if g is not None else torch.zeros_like(p) for g, p in zip(g_u, ps)]
            if ctx.world_size > 1 and ps:
                # the data-parallel gradient of the unimodal loss
                g_u = _unflat(reduce_mean(ctx, _flat(g_u, ps)).to(ps[0].dtype), ps)
            self._pending[m] = (ps, g_u)
        return step.loss + sum(uni.values())

    def after_backward(self, ctx: FixContext, step: Step) -> None:
        pending, self._pending = self._pending, {}
        # parameters, g_mm and g_u of the encoders whose gradients agree (cos > 0), and per
        # conflicting encoder the same with its MGDA weight k0
        agree_p: list[nn.Parameter] = []
        agree_mm: list[Tensor] = []
        agree_u: list[Tensor] = []
        conflict: list[tuple[list[nn.Parameter], list[Tensor], list[Tensor], float]] = []
        for m, (ps, g_u) in pending.items():
            if not ps:
                self._cos[m], self._k[m] = 0.0, [0.5, 0.5]
                continue
            # the backward of the summed loss left g_mm in .grad (the unimodal paths stop at the leaves)
            g_mm = [p.grad if p.grad is not None else torch.zeros_like(p) for p in ps]
            if ctx.world_size > 1:
                # DDP already averaged .grad; averaging again is idempotent and covers manual loops
                g_mm = _unflat(reduce_mean(ctx, _flat(g_mm, ps)).to(ps[0].dtype), ps)
            # Gram matrix of (g_mm, g_u) over θ_m in float64: one product gives a·a, a·b, b·b
            ab = torch.cat([g.reshape(-1) for g in (*g_mm, *g_u)]).view(2, -1).double()
            (aa, a_b), (_, bb) = (ab @ ab.T).tolist()
            c = _cosine_from_gram(aa, bb, a_b)
            k0 = 0.5 if c > 0 else _min_norm_from_gram(aa, bb, a_b)
            self._cos[m] = c
            self._k[m] = [k0, 1.0 - k0]
            if c > 0:
                agree_p += ps
                agree_mm += g_mm
                agree_u += g_u
            else:
                conflict.append((ps, g_mm, list(g_u), k0))
        if agree_p:
            # k0 = k1 = 0.5: g~ = 2(0.5 g_mm + 0.5 g_u) = g_mm + g_u exactly (halving and doubling are
            # exact), which is the summed loss's gradient itself, so n0/|g~| = 1 and no rescaling
            new = torch._foreach_add(agree_mm, agree_u)
            torch._foreach_mul_(new, self.gamma)
            for p, g in zip(agree_p, new):
                p.grad = g
        for ps, g_mm, g_u, k0 in conflict:
            # per parameter: g~ = 2 (k0 g_mm + k1 g_u) (the doubling is exact); n0 = |g_mm + g_u| (the
            # summed loss's gradient); g~ <- (n0/|g~|) g~ when n0/|g~| > 1; final gradient gamma g~
            new = torch._foreach_add(torch._foreach_mul(g_mm, 2.0 * k0), torch._foreach_mul(g_u, 2.0 * (1.0 - k0)))
            n0 = torch.stack(torch._foreach_norm(torch._foreach_add(g_mm, g_u)))
            n_new = torch.stack(torch._foreach_norm(new))
            ratio = n0 / n_new
            for g, grow, r in zip(new, ((n_new > 0) & (ratio > 1)).tolist(), ratio.tolist()):
                if grow:
                    g.mul_(r)
            torch._foreach_mul_(new, self.gamma)
            for p, g in zip(ps, new):
                p.grad = g
        step.logs.update(self.signals())

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
