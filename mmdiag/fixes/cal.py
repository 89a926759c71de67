"""CAL: contribution-guided asymmetric learning (Xu, Kou, Wu, Liu, arXiv 2510.26289), methods.md §17.2 (PROPOSED)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedParameter

from mmdiag.fixes._common import (check_range, clip_grad_norm, reduce_mean, require_encoders,
                                  scale_feature_gradients, softmax_floats)
from mmdiag.fixes.base import Fix, FixContext, Step, register_fix


class GaussianBottleneck(LazyModuleMixin, nn.Module):
    """Per-modality Gaussian bottleneck μ(h), log σ²(h) acting on the channel axis (axis 1).

    Both maps are d→d linear maps (a 1×1 convolution on feature maps, as UDML/DMRNet's
    ``Conv1x1`` heads); the channel count d is read from the first batch (lazy). μ starts as the
    identity and log σ² at ``init_logvar`` so that the bottleneck initially passes h through with
    little noise; log σ² is soft-bounded to (−``logvar_bound``, ``logvar_bound``) by a scaled tanh.
    """

    cls_to_become = None

    def __init__(self, init_logvar: float = -4.0, logvar_bound: float = 5.0) -> None:
        super().__init__()
        self.init_logvar = init_logvar
        self.logvar_bound = logvar_bound
        self.mu_weight = UninitializedParameter()
        self.mu_bias = UninitializedParameter()
        self.lv_weight = UninitializedParameter()
        self.lv_bias = UninitializedParameter()

    def initialize_parameters(self, h: Tensor) -> None:  # type: ignore[override]
        if self.has_uninitialized_params():
            d = h.shape[1]
            with torch.no_grad():
                for p, shape in ((self.mu_weight, (d, d)), (self.mu_bias, (d,)), (self.lv_weight, (d, d)),
                                 (self.lv_bias, (d,))):
                    p.materialize(shape, dtype=h.dtype, device=h.device)
                self.mu_weight.copy_(torch.eye(d))
                self.mu_bias.zero_()
                self.lv_weight.zero_()
                self.lv_bias.fill_(self.init_logvar)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        if h.dim() == 2:  # [B, d]: the channel axis is already last (movedim would be the identity)
            mu = F.linear(h, self.mu_weight, self.mu_bias)
            raw = F.linear(h, self.lv_weight, self.lv_bias)
        else:
            x = h.movedim(1, -1)
            mu = F.linear(x, self.mu_weight, self.mu_bias).movedim(-1, 1)
            raw = F.linear(x, self.lv_weight, self.lv_bias).movedim(-1, 1)
        # Soft bound: the feature scale of a generic encoder drifts during training, and an
        # unbounded linear log σ² overflows exp() (seen on the toy under SGD).
        logvar = self.logvar_bound * torch.tanh(raw / self.logvar_bound)
        return mu, logvar


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(μ, σ²) ‖ N(0, I)) summed over channels, averaged over samples and positions."""
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)
    return kl.sum(dim=1).mean()


def shapley_values(values: Mapping[frozenset, float], modalities: Sequence[str]) -> dict[str, float]:
    """Exact Shapley values φ_m = Σ_{S ⊆ M∖{m}} |S|!(M−|S|−1)!/M! · [v(S∪{m}) − v(S)] (methods.md P2)."""
    n = len(modalities)
    out = {}
    for m in modalities:
        others = [k for k in modalities if k != m]
        phi = 0.0
        for r in range(n):
            w = math.factorial(r) * math.factorial(n - r - 1) / math.factorial(n)
            for s in itertools.combinations(others, r):
                phi += w * (values[frozenset(s) | {m}] - values[frozenset(s)])
        out[m] = phi
    return out


def positive_share(values: Mapping[str, float]) -> dict[str, float]:
    """max(x_m, 0)/Σ_k max(x_k, 0); uniform when every value is ≤ 0."""
    pos = {m: max(v, 0.0) for m, v in values.items()}
    total = sum(pos.values())
    if total <= 0:
        return {m: 1.0 / len(values) for m in values}
    return {m: v / total for m, v in pos.items()}


def cal_weights(info: Mapping[str, float], confidence: Mapping[str, float], tau: float, lam: float,
                potential: Mapping[str, float] | None = None) -> dict[str, float]:
    """W^m = softmax_m(τ·[λ Î(m) + (1 − λ) D̃(m)]) from Shapley values ``info`` and confidences.

    Î = positive share of the Shapley values, D̂ = D/Σ D, and D̃ = ½(D̂ + P̂) when a dynamic
    potential P (already normalised) is given, D̂ otherwise.
    """
    mods = list(info)
    i_hat = positive_share(info)
    total = sum(confidence.values())
    d_hat = {m: (confidence[m] / total if total > 0 else 1.0 / len(mods)) for m in mods}
    if potential is not None:
        d_hat = {m: 0.5 * (d_hat[m] + potential[m]) for m in mods}
    # softmax in plain float64 arithmetic (M numbers): the tensor form's operations without its overhead
    score = [tau * (lam * i_hat[m] + (1 - lam) * d_hat[m]) for m in mods]
    return dict(zip(mods, softmax_floats(score)))


@register_fix
@dataclass
class CAL(Fix):
    """CAL (proposed form): accelerate high-contribution modalities by (1 + W^m); contribution-aware bottleneck.

    mmdiag's definition (methods.md §17.2; the paper's body and code were not available, everything
    beyond its abstract is PROPOSED):

    * Information quantity I(m): exact Shapley value of modality m with v(S) = mean true-class
      log-probability of the model's fusion head when only the modalities in S are present
      (the others masked at the encoder output, R2), without gradient, on the batch's features:
      v(all) is read from the step's fused logits and v({m}) from the unimodal readout z_m (the
      same head call on the same features), so only the other 2^M − M − 1 subsets cost a head
      call (one, the empty set, for M = 2). Î(m) = max(φ_m, 0)/Σ_k max(φ_k, 0) (uniform if all ≤ 0).
    * Confidence D(m): batch mean of the unimodal readout's true-class probability p_m(y|x);
      D̂ = D/Σ D. Dynamic potential P(m): EMA (``potential_momentum`` = 0.9) of the per-epoch decrease
      of each modality's mean unimodal loss, normalised as a positive share; once one decrease is
      known, D̃ = ½(D̂ + P̂), else D̃ = D̂.
    * W^m = softmax_m(τ · [λ Î(m) + (1 − λ) D̃(m)]).
    * Asymmetric gradient acceleration: after ``warmup`` epochs the gradient at each encoder output
      h_m is multiplied by (1 + W^m) (ARL's GradScale; never below 1). W is computed each batch and
      used from the next one (it starts uniform).
    * Unimodal auxiliary CEs through the shared head, weighted γ.
    * Contribution-aware information bottleneck (AIB): per modality a Gaussian bottleneck
      μ_m(h_m), log σ²_m(h_m) (auxiliary modules, d→d maps on the channel axis, trained alongside
      and saved with ``aux``; log σ² soft-bounded to (−5, 5)), z_m = μ_m + σ_m ⊙ ε (μ_m outside
      training), with L_AIB = Σ_m β_m KL(N(μ_m, σ_m²) ‖ N(0, I)),
      β_m = β0 (1 − W^m): the low-contribution, likely noisier modality is compressed harder.

    Decision on where the bottleneck sits: on a **parallel branch**, used only as a regulariser.
    The fused loss is computed on the model's own features, and a second call of the same fusion
    head on the bottlenecked features adds ``aib_weight`` · CE(f(z_1..z_M), y) + L_AIB. Putting the
    bottleneck on the main path would train the head on μ(h) while the user's model, deployed
    without the auxiliary modules, feeds it h: a train/test mismatch. On the branch, the encoders
    (and head) still feel the compression pressure, and at inference the user's original model is
    used unchanged; the bottleneck modules are a by-product that can be discarded.

    Total loss: CE(z) + γ Σ_m CE(z_m) + aib_weight · CE(z_AIB) + Σ_m β_m KL_m, with gradient-norm
    clipping at ``clip_norm`` over the model and the bottlenecks (ARL's 40).

    Defaults: τ = 4, λ = 0.5, γ = 4 (ARL's range 3–5), warm-up 5 epochs, β0 = 1e-3, clip 40.

    Cost: 1F + 1B per step, plus 2^M − M − 1 head calls without gradient (the coalitions not
    already computed) and M + 2 with gradient (fused from scaled features, M unimodal readouts, the
    bottleneck branch); the batch statistics reach the host in one transfer. Signals: ``W.<m>``.

    Under torch.distributed the coalition values, confidences and unimodal losses are averaged over
    the processes before W is formed, so every rank applies the same weights.

    Source: Xu, Kou, Wu, Liu, "Contribution-Guided Asymmetric Learning", arXiv 2510.26289 (abstract
    only; no repository found); gradient scaling after ARL (shicaiwei123/ICCV2025-ARL).
    """

    name: ClassVar[str] = "cal"
    summary: ClassVar[str] = ("accelerate high-contribution encoders by (1 + W^m) plus a contribution-aware "
                              "bottleneck (proposed form)")
    matches: ClassVar[str] = "high-contribution modality under-exploited and low-contribution modality noisy (CAL W^m)"
    targets: ClassVar[tuple[str, ...]] = ("unlearned_encoder",)

    tau: float = 4.0
    lam: float = 0.5
    gamma: float = 4.0
    warmup: int = 5
    beta0: float = 1e-3
    aib_weight: float = 1.0
    potential_momentum: float = 0.9
    use_potential: bool = True
    clip_norm: float | None = 40.0
    _weights: dict[str, float] = field(default_factory=dict, init=False, repr=False, compare=False)
    _potential: dict[str, float] = field(default_factory=dict, init=False, repr=False, compare=False)
    _prev_loss: dict[str, float] = field(default_factory=dict, init=False, repr=False, compare=False)
    _epoch_loss: dict[str, list[float]] = field(default_factory=dict, init=False, repr=False, compare=False)
    _stats: dict[str, float] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_range(self.name, "tau", self.tau, 0)
        check_range(self.name, "lam", self.lam, 0, 1)
        check_range(self.name, "gamma", self.gamma, 0)
        check_range(self.name, "warmup", self.warmup, 0, integer=True)
        check_range(self.name, "beta0", self.beta0, 0)
        check_range(self.name, "aib_weight", self.aib_weight, 0)
        check_range(self.name, "potential_momentum", self.potential_momentum, 0, 1, high_open=True)
        check_range(self.name, "clip_norm", self.clip_norm, 0, low_open=True, optional=True)

    def setup(self, ctx: FixContext) -> None:
        require_encoders(ctx, self.name)
        mods = ctx.modalities
        if set(self._weights) != set(mods):
            self._weights = {m: 1.0 / len(mods) for m in mods}
        if set(self._epoch_loss) != set(mods):
            self._epoch_loss = {m: [0.0, 0.0] for m in mods}
        if self.beta0 > 0 or self.aib_weight > 0:
            for m in mods:
                key = f"cal_aib_{m}"
                if key not in ctx.aux:
                    ctx.add_aux(key, GaussianBottleneck())

    # ------------------------------------------------------------------ hooks
    def forward(self, ctx: FixContext, step: Step) -> Tensor | None:
        if step.features is None:
            require_encoders(ctx, self.name)
        if step.epoch < self.warmup:
            return None
        step.features = scale_feature_gradients(step.features, {m: 1.0 + w for m, w in self._weights.items()})
        return ctx.adapter.head_forward(step.inputs, step.features)

    def loss(self, ctx: FixContext, step: Step) -> Tensor:
        assert step.loss is not None and step.features is not None
        mods = ctx.modalities
        y = step.labels
        readouts = {m: step.readout(ctx, [m]) for m in mods}
        uni_losses = {m: F.cross_entropy(z, y) for m, z in readouts.items()}
        subsets, values = self._coalition_values(ctx, step, readouts)
        with torch.no_grad():
            # confidences p_m(y|x) and unimodal losses of every readout in one pass (one host transfer)
            z = torch.stack([readouts[m].detach() for m in mods]).float()
            confidence_t = F.softmax(z, dim=2).gather(2, y.reshape(1, -1, 1).expand(len(mods), -1, 1)).mean(dim=(1, 2))
            local = torch.cat([values, confidence_t, torch.stack([uni_losses[m].detach() for m in mods]).float()])
        stats = reduce_mean(ctx, local).tolist()
        n = len(subsets)
        info = shapley_values({s: stats[j] for j, s in enumerate(subsets)}, mods)
        confidence = {m: stats[n + j] for j, m in enumerate(mods)}
        for j, m in enumerate(mods):
            acc = self._epoch_loss.setdefault(m, [0.0, 0.0])
            acc[0] += stats[n + len(mods) + j]
            acc[1] += 1
        potential = positive_share(self._potential) if (self.use_potential and self._potential) else None
        self._weights = cal_weights(info, confidence, self.tau, self.lam, potential)
        self._stats = {**{f"I.{m}": v for m, v in info.items()}, **{f"D.{m}": v for m, v in confidence.items()}}
        step.logs.update(self.signals())
        total = step.loss + self.gamma * sum(uni_losses.values())
        return total + self._bottleneck(ctx, step)

    def on_epoch_end(self, ctx: FixContext, epoch: int) -> dict[str, float]:
        current = {m: s / n for m, (s, n) in self._epoch_loss.items() if n > 0}
        if self._prev_loss:
            for m, cur in current.items():
                drop = self._prev_loss.get(m, cur) - cur
                old = self._potential.get(m, drop)
                self._potential[m] = self.potential_momentum * old + (1 - self.potential_momentum) * drop
        self._prev_loss = current
        self._epoch_loss = {m: [0.0, 0.0] for m in ctx.modalities}
        return {**self.signals(), **self._stats, **{f"P.{m}": v for m, v in self._potential.items()}}

    # ------------------------------------------------------------------ parts
    @torch.no_grad()
    def _coalition_values(self, ctx: FixContext, step: Step,
                          readouts: Mapping[str, Tensor]) -> tuple[list[frozenset], Tensor]:
        """v(S) = mean true-class log-probability with only S present, for every subset S: the subsets
        (by size, then in modality order) and a float32 tensor of their values.

        The full coalition is the step's fused logits and each singleton {m} is the unimodal readout
        z_m: the same head call on the same features, already made, so only the other 2^M − M − 1
        subsets (the empty one for M = 2) cost a head call.
        """
        mods = ctx.modalities
        feats = {m: f for m, f in step.features.items()}  # type: ignore[union-attr]
        known = {frozenset(mods): step.logits, **{frozenset([m]): readouts[m] for m in mods}}
        subsets: list[frozenset] = []
        logits: list[Tensor] = []
        for r in range(len(mods) + 1):
            for s in itertools.combinations(mods, r):
                key = frozenset(s)
                subsets.append(key)
                z = known.get(key)
                if z is None:
                    z = ctx.adapter.head_forward(step.inputs, ctx.adapter.masked_features(feats, list(s)))
                logits.append(z.detach())
        z = torch.stack(logits).float()
        y = step.labels.reshape(1, -1, 1).expand(len(logits), -1, 1)
        return subsets, F.log_softmax(z, dim=2).gather(2, y).mean(dim=(1, 2))

    def _bottleneck(self, ctx: FixContext, step: Step) -> Tensor | float:
        if self.aib_weight <= 0 and self.beta0 <= 0:
            return 0.0
        feats = dict(step.features)  # type: ignore[arg-type]
        kl_total: Tensor | float = 0.0
        training = ctx.adapter.model.training
        for m in ctx.modalities:
            h = feats[m]
            key = f"cal_aib_{m}"
            if not isinstance(h, Tensor) or h.dim() < 2 or key not in ctx.aux:
                continue  # nested encoder outputs pass through unchanged
            mu, logvar = ctx.aux[key](h)
            feats[m] = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu) if training else mu
            beta = self.beta0 * (1.0 - self._weights.get(m, 0.0))
            kl_total = kl_total + beta * gaussian_kl(mu, logvar)
        branch = F.cross_entropy(ctx.adapter.head_forward(step.inputs, feats), step.labels)
        return self.aib_weight * branch + kl_total

    def after_backward(self, ctx: FixContext, step: Step) -> None:
        ctx.sync_aux("cal_")  # every rank keeps the same bottlenecks
        if self.clip_norm is not None:
            clip_grad_norm(itertools.chain(ctx.adapter.model.parameters(), ctx.aux.parameters()), self.clip_norm)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "weights": dict(self._weights),
            "potential": dict(self._potential),
            "prev_loss": dict(self._prev_loss),
            "epoch_loss": {m: list(v) for m, v in self._epoch_loss.items()},
            "stats": dict(self._stats),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._weights = {str(m): float(v) for m, v in state.get("weights", {}).items()}
        self._potential = {str(m): float(v) for m, v in state.get("potential", {}).items()}
        self._prev_loss = {str(m): float(v) for m, v in state.get("prev_loss", {}).items()}
        self._epoch_loss = {str(m): [float(x) for x in v] for m, v in state.get("epoch_loss", {}).items()}
        self._stats = {str(k): float(v) for k, v in state.get("stats", {}).items()}

    def signals(self) -> dict[str, float]:
        return {f"W.{m}": w for m, w in self._weights.items()}
