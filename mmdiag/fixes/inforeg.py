"""inforeg: InfoReg, information-regulated learning in the prime learning window (Huang et al.,
CVPR 2025), methods.md §17b."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mmdiag.fixes._common import check_range, require_encoders
from mmdiag.fixes.base import Fix, FixContext, Step, register_fix


def window_test(traces: Sequence[float], window: int = 10) -> float:
    """InfoReg's prime-learning-window statistic k from the per-epoch Fisher traces so far.

    k = 1 before any trace; otherwise tr1 = sum(last ``window`` traces) / window,
    tr2 = sum(the ``window`` traces before the last one) / window, k = (tr1 - tr2) / tr1 (both sums
    divided by ``window`` even when fewer traces exist, as InfoReg's ``main.py``; k = 0 when tr1 = 0).
    """
    if not traces:
        return 1.0
    tr1 = sum(traces[-window:]) / window
    tr2 = sum(traces[-window - 1:-1]) / window
    return (tr1 - tr2) / tr1 if tr1 != 0 else 0.0


def proximal_beta(scores: Mapping[str, float], base: float) -> tuple[str, float]:
    """(leading modality, beta) with beta = base * exp(tanh(s_lead - s_second)): the strength of the
    pull of the leading modality's encoder toward its weights at the start of the epoch."""
    ranked = sorted(scores, key=lambda m: (-scores[m], list(scores).index(m)))
    lead, second = ranked[0], ranked[1]
    return lead, base * math.exp(math.tanh(scores[lead] - scores[second]))


def fisher_weights(params: Sequence[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """The parameters whose squared gradients InfoReg sums: weights of more than one dimension
    (its Conv2d and Linear weights), not biases or norms."""
    return [p for p in params if p.dim() > 1]


@register_fix
@dataclass
class InfoReg(Fix):
    """InfoReg: slow the modality that leads during its prime learning window with a proximal term
    (methods.md §17b, read in InfoReg's ``main.py``).

    * Fisher trace per epoch and modality: tr_m = sum over the encoder's weight tensors W (more than one
      dimension) of mean_elements(sum over the epoch's steps of grad(W)^2), the gradients being those
      left after the fix's change (as InfoReg accumulates them).
    * Window test at the start of each epoch, on the leading modality's own traces:
      k = (tr1 - tr2) / tr1 with tr1, tr2 the 10-epoch moving sums of the traces up to the last and the
      one before, divided by 10 (:func:`window_test`; k = 1 in the first epoch).
    * Per batch: unimodal readouts z_m = f(h with only m present) (readout R2 through the user's head),
      confidences s_m = sum_i softmax(z_m,i)[y_i] (the processes' sums divided by their number, so the
      scale is one process's batch); the leader is the modality with the largest s_m.
    * If the leader's k > ``threshold``: after the backward, its encoder gradients get
      g <- g + beta (theta - theta_epoch_start), beta = ``beta`` * exp(tanh(s_lead - s_second)); the
      other encoders are unchanged.
    * Loss: CE(z, y) + ``unimodal_weight`` * sum_m CE(z_m, y) (InfoReg back-propagates the fused and both
      unimodal losses).

    Two modalities: the leader and the second are audio and visual, as InfoReg. InfoReg's code tests
    the window on the audio traces only and has a second branch (beta 0.1 on the visual encoder) whose
    condition repeats the first one's, so it never runs; mmdiag tests the leader's own traces and
    applies no second branch (docs/fixes/inforeg.md).

    Defaults: beta 0.95, threshold 0.04 (InfoReg's code; methods.md §17b writes 0.05), moving window 10
    epochs, unimodal weight 1.

    Cost: one forward and one backward per step, M head calls, one squared-gradient sum over the
    encoder weights, and one copy of the encoder weights. Signals: ``k.<m>``, ``beta.<m>`` (epoch
    mean), ``trace.<m>`` (last epoch's trace).

    Source: Huang et al., "Adaptive Unimodal Regulation for Balanced Multimodal Information
    Acquisition", CVPR 2025 (GeWu-Lab/InfoReg_CVPR2025, ``main.py``: train_epoch).
    """

    name: ClassVar[str] = "inforeg"
    summary: ClassVar[str] = ("proximal pull on the leading modality's encoder during its prime learning window "
                              "(Fisher-trace test)")
    matches: ClassVar[str] = ("one modality learns faster early and crowds out the others (its Fisher trace still "
                              "rising while it leads in confidence)")
    #: it leaves the other encoders their prime learning window; not ``gradient_imbalance``, where it would
    #: displace ``ogm_ge`` as the verdict's first choice (registry order)
    targets: ClassVar[tuple[str, ...]] = ("unlearned_encoder",)

    beta: float = 0.95
    threshold: float = 0.04
    window: int = 10
    unimodal_weight: float = 1.0
    _s: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)
    _start: dict[str, list[Tensor]] = field(default_factory=dict, init=False, repr=False, compare=False)
    _pending: tuple[str, float] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_range(self.name, "beta", self.beta, 0)
        check_range(self.name, "threshold", self.threshold, 0)
        check_range(self.name, "window", self.window, 1, integer=True)
        check_range(self.name, "unimodal_weight", self.unimodal_weight, 0)
        self._s = _fresh()

    def setup(self, ctx: FixContext) -> None:
        require_encoders(ctx, self.name)

    def _snapshot(self, ctx: FixContext, epoch: int) -> None:
        """theta at the start of ``epoch`` (taken at its first step; a resumed run restores it)."""
        if self._s["epoch"] == epoch and self._start:
            return
        if self._s["epoch"] != epoch:
            self._s.update(epoch=epoch, fisher={}, sums={}, steps=0)
        self._start = {m: [p.detach().clone() for p in ctx.encoder_parameters(m)] for m in ctx.modalities}

    def loss(self, ctx: FixContext, step: Step) -> Tensor:
        assert step.loss is not None
        self._snapshot(ctx, step.epoch)
        mods = ctx.modalities
        readouts = {m: step.readout(ctx, [m]) for m in mods}
        with torch.no_grad():
            conf = torch.stack([F.softmax(readouts[m].detach().float(), 1).gather(1, step.labels[:, None]).sum()
                                for m in mods])
            conf = ctx.all_reduce_sum(conf) / ctx.world_size
        scores = {m: float(v) for m, v in zip(mods, conf.tolist())}
        lead, beta = proximal_beta(scores, self.beta)
        k = window_test(self._s["traces"].get(lead, []), self.window)
        self._pending = (lead, beta) if k > self.threshold else None
        s = self._s
        s["steps"] += 1
        for m in mods:
            applied = beta if self._pending is not None and m == lead else 0.0
            s["sums"][f"beta.{m}"] = s["sums"].get(f"beta.{m}", 0.0) + applied
        total = step.loss
        if self.unimodal_weight > 0:
            total = total + self.unimodal_weight * sum(F.cross_entropy(z, step.labels) for z in readouts.values())
        return total

    def after_backward(self, ctx: FixContext, step: Step) -> None:
        pending, self._pending = self._pending, None
        with torch.no_grad():
            if pending is not None:
                lead, beta = pending
                for p, p0 in zip(ctx.encoder_parameters(lead), self._start[lead]):
                    if p.grad is not None:
                        p.grad.add_(p.detach() - p0, alpha=beta)
            fisher = self._s["fisher"]
            for m in ctx.modalities:
                squares = [p.grad.detach().double().pow(2) if p.grad is not None else torch.zeros_like(p, dtype=torch.float64)
                           for p in fisher_weights(ctx.encoder_parameters(m))]
                fisher[m] = squares if m not in fisher else [a + b for a, b in zip(fisher[m], squares)]

    def on_epoch_end(self, ctx: FixContext, epoch: int) -> dict[str, Any]:
        s = self._s
        for m in ctx.modalities:
            tensors = s["fisher"].get(m, [])
            trace = float(sum(t.mean() for t in tensors)) if tensors else 0.0
            s["traces"].setdefault(m, []).append(trace)
        out = self.signals()
        s.update(fisher={}, sums={}, steps=0)
        return out

    def teardown(self, ctx: FixContext) -> None:
        self._pending = None
        self._start = {}

    def signals(self) -> dict[str, float]:
        s = self._s
        out: dict[str, float] = {}
        for m, traces in s["traces"].items():
            out[f"trace.{m}"] = traces[-1]
            out[f"k.{m}"] = window_test(traces, self.window)
        if s["steps"]:
            out.update({k: v / s["steps"] for k, v in s["sums"].items()})
        return out

    def state_dict(self) -> dict[str, Any]:
        s = self._s
        return {"epoch": s["epoch"], "traces": {m: list(t) for m, t in s["traces"].items()},
                "fisher": {m: [t.clone() for t in ts] for m, ts in s["fisher"].items()},
                "sums": dict(s["sums"]), "steps": s["steps"],
                "start": {m: [t.clone() for t in ts] for m, ts in self._start.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        s = _fresh()
        s["epoch"] = int(state.get("epoch", -1))
        s["traces"] = {str(m): [float(x) for x in t] for m, t in dict(state.get("traces", {})).items()}
        s["fisher"] = {str(m): [torch.as_tensor(t).clone() for t in ts] for m, ts in dict(state.get("fisher", {})).items()}
        s["sums"] = {str(k): float(v) for k, v in dict(state.get("sums", {})).items()}
        s["steps"] = int(state.get("steps", 0))
        self._s = s
        self._start = {str(m): [torch.as_tensor(t).clone() for t in ts] for m, ts in dict(state.get("start", {})).items()}


def _fresh() -> dict[str, Any]:
    return {"epoch": -1, "traces": {}, "fisher": {}, "sums": {}, "steps": 0}
