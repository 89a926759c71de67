"""MDACL: MDI-guided HCG alignment and AER equilibrium (Liu et al., arXiv 2601.00598), methods.md §17.1 (PROPOSED).

Only the paper's abstract is public, so every formula here is mmdiag's operationalisation. Two
choices go beyond the literal §17.1 text, both measured on the toy dominance fixture (SGD, 16
epochs, seeds 0-2; weak-modality unimodal accuracy, plain training 0.378):

* the running MDI differentiates the centred true-class logit margin, not the fused loss (as the
  ``mdi`` diagnostic does): the loss gradient vanishes on confidently-correct samples, and with it
  the running MDI did not flag the dominant modality on one seed of three;
* HCG's deepest stage is the fusion head's unimodal readout (the weak modality's logits with the
  others at their feature baseline, aligned to the dominant modality's readout), with λ_hcg = 1.
  Aligning projected encoder features alone (0.374), the adversarial term, and the gradient-rescale
  companion (0.383) leave the weak modality where plain training leaves it, because none of them
  teaches the fusion head to read the weak features; with the readout stage it reaches 0.658.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmdiag.adapter import first_tensor
from mmdiag.errors import ConfigError
from mmdiag.fixes._common import check_range, grad_scale, reduce_mean, require_encoders
from mmdiag.fixes.base import Fix, FixContext, Step, register_fix
from mmdiag.stats import true_class_margin


def grad_reverse(x: Tensor, coeff: float) -> Tensor:
    """Gradient-reversal layer: identity forward, gradient multiplied by -``coeff`` backward."""
    return grad_scale(x, -coeff)


def spectral_entropy(p: Tensor) -> float:
    """Normalised spectral entropy of pooled features [B, d] ∈ [0, 1] (log effective rank / log max rank).

    Centre over the batch, q_j = s_j²/Σ s² from the singular values, Ĥ = −Σ q log q / log(min(B, d)).
    """
    x = p.detach().double()
    x = x - x.mean(dim=0, keepdim=True)
    s2 = torch.linalg.svdvals(x).pow(2)
    total = s2.sum()
    rank = min(x.shape[0], x.shape[1])
    if total <= 0 or rank < 2:
        return 0.0
    q = s2 / total
    q = q[q > 0]
    return float(-(q * q.log()).sum() / math.log(rank))


def gradient_contribution(grad: Tensor, h: Tensor) -> float:
    """G = mean_i |⟨∇_{h_i} T, h_i⟩| (first-order Taylor contribution of one modality's features to T)."""
    return float((grad.detach() * h.detach()).flatten(1).sum(dim=1).abs().mean())


#: what the running MDI's gradient contribution differentiates (see :func:`contribution_target`)
TARGETS = ("margin", "loss")


def contribution_target(logits: Tensor, labels: Tensor, target: str = "margin") -> Tensor:
    """The scalar whose feature gradients give the gradient contribution G_m.

    ``"margin"`` (default, as the ``mdi`` diagnostic): Σ_i (z_{i,y_i} − mean_k z_{i,k}), the centred
    true-class logit margin summed over the batch, so each sample's gradient is its own and does not
    vanish once the sample is confidently correct. ``"loss"``: the batch-mean fused cross-entropy
    (the literal proposal; its gradient fades on easy samples and is heavy-tailed).
    """
    if target == "margin":
        return true_class_margin(logits.float(), labels).sum()
    return F.cross_entropy(logits.float(), labels)


def centred(z: Tensor) -> Tensor:
    """Logits minus their mean over the classes (softmax is unchanged by a common shift)."""
    return z - z.mean(dim=1, keepdim=True)


def mdi_shares(entropy: Mapping[str, float], contribution: Mapping[str, float], lam: float) -> dict[str, float]:
    """MDI_m = Ĝ_m^λ · (Ĥ_m/Σ Ĥ)^{1−λ}, renormalised to sum 1 (uniform parts where a sum is 0)."""
    mods = list(entropy)
    n = len(mods)
    g_tot, h_tot = sum(contribution.values()), sum(entropy.values())
    g = {m: contribution[m] / g_tot if g_tot > 0 else 1.0 / n for m in mods}
    h = {m: entropy[m] / h_tot if h_tot > 0 else 1.0 / n for m in mods}
    raw = {m: g[m] ** lam * h[m] ** (1 - lam) for m in mods}
    tot = sum(raw.values())
    return {m: (raw[m] / tot if tot > 0 else 1.0 / n) for m in mods}


def mdi_value(share: Mapping[str, float]) -> float:
    """Scalar MDI: log(share_first/share_second) for two modalities; log(max/min) for more."""
    vals = list(share.values())
    eps = 1e-12
    if len(vals) == 2:
        return math.log(max(vals[0], eps) / max(vals[1], eps))
    return math.log(max(max(vals), eps) / max(min(vals), eps))


def projector(dim: int) -> nn.Module:
    """Small per-modality projector to the common space (input size read from the first batch)."""
    return nn.Sequential(nn.LazyLinear(dim), nn.ReLU(), nn.Linear(dim, dim))


@register_fix
@dataclass
class MDACL(Fix):
    """MDACL (proposed form): the running MDI gates weak-modality alignment (HCG) and adversarial equilibrium (AER).

    mmdiag's definition (methods.md §17.1; only the paper's abstract is public, everything is PROPOSED):

    * Running MDI, from each training batch: feature entropy Ĥ_m = normalised spectral entropy of
      the pooled encoder outputs; gradient contribution G_m = mean_i |⟨∇_{h_m,i} T, h_m,i⟩| with
      T = Σ_i (z_{i,y_i} − mean_k z_{i,k}) the centred true-class logit margin of the fused logits
      (``target="margin"``, the ``mdi`` diagnostic's default; ``target="loss"`` uses the fused
      cross-entropy, the literal proposal), from **one** extra
      ``torch.autograd.grad(T, features, retain_graph=True)`` (it only traverses the fusion head);
      MDI_m = Ĝ_m^λ (Ĥ_m/Σ Ĥ)^{1−λ}, renormalised; the shares are an EMA (``momentum`` 0.9,
      starting uniform) over batches. Scalar ``mdi`` = log(share_1/share_2) for two modalities
      (> 0: the first dominates), log(max/min) for more.
    * HCG (hierarchical cross-modal guidance): dom = the modality with the largest running share
      guides every other modality m at two stages, weighted ω increasing with depth:

      1. the pooled encoder output, through small per-modality projectors g_m (2-layer MLPs,
         auxiliary modules): 1 − cos(g_m(p_m,i), stopgrad(g_dom(p_dom,i))), ω_enc = 0.5;
      2. the fusion head's unimodal readout (mmdiag's addition; the generic encoders expose no
         inner stages, and this is the stage the fused classifier actually reads):
         z_m = head(features with every other modality at its feature baseline),
         1 − cos(centred z_m,i, stopgrad(centred z_dom,i)), ω_readout = 1.

      L_HCG = Σ_{m ≠ dom} gate_m · mean_i (ω_enc · stage 1 + ω_readout · stage 2), with
      gate_m = min(1, log(share_dom/share_m)/log 1.5): it switches off smoothly when balanced.
      Weight λ_hcg = 1 (methods.md proposes 0.1 for the feature stage alone; with the readout stage
      at 0.1 the weak modality gains less on the toy: 0.508 vs 0.658).
    * AER: a modality discriminator D (2-layer MLP, auxiliary) classifies which modality each
      projected feature g_m(p_m) came from; encoders and projectors receive its gradient reversed
      and scaled by λ_adv · tanh(|MDI|/τ) (zero when balanced). The discriminator itself is always
      trained (loss weight 1, it only touches auxiliary parameters).
    * Optional companion (``rescale``, off by default): multiply encoder m's gradients by
      clip((1/M)/share_m, 0.5, 2) after the backward. It is off because it did not help on the toy
      (alone 0.383 vs plain 0.378; with HCG 0.650 vs 0.658): it scales only the encoder, and scaling
      at the fusion input instead reaches the encoder alone too (same numbers); the fusion head's
      weights for the weak modality are unchanged by either.

    Generalisation to M > 2: one dominant modality (largest share) guides all others, each with
    its own gate; the discriminator has M classes; ``mdi`` = log(max share/min share).

    Defaults: λ = 0.5, balanced threshold log 1.5, λ_hcg = 1, ω_enc = 0.5, ω_readout = 1,
    λ_adv = 0.1, τ = 0.5, projector width 32, discriminator hidden 64, EMA 0.9, target "margin".

    Cost: 1F + 1B per step, plus one backward through the fusion head only (feature gradients),
    M fusion-head calls on the cached features (the readouts, only while a gate is open), an SVD
    of a B×d matrix per modality, and the projectors/discriminator (tiny).

    Under torch.distributed the batch entropies and contributions are averaged over the processes
    before the shares are formed, so every rank gates the same way.

    Source: Liu et al., "MDACL", arXiv 2601.00598 (RGB-IR detection; abstract only, no repository
    found). Signals: ``mdi``, ``share.<m>``.
    """

    name: ClassVar[str] = "mdacl"
    summary: ClassVar[str] = ("MDI-gated guided alignment of weak modalities + adversarial modality equilibrium "
                              "(proposed form)")
    matches: ClassVar[str] = "optimisation dominated by one sensor, e.g. RGB vs IR (MDI)"
    targets: ClassVar[tuple[str, ...]] = ("feature_dominance",)

    lam: float = 0.5
    threshold: float = math.log(1.5)
    lambda_hcg: float = 1.0
    lambda_adv: float = 0.1
    tau: float = 0.5
    proj_dim: int = 32
    hidden: int = 64
    momentum: float = 0.9
    rescale: bool = False
    target: str = "margin"
    omega_encoder: float = 0.5
    omega_readout: float = 1.0
    _share: dict[str, float] = field(default_factory=dict, init=False, repr=False, compare=False)
    _batch_share: dict[str, float] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_range(self.name, "lam", self.lam, 0, 1)
        check_range(self.name, "threshold", self.threshold, 0, low_open=True)
        check_range(self.name, "lambda_hcg", self.lambda_hcg, 0)
        check_range(self.name, "lambda_adv", self.lambda_adv, 0)
        check_range(self.name, "tau", self.tau, 0, low_open=True)
        check_range(self.name, "proj_dim", self.proj_dim, 1, integer=True)
        check_range(self.name, "hidden", self.hidden, 1, integer=True)
        check_range(self.name, "momentum", self.momentum, 0, 1, high_open=True)
        check_range(self.name, "omega_encoder", self.omega_encoder, 0)
        check_range(self.name, "omega_readout", self.omega_readout, 0)
        if self.target not in TARGETS:
            raise ConfigError(f"{self.name}: target must be one of {', '.join(TARGETS)}; found {self.target!r}.")

    def setup(self, ctx: FixContext) -> None:
        require_encoders(ctx, self.name)
        mods = ctx.modalities
        if set(self._share) != set(mods):
            self._share = {m: 1.0 / len(mods) for m in mods}
        for m in mods:
            if f"mdacl_proj_{m}" not in ctx.aux:
                ctx.add_aux(f"mdacl_proj_{m}", projector(self.proj_dim))
        if "mdacl_disc" not in ctx.aux:
            ctx.add_aux("mdacl_disc", nn.Sequential(nn.Linear(self.proj_dim, self.hidden), nn.ReLU(),
                                                    nn.Linear(self.hidden, len(mods))))

    # ------------------------------------------------------------------ gates
    def dominant(self) -> str:
        return max(self._share, key=lambda m: self._share[m])

    def hcg_gate(self, m: str) -> float:
        dom = self.dominant()
        if m == dom or self.threshold <= 0:
            return 0.0
        gap = math.log(max(self._share[dom], 1e-12) / max(self._share[m], 1e-12))
        return min(1.0, max(gap, 0.0) / self.threshold)

    def aer_coeff(self) -> float:
        return self.lambda_adv * math.tanh(abs(mdi_value(self._share)) / self.tau)

    # ------------------------------------------------------------------ hooks
    def loss(self, ctx: FixContext, step: Step) -> Tensor:
        assert step.loss is not None
        if step.features is None:
            require_encoders(ctx, self.name)
        mods = ctx.modalities
        feats = {m: first_tensor(step.features[m]) for m in mods}
        needs = [m for m in mods if feats[m].requires_grad]
        target = contribution_target(step.logits, step.labels, self.target)
        grads = dict(zip(needs, torch.autograd.grad(target, [feats[m] for m in needs], retain_graph=True,
                                                    allow_unused=True))) if needs else {}
        pooled = {m: ctx.adapter.pooled(m, feats[m]) for m in mods}
        local = torch.tensor([spectral_entropy(pooled[m]) for m in mods] + [
            gradient_contribution(grads[m], feats[m]) if grads.get(m) is not None else 0.0 for m in mods])
        stats = reduce_mean(ctx, local).tolist()
        entropy = dict(zip(mods, stats[:len(mods)]))
        contribution = dict(zip(mods, stats[len(mods):]))
        self._batch_share = mdi_shares(entropy, contribution, self.lam)
        mixed = {m: self.momentum * self._share[m] + (1 - self.momentum) * self._batch_share[m] for m in mods}
        tot = sum(mixed.values())
        self._share = {m: v / tot for m, v in mixed.items()}

        proj = {m: ctx.aux[f"mdacl_proj_{m}"](pooled[m].float()) for m in mods}
        dom = self.dominant()
        gates = {m: self.hcg_gate(m) for m in mods}
        hcg: Tensor | float = 0.0
        if any(g > 0 for g in gates.values()):
            # stage 1: projected pooled encoder outputs; stage 2 (deepest): the fusion head's
            # unimodal readouts (other modalities at their feature baseline), centred logits
            guide = proj[dom].detach()
            guide_z = None
            if self.omega_readout > 0:
                with torch.no_grad():
                    guide_z = centred(step.readout(ctx, [dom]).float())
            for m in mods:
                if gates[m] > 0:
                    term = self.omega_encoder * (1 - F.cosine_similarity(proj[m], guide, dim=1)).mean()
                    if guide_z is not None:
                        z_m = centred(step.readout(ctx, [m]).float())
                        term = term + self.omega_readout * (1 - F.cosine_similarity(z_m, guide_z, dim=1)).mean()
                    hcg = hcg + gates[m] * term
        coeff = self.aer_coeff()
        disc = ctx.aux["mdacl_disc"]
        adv = sum(
            F.cross_entropy(disc(grad_reverse(proj[m], coeff)),
                            torch.full((proj[m].shape[0],), j, dtype=torch.long, device=proj[m].device))
            for j, m in enumerate(mods)
        ) / len(mods)
        hcg_value = float(hcg.detach()) if isinstance(hcg, Tensor) else hcg
        step.logs.update({**self.signals(), "hcg": hcg_value, "aer_coeff": coeff})
        return step.loss + self.lambda_hcg * hcg + adv

    def after_backward(self, ctx: FixContext, step: Step) -> None:
        ctx.sync_aux("mdacl_")  # every rank keeps the same projectors and discriminator
        if not self.rescale:
            return
        n = len(ctx.modalities)
        for m in ctx.modalities:
            factor = min(2.0, max(0.5, (1.0 / n) / max(self._share[m], 1e-12)))
            for p in ctx.encoder_parameters(m):
                if p.grad is not None:
                    p.grad.mul_(factor)

    def on_epoch_end(self, ctx: FixContext, epoch: int) -> dict[str, float]:
        return self.signals()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"share": dict(self._share), "batch_share": dict(self._batch_share)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._share = {str(m): float(v) for m, v in state.get("share", {}).items()}
        self._batch_share = {str(m): float(v) for m, v in state.get("batch_share", {}).items()}

    def signals(self) -> dict[str, float]:
        if not self._share:
            return {}
        return {"mdi": mdi_value(self._share), **{f"share.{m}": v for m, v in self._share.items()}}
