"""agm: Adaptive Gradient Modulation with Shapley mono-modal responses (Li et al., ICCV 2023)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from mmdiag.adapter import find_module, unwrap
from mmdiag.errors import ConfigError
from mmdiag.fixes._common import check_range, grad_scale
from mmdiag.fixes.base import Fix, FixContext, Step, register_fix
from mmdiag.stats import shapley_weight


def shapley_responses(full: Tensor, subset_logits: Mapping[frozenset[str], Tensor],
                      modalities: tuple[str, ...]) -> dict[str, Tensor]:
    """Mono-modal responses psi_m: the Shapley split of the fused logits over modalities.

    psi_m = sum_{S subset of M without m} w(|S|) [v(S + m) - v(S)], with v(S) the logits with only
    S present, v(M) = ``full`` and v(empty) = 0 (as in AGM and BalanceMM), so sum_m psi_m = full.
    For M = 2: psi_a = (T - P_a + P_v) / 2 with T = v(a, v), P_v = v(a) and P_a = v(v).
    """
    m_count = len(modalities)
    everything = frozenset(modalities)

    def value(s: frozenset[str]) -> Tensor | float:
        if not s:
            return 0.0
        if s == everything:
            return full
        return subset_logits[s]

    out: dict[str, Tensor] = {}
    for m in modalities:
        others = [k for k in modalities if k != m]
        total: Tensor | float = 0.0
        for size in range(m_count):
            w = shapley_weight(size, m_count)
            for combo in itertools.combinations(others, size):
                s = frozenset(combo)
                total = total + w * (value(s | {m}) - value(s))  # type: ignore[operator]
        out[m] = total  # type: ignore[assignment]
    return out


@register_fix
@dataclass
class AGM(Fix):
    """AGM: rescale each modality's Shapley mono-modal response by its competition strength
    relative to its own history (methods.md §2, with the original paper's sign convention).

    Per training batch inside the modulation window [start_epoch, end_epoch):

    * mono-modal responses psi_m: the Shapley split of the fused logits over modalities, with the
      subset logits v(S) read at the *feature level* (encoder outputs of the absent modalities
      masked, the fusion head re-run through ``ctx.adapter.head_forward``; no extra encoder pass;
      input-level masking only on black-box models) and v(empty) = 0, so sum_m psi_m equals the
      fused logits; M=2: psi_a = (T - P_a + P_v)/2. Cost 2^M - 2 extra head calls, with gradients
      (as the original; BalanceMM runs them without);
    * score s^m = mean_i -log softmax(psi_{m,i})[y_i], probabilities clamped at 1e-8 (averaged
      over the processes under torch.distributed);
    * running reference s_bar^m: the cumulative mean of s^m over all iterations since training
      started, starting at 0 and updated *after* the coefficient of the iteration is taken;
    * r^m = exp(M/(M-1) * (mean_k s^k - s^m)) (M=2: r^a = exp(s^v - s^a)); r_bar^m likewise
      from s_bar; coefficient kappa^m = exp(alpha * min(r_bar^m - r^m, cap)). A modality that is
      currently stronger than its history (lower loss) gets kappa < 1 and is slowed. (BalanceMM
      writes the opposite sign; we keep the original's.)
    * the gradient flowing back through psi_m is multiplied by kappa^m (an autograd identity
      function, ``mmdiag.fixes._common.grad_scale``, so no hook is installed), and the loss is CE(sum_m psi_m, y): ``forward`` returns
      the new fused logits.

    After the backward, if any entry of the fusion head's weight gradient leaves [-1, 1], the global
    gradient norm of the model is clipped to ``clip_norm`` (the original's rule; None disables).
    Outside the window the step is plain training.

    Defaults: alpha = 1.0 (the original config; its AV-MNIST example uses 2.5, BalanceMM 0.1),
    cap = 10, modulation epochs [0, 20).

    Signals (epoch means): ``score.<m>``, ``coeff.<m>``.

    Source: Li et al., "Boosting Multi-modal Model Performance with Adaptive Gradient Modulation",
    ICCV 2023 (lihong2303/AGM_ICCV2023, ``run/CREMAD_main.py``, ``model/CREMAD_net.py``); BalanceMM
    ``trainer/AGM_trainer.py``.
    """

    name: ClassVar[str] = "agm"
    summary: ClassVar[str] = "rescales each modality's Shapley response gradient by exp(alpha*(r_bar - r))"
    matches: ClassVar[str] = "Shapley mono-modal responses imbalanced relative to their own history (AGM)"
    targets: ClassVar[tuple[str, ...]] = ("gradient_imbalance",)
    needs_encoders: ClassVar[bool] = False
    scales_gradients: ClassVar[bool] = True

    alpha: float = 1.0
    start_epoch: int = 0
    end_epoch: int | None = 20
    cap: float = 10.0
    clip_norm: float | None = 1.0
    _iterations: int = field(default=0, init=False, repr=False, compare=False)
    _mean: dict[str, float] = field(default_factory=dict, init=False, repr=False, compare=False)
    _epoch: int = field(default=-1, init=False, repr=False, compare=False)
    _count: int = field(default=0, init=False, repr=False, compare=False)
    _sums: dict[str, float] = field(default_factory=dict, init=False, repr=False, compare=False)
    _active: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_range("agm", "alpha", self.alpha, 0)
        check_range("agm", "cap", self.cap, 0)
        check_range("agm", "clip_norm", self.clip_norm, 0, low_open=True, optional=True)
        check_range("agm", "start_epoch", self.start_epoch, 0, integer=True)
        check_range("agm", "end_epoch", self.end_epoch, 0, integer=True, optional=True)
        if self.end_epoch is not None and self.end_epoch < self.start_epoch:
            raise ConfigError(f"agm: end_epoch ({self.end_epoch}) must not be before start_epoch ({self.start_epoch}).")

    def in_window(self, epoch: int) -> bool:
        """Whether ``epoch`` is inside the modulation window [start_epoch, end_epoch)."""
        return epoch >= self.start_epoch and (self.end_epoch is None or epoch < self.end_epoch)

    def coefficients(self, scores: Mapping[str, float]) -> dict[str, float]:
        """kappa^m from this iteration's scores and the running reference (before it is updated)."""
        mods = list(scores)
        m_count = len(mods)
        factor = m_count / (m_count - 1)
        now_mean = sum(scores.values()) / m_count
        ref = {m: self._mean.get(m, 0.0) for m in mods}
        ref_mean = sum(ref.values()) / m_count
        out = {}
        for m in mods:
            r = math.exp(factor * (now_mean - scores[m]))
            r_bar = math.exp(factor * (ref_mean - ref[m]))
            out[m] = math.exp(self.alpha * min(r_bar - r, self.cap))
        return out

    def forward(self, ctx: FixContext, step: Step) -> Tensor | None:
        if step.epoch != self._epoch:
            self._epoch, self._count, self._sums = step.epoch, 0, {}
        self._active = self.in_window(step.epoch)
        if not self._active:
            return None
        mods = ctx.modalities
        subsets: dict[frozenset[str], Tensor] = {}
        for size in range(1, len(mods)):
            for combo in itertools.combinations(mods, size):
                subsets[frozenset(combo)] = step.readout(ctx, list(combo))
        psi = shapley_responses(step.logits, subsets, mods)
        with torch.no_grad():
            b = float(step.labels.shape[0])
            per = []
            for m in mods:
                p = F.softmax(psi[m].detach().float(), dim=1).gather(1, step.labels[:, None]).clamp_min(1e-8)
                per.append(-p.log().sum())
            totals = ctx.all_reduce_sum(torch.stack(per + [torch.tensor(b, device=per[0].device)]))
            scores = {m: float(totals[j] / totals[-1]) for j, m in enumerate(mods)}
        kappa = self.coefficients(scores)
        self._iterations += 1
        t = self._iterations
        for m in mods:
            self._mean[m] = self._mean.get(m, 0.0) * (t - 1) / t + scores[m] / t
        self._count += 1
        for m in mods:
            self._sums[f"score.{m}"] = self._sums.get(f"score.{m}", 0.0) + scores[m]
            self._sums[f"coeff.{m}"] = self._sums.get(f"coeff.{m}", 0.0) + kappa[m]
        total: Tensor | float = 0.0
        for m in mods:
            total = total + grad_scale(psi[m], kappa[m])
        return total  # type: ignore[return-value]

    def after_backward(self, ctx: FixContext, step: Step) -> None:
        if not self._active or self.clip_norm is None or not ctx.adapter.head:
            return
        head = find_module(unwrap(ctx.adapter.model), ctx.adapter.head)
        weight = getattr(head, "weight", None)
        if weight is None or weight.grad is None:
            return
        if bool((weight.grad.abs() > 1.0).any()):
            params = [p for p in unwrap(ctx.adapter.model).parameters() if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, float(self.clip_norm))

    def signals(self) -> dict[str, float]:
        return {k: v / self._count for k, v in self._sums.items()} if self._count else {}

    def state_dict(self) -> dict[str, Any]:
        return {"iterations": self._iterations, "mean": dict(self._mean), "epoch": self._epoch,
                "count": self._count, "sums": dict(self._sums)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._iterations = int(state.get("iterations", 0))
        self._mean = {str(k): float(v) for k, v in dict(state.get("mean", {})).items()}
        self._epoch = int(state.get("epoch", -1))
        self._count = int(state.get("count", 0))
        self._sums = {str(k): float(v) for k, v in dict(state.get("sums", {})).items()}
