"""gblending: Gradient-Blending (Wang, Tran, Feiszli, CVPR 2020), methods.md §5."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mmdiag.fixes._common import check_range, require_encoders
from mmdiag.fixes._heldout import HeldOut, release
from mmdiag.fixes.base import Fix, FixContext, Step, register_fix

FUSED = "fused"
#: floor of ΔO² so that a head whose overfitting did not change gets a large but finite weight
MIN_SQUARED_OVERFIT = 1e-8


def blending_weights(before: Mapping[str, tuple[float, float]], after: Mapping[str, tuple[float, float]]
                     ) -> tuple[dict[str, float], dict[str, float]]:
    """(weights w_k, OGR_k) from each head's (train loss, held-out loss) at the start and end of a window.

    O = L^V - L^T; ΔO_k = O_k(end) - O_k(start); ΔG_k = L^V_k(start) - L^V_k(end);
    w_k = |ΔG_k| / max(ΔO_k², 1e-8), normalised to sum 1 (BalanceMM's |g/o²|);
    OGR_k = |ΔO_k / ΔG_k| (inf when ΔG_k = 0). When every w_k is 0 (no held-out loss moved) the
    weights are uniform over the heads.
    """
    raw, ogr = {}, {}
    for k in before:
        (t0, v0), (t1, v1) = before[k], after[k]
        d_overfit = (v1 - t1) - (v0 - t0)
        d_gain = v0 - v1
        raw[k] = abs(d_gain) / max(d_overfit * d_overfit, MIN_SQUARED_OVERFIT)
        ogr[k] = abs(d_overfit / d_gain) if d_gain != 0 else float("inf")
    total = sum(raw.values())
    if total <= 0:
        return {k: 1.0 / len(raw) for k in raw}, ogr
    return {k: v / total for k, v in raw.items()}, ogr


@register_fix
@dataclass
class GBlending(Fix):
    """Gradient-Blending: a weighted sum of the fused and unimodal losses, weighted by how much each
    head generalises per unit of overfitting (methods.md §5).

    Heads: the fused logits z and, per modality m, the unimodal readout z_m = f(h with only m
    present): the other modalities' encoder outputs masked (the adapter's baseline) and the user's
    own fusion head re-run (readout R2 of methods.md P1; no auxiliary head, so the unimodal losses
    train the same head and encoders the fused prediction uses). Training loss
    L = sum_k w_k CE(z_k, y) over k in {modalities..., fused}, the weights summing to 1; uniform
    (1/(M+1)) until the first estimate.

    Estimate (mmdiag's online form): windows of ``every`` epochs. At the start of training and at the
    end of each window, each head's mean cross-entropy on held-out training rows (L^V) and on as many
    training rows (L^T) is recorded; at each window end the weights become
    w_k ∝ |ΔG_k| / ΔO_k² with O = L^V - L^T, ΔO_k the change of O over the window and ΔG_k the drop
    of L^V (:func:`blending_weights`). The paper's estimate trains a copy of each head alone for the
    window; mmdiag reads the same quantities off the jointly trained model's heads, at no training
    cost (docs/fixes/gblending.md).

    Held-out rows: ``holdout_fraction`` of the training rows, reserved through the context and never
    trained on (never the validation set). Without the training data in the context, rows are held
    out by a hash of their values (:mod:`mmdiag.fixes._heldout`), left out of the training loss, and
    each record holds the epoch's mean losses of the held-out and the other rows, computed in the
    step's forward; the first record is then the end of the first window, the first estimate the end
    of the second.

    Defaults: every = 10 epochs (BalanceMM's super-epoch, "online" mode), holdout 10 %.

    Cost: per step M head calls; per record one encoder pass over 2 x the held-out rows.
    Signals: ``w.<head>`` (head = modality or ``fused``), ``ogr.<head>``, ``held_out``.

    Source: Wang, Tran, Feiszli, "What Makes Training Multi-modal Classification Networks Hard?",
    CVPR 2020; BalanceMM ``trainer/GBlending_trainer.py`` (no official code).
    """

    name: ClassVar[str] = "gblending"
    summary: ClassVar[str] = "weights fused and unimodal losses by held-out gain per overfitting squared (OGR)"
    matches: ClassVar[str] = "a unimodal head overfits relative to its generalisation gain (OGR)"
    #: its unimodal losses train each encoder on its own modality; ``cal`` stays the verdict's first choice
    targets: ClassVar[tuple[str, ...]] = ("unlearned_encoder",)

    every: int = 10
    holdout_fraction: float = 0.1
    seed: int = 0
    _s: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)
    _held: HeldOut | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_range(self.name, "every", self.every, 1, integer=True)
        check_range(self.name, "holdout_fraction", self.holdout_fraction, 0, 1, low_open=True, high_open=True)
        check_range(self.name, "seed", self.seed, integer=True)
        self._s = _fresh()

    # ------------------------------------------------------------------ setup
    def setup(self, ctx: FixContext) -> None:
        require_encoders(ctx, self.name)
        self._held = HeldOut.reserve(ctx, self.holdout_fraction, self.seed)
        heads = list(ctx.modalities) + [FUSED]
        if sorted(self._s["weights"]) != sorted(heads):  # a fresh run (a resumed one keeps its state)
            self._s["weights"] = {k: 1.0 / len(heads) for k in heads}
        self._s["mode"] = self._held.mode

    def teardown(self, ctx: FixContext) -> None:
        release(ctx, self._held)
        self._held = None

    # ------------------------------------------------------------------ records
    def _heads(self, ctx: FixContext, step_inputs: Mapping[str, Tensor], logits: Tensor, feats: Any,
               adapter: Any) -> dict[str, Tensor]:
        out = {m: adapter.head_forward(step_inputs, adapter.masked_features(feats, [m])) for m in ctx.modalities}
        out[FUSED] = logits
        return out

    @torch.no_grad()
    def _mean_losses(self, ctx: FixContext, rows: Sequence[int]) -> dict[str, float]:
        assert self._held is not None
        sums: dict[str, float] = {}
        for adapter, inputs, labels, logits, feats in self._held.passes(ctx, rows):
            for k, z in self._heads(ctx, inputs, logits, feats, adapter).items():
                sums[k] = sums.get(k, 0.0) + float(F.cross_entropy(z.float(), labels, reduction="sum"))
        return {k: v / max(len(rows), 1) for k, v in sums.items()}

    def _record_rows(self, ctx: FixContext) -> dict[str, tuple[float, float]]:
        """(L^T, L^V) per head by evaluation passes over held-out rows and as many training rows."""
        assert self._held is not None
        held = self._held.rows
        val = self._mean_losses(ctx, held)
        train = self._mean_losses(ctx, self._held.training_rows(ctx, len(held)))
        return {k: (train[k], val[k]) for k in val}

    def _update(self, record: dict[str, tuple[float, float]]) -> None:
        s = self._s
        if s["record"] is not None:
            s["weights"], s["ogr"] = blending_weights(s["record"], record)
            s["estimates"] += 1
        s["record"] = record

    # ------------------------------------------------------------------ training step
    def loss(self, ctx: FixContext, step: Step) -> Tensor:
        assert self._held is not None
        s = self._s
        if self._held.mode == "rows" and s["record"] is None:
            self._update(self._record_rows(ctx))  # the window's start: the model before its first update
        heads = self._heads(ctx, step.inputs, step.logits, step.features, ctx.adapter)
        held = self._held.batch_mask(ctx, step.inputs)
        keep = None if held is None else ~held
        total = step.logits.sum() * 0.0
        for k, z in heads.items():
            per_row = F.cross_entropy(z, step.labels, reduction="none")
            if keep is None:
                total = total + s["weights"][k] * per_row.mean()
                continue
            total = total + s["weights"][k] * per_row[keep].sum() / max(int(keep.sum()), 1)
            done = per_row.detach()
            t, v = s["sums"].get(k, (0.0, 0.0))
            s["sums"][k] = [t + float(done[keep].sum()), v + float(done[held].sum())]
        if held is not None:
            s["counts"] = [s["counts"][0] + float(keep.sum()), s["counts"][1] + float(held.sum())]
        return total

    def on_epoch_end(self, ctx: FixContext, epoch: int) -> dict[str, Any]:
        assert self._held is not None
        s = self._s
        window_end = (epoch + 1) % self.every == 0
        if self._held.mode == "hash" and s["sums"]:
            heads = list(s["sums"])
            flat = torch.tensor([s["sums"][k][j] for k in heads for j in (0, 1)] + s["counts"], dtype=torch.float64)
            red = ctx.all_reduce_sum(flat)
            n_train, n_held = float(red[-2]), float(red[-1])
            if window_end and n_train > 0 and n_held > 0:
                record = {k: (float(red[2 * i]) / n_train, float(red[2 * i + 1]) / n_held) for i, k in enumerate(heads)}
                self._update(record)
        elif self._held.mode == "rows" and window_end:
            self._update(self._record_rows(ctx))
        s["sums"], s["counts"] = {}, [0.0, 0.0]
        return self.signals()

    # ------------------------------------------------------------------ state, signals
    def signals(self) -> dict[str, Any]:
        s = self._s
        out: dict[str, Any] = {f"w.{k}": float(v) for k, v in s["weights"].items()}
        # OGR is infinite when a held-out loss did not move: shown only when finite
        out.update({f"ogr.{k}": float(v) for k, v in s["ogr"].items() if math.isfinite(v)})
        if s["mode"]:
            out["held_out"] = "training rows" if s["mode"] == "rows" else "row hash"
        return out

    def state_dict(self) -> dict[str, Any]:
        s = self._s
        record = None if s["record"] is None else {k: list(v) for k, v in s["record"].items()}
        return {"weights": dict(s["weights"]), "ogr": dict(s["ogr"]), "record": record,
                "estimates": s["estimates"], "mode": s["mode"],
                "sums": {k: list(v) for k, v in s["sums"].items()}, "counts": list(s["counts"])}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        s = _fresh()
        s["weights"] = {str(k): float(v) for k, v in dict(state.get("weights", {})).items()}
        s["ogr"] = {str(k): float(v) for k, v in dict(state.get("ogr", {})).items()}
        rec = state.get("record")
        s["record"] = None if rec is None else {str(k): (float(v[0]), float(v[1])) for k, v in dict(rec).items()}
        s["estimates"] = int(state.get("estimates", 0))
        s["mode"] = str(state.get("mode", ""))
        s["sums"] = {str(k): [float(x) for x in v] for k, v in dict(state.get("sums", {})).items()}
        s["counts"] = [float(x) for x in state.get("counts", [0.0, 0.0])]
        self._s = s


def _fresh() -> dict[str, Any]:
    return {"weights": {}, "ogr": {}, "record": None, "estimates": 0, "mode": "", "sums": {}, "counts": [0.0, 0.0]}
