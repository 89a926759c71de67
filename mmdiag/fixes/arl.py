"""ARL: asymmetric representation learning (Wei, Luo, Luo, ICCV 2025), methods.md §11.

Also home of :class:`GradScale`, the identity-forward layer that multiplies the gradient flowing
back through a modality's encoder output; CAL (:mod:`mmdiag.fixes.cal`) uses it too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from mmdiag.fixes._common import (check_range, clip_grad_norm, readout_stats, reduce_mean, require_encoders,
                                  scale_feature_gradients, softmax_floats)
from mmdiag.fixes.base import Fix, FixContext, Step, register_fix


def arl_weights(dependence: Mapping[str, float], entropy: Mapping[str, float], temperature: float,
                min_entropy_share: float = 0.3) -> dict[str, float]:
    """ARL coefficients ω (general-M form of methods.md §11).

    D̂_m = D_m/Σ D, Ĥ_m = max(H_m/Σ H, min_entropy_share), a_m = (1/Ĥ_m)/Σ_k(1/Ĥ_k),
    ω = softmax_m(T · a_m · (1 − D̂_m)). For two modalities 1 − D̂_a = D̂_v, which is exactly the
    released cross-term form softmax(T·[D̂_v a_a, D̂_a a_v]).
    """
    # plain float64 arithmetic (M numbers): the same operations as the tensor form, without its overhead
    mods = list(dependence)
    n = len(mods)
    d = [float(dependence[m]) for m in mods]
    h = [float(entropy[m]) for m in mods]
    d_sum, h_sum = sum(d), sum(h)
    d_hat = [x / d_sum for x in d] if d_sum > 0 else [1 / n] * n
    h_hat = [max(x / h_sum, min_entropy_share) for x in h] if h_sum > 0 else [max(1 / n, min_entropy_share)] * n
    inv = [1 / x for x in h_hat]
    inv_sum = sum(inv)
    score = [temperature * (x / inv_sum) * (1 - y) for x, y in zip(inv, d_hat)]
    return dict(zip(mods, softmax_floats(score)))


@register_fix
@dataclass
class ARL(Fix):
    """ARL: scale each encoder's gradient by (1 + ω_m) toward inverse-variance dependence, plus unimodal CEs.

    What it changes:
        * Each batch, the unimodal readouts z_m = f(h with only m present) (R2, through the user's
          own fusion head) give the dependence D_m = Σ_k mean_i |z_m,ik| and the prediction
          variance proxy H_m = mean_i entropy(softmax z_m). With D̂_m = D_m/Σ D,
          Ĥ_m = max(H_m/Σ H, 0.3) and a_m = (1/Ĥ_m)/Σ_k (1/Ĥ_k), the coefficients are
          ω = softmax_m(T · a_m · (1 − D̂_m)) — the general-M form proposed in methods.md §11, identical
          to ARL's two-modality cross terms softmax(T·[D̂_v a_a, D̂_a a_v]).
        * From epoch ``start`` on (epochs count from 0, so ``start`` warm-up epochs), the gradient
          at each encoder output h_m is multiplied by (1 + ω_m) (GradScale: identity forward) and
          the fused logits are recomputed from the scaled features through the model's head. The
          ω used at a step are those computed on the previous batch (ARL stores them in ``args``
          and the model reads them in its next forward); they start at 1/M.
        * Loss: CE(z) + γ Σ_m CE(z_m), with γ = 1 during the warm-up. The unimodal readouts pass
          through the same scaled features, as ARL's GradScale sits inside the backbone.
        * Gradient-norm clipping of the model's parameters at ``clip_norm`` (ARL: 40).

    The released ``main_arl_variance.py`` computes the weights but never writes them to the model
    (only the 0.5 initialisation is ever used); mmdiag applies the computed ω, the evident intent.

    Defaults: γ = 4, T = 8 (ARL's CREMA-D script; Kinetics-Sounds γ=3, T=4; AVE γ=5, T=4),
    start = 5, entropy-share clamp 0.3, clip 40.

    Cost: 1F + 1B per step, plus M+1 calls of the fusion head (fused logits from the scaled
    features and the M unimodal readouts); D and H of all readouts reach the host in one transfer.

    Under torch.distributed the batch statistics D and H are averaged over the processes, so every
    rank applies the same ω.

    Source: shicaiwei123/ICCV2025-ARL, ``main_arl_variance.py``, ``models/backbone.py`` (GradScale),
    ``models/fusion_modules.py`` (ConcatFusion_AUXI). Signals: ``omega.<m>``.
    """

    name: ClassVar[str] = "arl"
    summary: ClassVar[str] = "scale encoder gradients by (1 + ω) toward inverse-variance dependence; unimodal CEs"
    matches: ClassVar[str] = "dependence not inversely proportional to prediction variance (ARL entropy vs dependence)"
    targets: ClassVar[tuple[str, ...]] = ("ignored_features",)

    gamma: float = 4.0
    temperature: float = 8.0
    start: int = 5
    min_entropy_share: float = 0.3
    clip_norm: float | None = 40.0
    _omega: dict[str, float] = field(default_factory=dict, init=False, repr=False, compare=False)
    _stats: dict[str, float] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_range(self.name, "gamma", self.gamma, 0)
        check_range(self.name, "temperature", self.temperature, 0)
        check_range(self.name, "start", self.start, 0, integer=True)
        check_range(self.name, "min_entropy_share", self.min_entropy_share, 0, 1)
        check_range(self.name, "clip_norm", self.clip_norm, 0, low_open=True, optional=True)

    def setup(self, ctx: FixContext) -> None:
        require_encoders(ctx, self.name)
        if set(self._omega) != set(ctx.modalities):
            self._omega = {m: 1.0 / len(ctx.modalities) for m in ctx.modalities}

    def forward(self, ctx: FixContext, step: Step) -> Tensor | None:
        if step.features is None:
            require_encoders(ctx, self.name)
        if step.epoch < self.start:
            return None
        step.features = scale_feature_gradients(step.features, {m: 1.0 + w for m, w in self._omega.items()})
        return ctx.adapter.head_forward(step.inputs, step.features)

    def loss(self, ctx: FixContext, step: Step) -> Tensor:
        assert step.loss is not None
        mods = ctx.modalities
        readouts = {m: step.readout(ctx, [m]) for m in mods}
        # D_m and H_m of every readout in one pass (one host transfer)
        stats = reduce_mean(ctx, readout_stats(torch.stack([readouts[m].detach() for m in mods]))).tolist()
        dependence = {m: stats[j] for j, m in enumerate(mods)}
        entropy = {m: stats[len(mods) + j] for j, m in enumerate(mods)}
        self._omega = arl_weights(dependence, entropy, self.temperature, self.min_entropy_share)
        self._stats = {**{f"D.{m}": v for m, v in dependence.items()}, **{f"H.{m}": v for m, v in entropy.items()}}
        step.logs.update(self.signals())
        gamma = self.gamma if step.epoch >= self.start else 1.0
        aux = sum(F.cross_entropy(z, step.labels) for z in readouts.values())
        return step.loss + gamma * aux

    def after_backward(self, ctx: FixContext, step: Step) -> None:
        if self.clip_norm is not None:
            clip_grad_norm(ctx.adapter.model.parameters(), self.clip_norm)

    def on_epoch_end(self, ctx: FixContext, epoch: int) -> dict[str, float]:
        return {**self.signals(), **self._stats}

    def state_dict(self) -> dict[str, Any]:
        return {"omega": dict(self._omega), "stats": dict(self._stats)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._omega = {str(m): float(w) for m, w in state.get("omega", {}).items()}
        self._stats = {str(k): float(v) for k, v in state.get("stats", {}).items()}

    def signals(self) -> dict[str, float]:
        return {f"omega.{m}": w for m, w in self._omega.items()}
