"""ogm_ge: On-the-fly Gradient Modulation with Generalization Enhancement (Peng et al., CVPR 2022)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmdiag.adapter import find_module, unwrap
from mmdiag.errors import ConfigError
from mmdiag.fixes._common import check_range, require_encoders
from mmdiag.fixes.base import Fix, FixContext, Step, register_fix

MODES = ("ogm_ge", "ogm")
SCOPES = ("weights", "conv", "all")
READOUTS = ("auto", "split", "mask")


def head_split_logits(head: nn.Linear, pooled: Mapping[str, Tensor], modalities: tuple[str, ...]) -> dict[str, Tensor]:
    """Readout R1 of methods.md P1: z_m = W_m h_m + b / M for a linear head over concatenated features."""
    m_count = len(modalities)
    out: dict[str, Tensor] = {}
    start = 0
    for m in modalities:
        width = pooled[m].shape[1]
        w = head.weight[:, start:start + width]
        z = pooled[m] @ w.t()
        if head.bias is not None:
            z = z + head.bias / m_count
        out[m] = z
        start += width
    return out


@register_fix
@dataclass
class OGMGE(Fix):
    """OGM-GE: slow down the dominant modality's encoder, add gradient noise (methods.md §1).

    Per training batch B (inside the modulation window ``start_epoch <= epoch < end_epoch``, after
    ``loss.backward()`` of the fused cross-entropy, which stays the only loss):

    * confidence s^m = sum_{i in B} softmax(z_{m,i})[y_i] of the unimodal readout z_m: the head
      split R1, z_m = W_m h_m + b/M, when the head is one ``nn.Linear`` over the concatenated
      pooled encoder outputs (checked numerically on the first batch), otherwise the feature-masked
      readout R2 (``step.readout(ctx, [m])``, one head call per modality);
    * discrepancy ratio rho^m = s^m / min_{k != m} s^k (for M=2 the original s^a/s^v; for M>2 it
      equals BMM's s^m / min_k s^k for every modality that can be slowed down);
    * coefficient k^m = 1 - tanh(alpha * rho^m) if rho^m > 1, else 1: only the dominant modality
      is slowed;
    * for every encoder parameter of modality m in ``scope``: g <- k^m g + eps,
      eps ~ N(0, std(g)^2) elementwise, std over the whole gradient tensor (+1e-8), taken before
      scaling; the noise is added even when k^m = 1 (mode ``ogm_ge``; mode ``ogm`` scales only).

    ``scope``: ``weights`` (default, BalanceMM's choice) touches every encoder parameter with more
    than one dimension (weights, not biases or norms); ``conv`` only 4-D (convolution) weights as
    the original code; ``all`` every encoder parameter.

    Defaults: alpha = 0.1 and modulation epochs [0, 50) (the original "default modulation setting";
    its README uses alpha = 0.8 on CREMA-D, BalanceMM alpha = 0.3 with epochs 10-80). The method is
    designed for SGD: Adam-type optimizers normalise each parameter's gradient scale, which largely
    cancels the coefficient (the noise remains).

    Under torch.distributed the confidence sums are added over the processes before the ratio is
    taken, so every rank applies the same coefficient to the same averaged gradients, and the noise
    comes from the global generator, which the reference loop seeds identically on every rank.

    Signals (epoch means): ``ratio.<m>``, ``coeff.<m>``. Cost: one forward and one backward per
    step, plus M head calls when R1 does not apply, plus O(#encoder parameters) noise.

    Source: Peng et al., "Balanced Multimodal Learning via On-the-fly Gradient Modulation",
    CVPR 2022 (GeWu-Lab/OGM-GE_CVPR2022, ``main.py``); BalanceMM ``trainer/OGM_trainer.py``.
    """

    name: ClassVar[str] = "ogm_ge"
    summary: ClassVar[str] = "scales the dominant encoder's gradients by 1 - tanh(alpha*rho) and adds gradient noise"
    matches: ClassVar[str] = "one modality dominates the fused head's confidence (OGM ratio rho >> 1)"
    targets: ClassVar[tuple[str, ...]] = ("gradient_imbalance",)
    needs_encoders: ClassVar[bool] = True
    scales_gradients: ClassVar[bool] = True

    alpha: float = 0.1
    mode: str = "ogm_ge"
    start_epoch: int = 0
    end_epoch: int | None = 50
    scope: str = "weights"
    readout: str = "auto"
    _split: bool | None = field(default=None, init=False, repr=False, compare=False)
    _epoch: int = field(default=-1, init=False, repr=False, compare=False)
    _count: int = field(default=0, init=False, repr=False, compare=False)
    _sums: dict[str, float] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_range("ogm_ge", "alpha", self.alpha, 0)
        check_range("ogm_ge", "start_epoch", self.start_epoch, 0, integer=True)
        check_range("ogm_ge", "end_epoch", self.end_epoch, 0, integer=True, optional=True)
        if self.mode not in MODES:
            raise ConfigError(f"ogm_ge: mode must be one of {', '.join(MODES)}; found {self.mode!r}.")
        if self.scope not in SCOPES:
            raise ConfigError(f"ogm_ge: scope must be one of {', '.join(SCOPES)}; found {self.scope!r}.")
        if self.readout not in READOUTS:
            raise ConfigError(f"ogm_ge: readout must be one of {', '.join(READOUTS)}; found {self.readout!r}.")
        if self.end_epoch is not None and self.end_epoch < self.start_epoch:
            raise ConfigError(
                f"ogm_ge: end_epoch ({self.end_epoch}) must not be before start_epoch ({self.start_epoch})."
            )

    # ------------------------------------------------------------------ readouts
    def setup(self, ctx: FixContext) -> None:
        # refuse a black box here, before any training step, rather than at the first after_backward
        require_encoders(ctx, self.name)
        super().setup(ctx)

    def _head(self, ctx: FixContext) -> nn.Module | None:
        if not ctx.adapter.head:
            return None
        return find_module(unwrap(ctx.adapter.model), ctx.adapter.head)

    def _unimodal_logits(self, ctx: FixContext, step: Step) -> dict[str, Tensor]:
        mods = ctx.modalities
        head = self._head(ctx)
        feats = step.features or {}
        if self._split is None:
            self._split = False
            if self.readout != "mask" and isinstance(head, nn.Linear) and feats:
                pooled = {m: ctx.adapter.pooled(m, feats[m]).detach() for m in mods}
                if sum(p.shape[1] for p in pooled.values()) == head.in_features:
                    replay = F.linear(torch.cat([pooled[m] for m in mods], dim=1), head.weight, head.bias)
                    self._split = bool(torch.allclose(replay, step.logits.detach(), atol=1e-4, rtol=1e-3))
            if self.readout == "split" and not self._split:
                raise ConfigError(
                    "ogm_ge: readout='split' needs a head that is one nn.Linear over the concatenated "
                    "pooled encoder outputs, in modality order; this model's is not. Use readout='auto'."
                )
        if self._split and isinstance(head, nn.Linear):
            pooled = {m: ctx.adapter.pooled(m, feats[m]).detach() for m in mods}
            return head_split_logits(head, pooled, mods)
        return {m: step.readout(ctx, [m]) for m in mods}

    # ------------------------------------------------------------------ hooks
    def in_window(self, epoch: int) -> bool:
        """Whether ``epoch`` is inside the modulation window [start_epoch, end_epoch)."""
        return epoch >= self.start_epoch and (self.end_epoch is None or epoch < self.end_epoch)

    def ratios(self, ctx: FixContext, step: Step) -> tuple[dict[str, float], dict[str, float]]:
        """(rho^m, k^m) of this batch (confidences summed over the processes)."""
        mods = ctx.modalities
        with torch.no_grad():
            z = self._unimodal_logits(ctx, step)
            scores = torch.stack([
                F.softmax(z[m].float(), dim=1).gather(1, step.labels[:, None]).sum() for m in mods
            ])
            scores = ctx.all_reduce_sum(scores)
        s = {m: float(v) for m, v in zip(mods, scores.tolist())}
        rho, coeff = {}, {}
        for m in mods:
            ref = min(s[k] for k in mods if k != m)
            rho[m] = s[m] / max(ref, 1e-8)
            coeff[m] = 1.0 - math.tanh(self.alpha * rho[m]) if rho[m] > 1 else 1.0
        return rho, coeff

    def _touches(self, p: nn.Parameter) -> bool:
        if self.scope == "all":
            return True
        if self.scope == "conv":
            return p.dim() == 4
        return p.dim() > 1

    def after_backward(self, ctx: FixContext, step: Step) -> None:
        if step.epoch != self._epoch:
            self._epoch, self._count, self._sums = step.epoch, 0, {}
        rho, coeff = self.ratios(ctx, step)
        active = self.in_window(step.epoch)
        if not active:
            coeff = {m: 1.0 for m in coeff}
        self._count += 1
        for m in ctx.modalities:
            self._sums[f"ratio.{m}"] = self._sums.get(f"ratio.{m}", 0.0) + rho[m]
            self._sums[f"coeff.{m}"] = self._sums.get(f"coeff.{m}", 0.0) + coeff[m]
        if not active:
            return
        with torch.no_grad():
            for m in ctx.modalities:
                k = coeff[m]
                for p in ctx.encoder_parameters(m):
                    if p.grad is None or not self._touches(p):
                        continue
                    g = p.grad
                    if self.mode == "ogm_ge":
                        std = (g.float().std().item() if g.numel() > 1 else 0.0) + 1e-8
                        noise = torch.randn_like(g) * std
                        g.mul_(k).add_(noise)
                    elif k != 1.0:
                        g.mul_(k)

    def signals(self) -> dict[str, float]:
        return {k: v / self._count for k, v in self._sums.items()} if self._count else {}

    def state_dict(self) -> dict[str, Any]:
        return {"split": self._split, "epoch": self._epoch, "count": self._count, "sums": dict(self._sums)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._split = state.get("split")
        self._epoch = int(state.get("epoch", -1))
        self._count = int(state.get("count", 0))
        self._sums = {str(k): float(v) for k, v in dict(state.get("sums", {})).items()}
