"""mla: Multimodal Learning with Alternating unimodal adaptation (Zhang et al., CVPR 2024), methods.md §6."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmdiag.errors import ConfigError
from mmdiag.fixes._common import reduce_mean, require_encoders
from mmdiag.fixes._fused import fused_input, head_module, single
from mmdiag.fixes.base import Fix, FixContext, Step, register_fix


def owm_update(projector: Tensor, r: Tensor, a: float) -> Tensor:
    """One step of the orthogonal-weight-modification projector (MLA's GSPlugin, OWM form).

    With r the batch mean of the head's input (a row [1, D]) and k = P r^T: P <- P - k k^T / (a + r k),
    then P <- P / ||P||_F.
    """
    r = r.reshape(1, -1).to(projector.dtype)
    k = projector @ r.t()
    new = projector - (k @ k.t()) / (a + float(r @ k))
    return new / torch.linalg.matrix_norm(new)


def owm_alpha(index: int, steps_per_epoch: int | None) -> float:
    """a = 0.1^(1 + i / N) for batch i of N in the epoch (MLA); 0.1 when N is unknown."""
    if not steps_per_epoch:
        return 0.1
    return 0.1 ** (1.0 + index / steps_per_epoch)


@register_fix
@dataclass
class MLA(Fix):
    """MLA: alternating unimodal training through the shared fusion head, with the head's weight
    gradient projected (orthogonal weight modification) so that learning one modality does not erase
    what the head learned for the previous one (methods.md §6).

    * Batch t trains one modality, m = modalities[t mod M] (t counts the batches since the start): the
      loss is CE(z_m, y) with z_m = f(h with only m present), the other encoders' outputs masked (the
      adapter's baseline) and the user's own head re-run, the head being the shared head. The fused
      cross-entropy is not trained (MLA trains only unimodal losses).
    * After the backward (from the second batch on), with r the batch mean of the head's input for that
      readout and a = 0.1^(1 + i/N) (batch i of N): P <- P - k k^T/(a + r k), k = P r^T, P <- P/||P||_F
      (P starts as the identity, D x D with D the head's input width), and the head's weight gradient
      G <- G P^T. The batch mean r is averaged over the processes under torch.distributed.

    What differs from MLA (docs/fixes/mla.md): MLA makes M optimizer steps per batch, one per modality;
    the hook model makes one per batch, so modalities take turns over batches (each gets 1/M of the
    steps; more epochs compensate). MLA's test-time entropy-gated fusion is not applied: the model
    keeps its own fusion, which the evaluation and the analyses read. The projection uses the OWM
    scalar a + r k where MLA's code multiplies k by r into a matrix, and it is applied to the head
    found by the adapter (MLA's code matches the parameter name ``module.weight``, which may never
    fire; methods.md §20).

    Needs a fusion head that is one ``nn.Linear`` (named by ``head``, or found by the adapter).

    Defaults: projection on (MLA's ``--gs_flag``), the rest has no parameter in MLA. Cost: per step one
    head call (the readout), one forward and backward as plain training (the encoders of the other
    modalities get no gradient), a D x D projector update. Signals: ``loss.<m>`` (epoch mean of each
    modality's unimodal loss), ``turn`` (the modality trained last).

    Source: Zhang, Latham, Lyu, "Multimodal Representation Learning by Alternating Unimodal
    Adaptation", CVPR 2024 (Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation,
    ``main.py``, ``utils/utils.py`` GSPlugin); BalanceMM ``trainer/MLA_trainer.py``.
    """

    name: ClassVar[str] = "mla"
    summary: ClassVar[str] = "alternating unimodal training through the shared head, head gradient projected (OWM)"
    matches: ClassVar[str] = ("encoders under-trained vs unimodal baselines (linear-probe gap), or a modality "
                              "ignored by the fusion")
    targets: ClassVar[tuple[str, ...]] = ("unlearned_encoder", "ignored_features")

    project: bool = True
    _s: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)
    _head: nn.Linear | None = field(default=None, init=False, repr=False, compare=False)
    _pending: Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.project, bool):
            raise ConfigError(f"mla: project must be true or false; found {self.project!r}.")
        self._s = _fresh()

    def setup(self, ctx: FixContext) -> None:
        require_encoders(ctx, self.name)
        head = head_module(ctx.adapter)
        if not isinstance(head, nn.Linear):
            found = "no head was named or found" if head is None else f"the head is a {type(head).__name__}"
            raise ConfigError(
                f"mla trains every modality through one shared linear head and projects that head's weight "
                f"gradient, so it needs a fusion head that is one nn.Linear; {found}. Name the final linear "
                "classifier as `head`, or choose another fix."
            )
        self._head = head

    def teardown(self, ctx: FixContext) -> None:
        self._head = None
        self._pending = None

    def turn(self, ctx: FixContext) -> str:
        """The modality trained by the next batch."""
        return ctx.modalities[self._s["batches"] % len(ctx.modalities)]

    def loss(self, ctx: FixContext, step: Step) -> Tensor:
        assert self._head is not None
        m = self.turn(ctx)
        with fused_input(self._head) as seen:
            z = step.readout(ctx, [m])
        r = single(seen, "unimodal readout").detach().double().mean(0)
        self._pending = r
        loss = F.cross_entropy(z, step.labels)
        s = self._s
        if ctx.world_size > 1:
            # DistributedDataParallel expects a gradient for every parameter: a zero-weighted term
            # over the full forward gives them one (zeros); after_backward then drops the other
            # encoders' gradients, so the optimizer leaves them alone as MLA does
            loss = loss + 0.0 * step.logits.sum()
        s["turn"] = m
        # the signal is the mean over the processes, so that every rank records the same history
        shown = float(reduce_mean(ctx, loss.detach().reshape(1))[0])
        s["sums"][m] = s["sums"].get(m, 0.0) + shown
        s["counts"][m] = s["counts"].get(m, 0) + 1
        return loss

    def after_backward(self, ctx: FixContext, step: Step) -> None:
        assert self._head is not None
        s = self._s
        r, self._pending = self._pending, None
        first = s["batches"] == 0
        s["batches"] += 1
        if ctx.world_size > 1:
            for other in ctx.modalities:
                if other != s["turn"]:
                    for p in ctx.encoder_parameters(other):
                        p.grad = None
        if not self.project or first or r is None:
            return  # MLA skips its very first update
        r = reduce_mean(ctx, r)
        if s["projector"] is None:
            s["projector"] = torch.eye(r.numel(), dtype=torch.float64)
        s["projector"] = owm_update(s["projector"], r.cpu(), owm_alpha(step.index, ctx.steps_per_epoch))
        grad = self._head.weight.grad
        if grad is not None:
            projected = grad.double() @ s["projector"].t().to(grad.device)
            grad.copy_(projected.to(grad.dtype))

    def on_epoch_end(self, ctx: FixContext, epoch: int) -> dict[str, Any]:
        out = self.signals()
        self._s["sums"], self._s["counts"] = {}, {}
        return out

    def signals(self) -> dict[str, Any]:
        s = self._s
        out: dict[str, Any] = {f"loss.{m}": v / s["counts"][m] for m, v in s["sums"].items()}
        if s["turn"]:
            out["turn"] = s["turn"]
        return out

    def state_dict(self) -> dict[str, Any]:
        s = self._s
        return {"batches": s["batches"], "turn": s["turn"], "sums": dict(s["sums"]), "counts": dict(s["counts"]),
                "projector": None if s["projector"] is None else s["projector"].clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        s = _fresh()
        s["batches"] = int(state.get("batches", 0))
        s["turn"] = str(state.get("turn", ""))
        s["sums"] = {str(k): float(v) for k, v in dict(state.get("sums", {})).items()}
        s["counts"] = {str(k): int(v) for k, v in dict(state.get("counts", {})).items()}
        proj = state.get("projector")
        s["projector"] = None if proj is None else torch.as_tensor(proj).clone()
        self._s = s


def _fresh() -> dict[str, Any]:
    return {"batches": 0, "turn": "", "sums": {}, "counts": {}, "projector": None}
