"""pmr: Prototypical Modal Rebalance (Fan et al., CVPR 2023), methods.md §3."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from mmdiag.errors import ConfigError
from mmdiag.fixes._common import check_range, require_encoders
from mmdiag.fixes.base import Fix, FixContext, Step, register_fix


def prototype_logits(features: Tensor, prototypes: Tensor) -> Tensor:
    """-||h_i - c^k||_2 for every sample i and class k ([B, K]): PMR's ``EU_dist``, negated."""
    return -torch.cdist(features.float(), prototypes.float().to(features.device))


def prototype_scores(features: Mapping[str, Tensor], prototypes: Mapping[str, Tensor], labels: Tensor
                     ) -> dict[str, Tensor]:
    """s^m = sum_i softmax_k(-||h_m,i - c_m^k||)[y_i]: each modality's summed prototype confidence."""
    return {m: F.softmax(prototype_logits(h.detach(), prototypes[m]), dim=1).gather(1, labels[:, None]).sum()
            for m, h in features.items()}


def slow_modalities(scores: Mapping[str, float]) -> list[str]:
    """The modalities PMR accelerates: every one whose score is below the highest (M=2: the weaker
    one when rho = s^a/s^v != 1, none when equal)."""
    top = max(scores.values())
    return [m for m, v in scores.items() if v < top]


@register_fix
@dataclass
class PMR(Fix):
    """PMR: a prototypical cross-entropy that pulls the slow modality's features toward its class
    prototypes (methods.md §3).

    * Prototypes c_m^k: the mean pooled encoder output of modality m over training samples of class k.
      mmdiag accumulates them, detached, from the training batches of each epoch (no extra pass) and
      uses them from the next epoch on, with momentum c <- (1 - mu) c_new + mu c_old after the first
      epoch (classes not seen in an epoch keep their prototype). PMR recomputes them with a pass over
      the training set before each epoch; here they lag the weights by up to one epoch, so the first
      epoch only builds them (no PCE term).
    * Per batch, the prototype confidence s^m = sum_i softmax_k(-||h_m,i - c_m^k||_2)[y_i] (summed over
      the processes under torch.distributed), the ratio rho = s^a / s^v for two modalities.
    * Loss (inside [start_epoch, end_epoch)): CE(z, y) + alpha * sum over slow modalities of
      L_PCE^m, L_PCE^m = CE(-dist(h_m, c_m), y); the slow modalities are those whose s^m is below the
      largest (M=2: exactly PMR's (beta, lambda) = (0, alpha) if rho > 1, (alpha, 0) if rho < 1,
      (0, 0) if equal). The PCE gradient reaches only the slow modality's encoder.

    Defaults: alpha = 2.0 and momentum 0.0 (PMR's ``bash.sh`` for CREMA-D/AVE; the argument default
    of the momentum is 0.2), modulation epochs [0, 70) (PMR's scripts; BalanceMM alpha 0.6).

    Cost: one forward and one backward per step, plus B x K distances per modality. Signals:
    ``ratio.<m>`` (s^m over the smallest other score), ``pce.<m>`` (epoch means of the PCE weight,
    0 or alpha).

    Source: Fan et al., "PMR: Prototypical Modal Rebalance for Multimodal Learning", CVPR 2023
    (fanyunfeng-bit/Modal-Imbalance-PMR, ``main_Prototype_grad.py``: train_epoch,
    calculate_prototype, EU_dist; ``bash.sh``); BalanceMM ``trainer/PMR_trainer.py``.
    """

    name: ClassVar[str] = "pmr"
    summary: ClassVar[str] = "prototypical cross-entropy on the slow modality's features (prototype confidence ratio)"
    matches: ClassVar[str] = "the weak modality's features are poorly clustered around its class prototypes (PMR ratio)"
    targets: ClassVar[tuple[str, ...]] = ("unlearned_encoder",)

    alpha: float = 2.0
    momentum: float = 0.0
    start_epoch: int = 0
    end_epoch: int | None = 70
    _s: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_range(self.name, "alpha", self.alpha, 0)
        check_range(self.name, "momentum", self.momentum, 0, 1)
        check_range(self.name, "start_epoch", self.start_epoch, 0, integer=True)
        check_range(self.name, "end_epoch", self.end_epoch, 0, integer=True, optional=True)
        if self.end_epoch is not None and self.end_epoch < self.start_epoch:
            raise ConfigError(f"pmr: end_epoch ({self.end_epoch}) must not be before start_epoch ({self.start_epoch}).")
        self._s = _fresh()

    def setup(self, ctx: FixContext) -> None:
        require_encoders(ctx, self.name)

    def in_window(self, epoch: int) -> bool:
        """Whether ``epoch`` is inside the modulation window [start_epoch, end_epoch)."""
        return epoch >= self.start_epoch and (self.end_epoch is None or epoch < self.end_epoch)

    def loss(self, ctx: FixContext, step: Step) -> Tensor:
        assert step.loss is not None and step.features is not None
        s = self._s
        pooled = {m: ctx.adapter.pooled(m, step.features[m]).flatten(1) for m in ctx.modalities}
        self._accumulate(ctx, pooled, step.labels)
        protos = s["prototypes"]
        if not protos:
            return step.loss
        scores = prototype_scores(pooled, protos, step.labels)
        summed = ctx.all_reduce_sum(torch.stack([scores[m] for m in ctx.modalities]))
        values = {m: float(v) for m, v in zip(ctx.modalities, summed.tolist())}
        slow = slow_modalities(values) if self.in_window(step.epoch) else []
        total = step.loss
        for m in slow:
            pce = F.cross_entropy(prototype_logits(pooled[m], protos[m]), step.labels)
            step.logs[f"pce.{m}"] = float(pce.detach())
            total = total + self.alpha * pce
        s["steps"] += 1
        for m in ctx.modalities:
            ref = min(values[k] for k in ctx.modalities if k != m)
            s["sums"][f"ratio.{m}"] = s["sums"].get(f"ratio.{m}", 0.0) + values[m] / max(ref, 1e-8)
            s["sums"][f"pce.{m}"] = s["sums"].get(f"pce.{m}", 0.0) + (self.alpha if m in slow else 0.0)
        return total

    def _accumulate(self, ctx: FixContext, pooled: Mapping[str, Tensor], labels: Tensor) -> None:
        """Add this batch's per-class feature sums and counts (detached) to the epoch's."""
        acc = self._s["acc"]
        onehot = F.one_hot(labels, ctx.n_classes).to(torch.float64)
        counts = onehot.sum(0)  # kept on the device: no host transfer per step
        acc["count"] = counts if acc.get("count") is None else acc["count"] + counts
        for m, h in pooled.items():
            sums = onehot.t() @ h.detach().to(torch.float64)
            acc[m] = sums if acc.get(m) is None else acc[m] + sums

    def on_epoch_end(self, ctx: FixContext, epoch: int) -> dict[str, Any]:
        s = self._s
        acc = s["acc"]
        if acc.get("count") is not None:
            mods = list(ctx.modalities)
            flat = torch.cat([acc["count"]] + [acc[m].flatten().to(acc["count"].device) for m in mods])
            red = ctx.all_reduce_sum(flat).cpu()
            k = ctx.n_classes
            count = red[:k]
            seen = count > 0
            offset = k
            for m in mods:
                width = acc[m].shape[1]
                sums = red[offset:offset + k * width].view(k, width)
                offset += k * width
                new = (sums / count.clamp_min(1)[:, None]).float()
                old = s["prototypes"].get(m)
                if old is not None:
                    new = torch.where(seen[:, None], (1 - self.momentum) * new + self.momentum * old, old)
                s["prototypes"][m] = new
        s["acc"] = {}
        out = self.signals()
        s["sums"], s["steps"] = {}, 0
        return out

    def signals(self) -> dict[str, float]:
        s = self._s
        return {k: v / s["steps"] for k, v in s["sums"].items()} if s["steps"] else {}

    def state_dict(self) -> dict[str, Any]:
        s = self._s
        return {"prototypes": {m: p.clone() for m, p in s["prototypes"].items()},
                "acc": {m: v.clone() for m, v in s["acc"].items()}, "sums": dict(s["sums"]), "steps": s["steps"]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        s = _fresh()
        s["prototypes"] = {str(m): torch.as_tensor(p).clone() for m, p in dict(state.get("prototypes", {})).items()}
        s["acc"] = {str(m): torch.as_tensor(v).clone() for m, v in dict(state.get("acc", {})).items()}
        s["sums"] = {str(k): float(v) for k, v in dict(state.get("sums", {})).items()}
        s["steps"] = int(state.get("steps", 0))
        self._s = s


def _fresh() -> dict[str, Any]:
    return {"prototypes": {}, "acc": {}, "sums": {}, "steps": 0}
