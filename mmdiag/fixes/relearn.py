"""relearn: Diagnosing and Re-learning (Wei et al., ECCV 2024), methods.md §17b."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch
from torch import Tensor

from mmdiag.fixes._common import check_range, reduce_mean, require_encoders
from mmdiag.fixes._heldout import HeldOut, release
from mmdiag.fixes.base import Fix, FixContext, Step, register_fix


def min_max_scale(x: Tensor) -> Tensor:
    """Each column mapped linearly onto [-1, 1] (scikit-learn's MinMaxScaler((-1, 1)), as the
    original); a constant column becomes -1."""
    x = x.double()
    low, high = x.min(dim=0).values, x.max(dim=0).values
    span = torch.where(high > low, high - low, torch.ones_like(high))
    return (x - low) / span * 2 - 1


def kmeans(x: Tensor, k: int, seed: int = 0, iterations: int = 100) -> Tensor:
    """Cluster index per row: Lloyd's k-means from a k-means++ start drawn with ``seed``.

    Stops when no assignment changes or after ``iterations`` rounds; an empty cluster keeps its centre.
    """
    x = x.double()
    n = x.shape[0]
    k = min(k, n)
    gen = torch.Generator().manual_seed(int(seed))
    first = int(torch.randint(n, (1,), generator=gen))
    centres = [x[first]]
    nearest = ((x - x[first]) ** 2).sum(1)
    for _ in range(1, k):
        total = float(nearest.sum())
        if total <= 0:  # fewer distinct points than clusters: any row will do
            pick = int(torch.randint(n, (1,), generator=gen))
        else:
            pick = int(torch.multinomial((nearest / total).cpu(), 1, generator=gen))
        centres.append(x[pick])
        nearest = torch.minimum(nearest, ((x - x[pick]) ** 2).sum(1))
    c = torch.stack(centres)
    assign = torch.cdist(x, c).argmin(1)
    for _ in range(iterations):
        for j in range(k):
            members = assign == j
            if bool(members.any()):
                c[j] = x[members].mean(0)
        new = torch.cdist(x, c).argmin(1)
        if torch.equal(new, assign):
            break
        assign = new
    return assign


def purity(clusters: Tensor, labels: Tensor) -> float:
    """Share of rows whose cluster's majority label equals their own: sum_c max_y n(c, y) / n."""
    if clusters.numel() == 0:
        return 0.0
    table = torch.zeros(int(clusters.max()) + 1, int(labels.max()) + 1, dtype=torch.float64)
    table.index_put_((clusters.cpu(), labels.cpu()), torch.ones(len(labels), dtype=torch.float64), accumulate=True)
    return float(table.max(dim=1).values.sum() / len(labels))


def relearn_weight(purity_train: float, purity_held: float, lam: float) -> float:
    """w = tanh(lambda * |purity_train - purity_held_out|)."""
    return math.tanh(lam * abs(purity_train - purity_held))


@torch.no_grad()
def soft_reinit(params: list[torch.nn.Parameter], initial: list[Tensor], weight: float) -> None:
    """theta <- w * theta_init + (1 - w) * theta, in place."""
    for p, p0 in zip(params, initial):
        p.mul_(1 - weight).add_(p0.to(p.device, p.dtype), alpha=weight)


@register_fix
@dataclass
class Relearn(Fix):
    """Diagnosing and Re-learning: softly re-initialise each encoder by how much its features
    over-fit, judged by clustering purity on training versus held-out rows (methods.md §17b).

    * Training is plain joint training (the fused cross-entropy), with held-out rows left out.
    * After epoch e with e > 0 and e % ``every`` == 0 (at most ``max_relearns`` times, as the
      original's ``reinit_epoch``/``reinit_num``): per modality m, the pooled encoder outputs of the
      training rows and of the held-out rows are each scaled to [-1, 1] per column and clustered by
      k-means with k = number of classes; purity = share of rows whose cluster's majority class is
      their label; w_m = tanh(lambda |purity_train - purity_held|).
    * Soft re-initialisation of every encoder parameter of m: theta <- w_m theta_init + (1 - w_m) theta,
      theta_init the weights at the start of training (kept in the fix's state). A modality whose
      features over-fit (large purity gap) is re-learned more. The optimizer's state is left as it is,
      as the original.

    Held-out rows: ``holdout_fraction`` of the training rows reserved through the context (the
    original uses a separate validation split; mmdiag never uses the validation set). Without the
    training data in the context, rows are held out by a hash of their values
    (:mod:`mmdiag.fixes._heldout`) and left out of the loss, and the features are those of the
    epoch's training batches, taken in the forward of the relearning epoch (the model moves during
    it); under torch.distributed each rank clusters its own rows and the purities are averaged over the
    ranks.

    Defaults: every = 20 epochs, at most 3 times, lambda = 3 (the original's ``ours.sh``), holdout 10 %,
    k-means: one k-means++ start (seeded), at most 100 Lloyd rounds.

    Cost: per relearning step one encoder pass over the training rows (``max_rows`` caps it) and 2M
    k-means runs; memory: one copy of the encoder weights. Signals: ``purity_train.<m>``,
    ``purity_held.<m>``, ``w.<m>``, ``relearns``, ``held_out``.

    Source: Wei et al., "Diagnosing and Re-learning for Balanced Multimodal Learning", ECCV 2024
    (GeWu-Lab/Diagnosing_Relearning_ECCV2024, ``code/ours.py``: purity_score, reinit_score, reinit;
    ``code/script/ours.sh``).
    """

    name: ClassVar[str] = "relearn"
    summary: ClassVar[str] = "soft re-initialisation of each encoder by its train vs held-out clustering-purity gap"
    matches: ClassVar[str] = "an encoder's features over-fit the training rows (clustering purity gap train vs held-out)"
    #: re-learning the over-fitted (usually dominant) encoder gives the under-learned ones room to learn
    targets: ClassVar[tuple[str, ...]] = ("unlearned_encoder",)

    every: int = 20
    max_relearns: int = 3
    lam: float = 3.0
    holdout_fraction: float = 0.1
    max_rows: int | None = None
    kmeans_iterations: int = 100
    seed: int = 0
    _s: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)
    _held: HeldOut | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_range(self.name, "every", self.every, 1, integer=True)
        check_range(self.name, "max_relearns", self.max_relearns, 0, integer=True)
        check_range(self.name, "lam", self.lam, 0)
        check_range(self.name, "holdout_fraction", self.holdout_fraction, 0, 1, low_open=True, high_open=True)
        check_range(self.name, "max_rows", self.max_rows, 1, integer=True, optional=True)
        check_range(self.name, "kmeans_iterations", self.kmeans_iterations, 1, integer=True)
        check_range(self.name, "seed", self.seed, integer=True)
        self._s = _fresh()

    def setup(self, ctx: FixContext) -> None:
        require_encoders(ctx, self.name)
        self._held = HeldOut.reserve(ctx, self.holdout_fraction, self.seed)
        self._s["mode"] = self._held.mode
        if not self._s["initial"]:  # a resumed run keeps the initial weights it started from
            self._s["initial"] = {m: [p.detach().clone() for p in ctx.encoder_parameters(m)] for m in ctx.modalities}

    def teardown(self, ctx: FixContext) -> None:
        release(ctx, self._held)
        self._held = None

    def relearns_after(self, epoch: int) -> bool:
        """Whether a relearning step follows ``epoch`` (e > 0, e % every == 0, not yet max_relearns)."""
        return epoch > 0 and epoch % self.every == 0 and self._s["relearns"] < self.max_relearns

    # ------------------------------------------------------------------ training step
    def loss(self, ctx: FixContext, step: Step) -> Tensor:
        assert step.loss is not None and self._held is not None
        held = self._held.batch_mask(ctx, step.inputs)
        if held is None:
            return step.loss
        if self.relearns_after(step.epoch) and step.features is not None:
            pooled = {m: ctx.adapter.pooled(m, step.features[m]).detach().flatten(1).double().cpu()
                      for m in ctx.modalities}
            bank, cpu_held = self._s["bank"], held.cpu()
            for part, rows in (("train", ~cpu_held), ("held", cpu_held)):
                for m in ctx.modalities:
                    bank.setdefault(f"{part}.{m}", []).append(pooled[m][rows])
                bank.setdefault(f"{part}.label", []).append(step.labels.detach().cpu()[rows])
        keep = ~held
        per_row = torch.nn.functional.cross_entropy(step.logits, step.labels, reduction="none")
        return per_row[keep].sum() / max(int(keep.sum()), 1)

    # ------------------------------------------------------------------ relearning
    def _features(self, ctx: FixContext) -> dict[str, Any]:
        """Pooled encoder outputs and labels of the training and held-out rows ({part.m: [N, d]})."""
        assert self._held is not None
        if self._held.mode == "hash":
            bank = self._s["bank"]
            return {k: torch.cat(v) if v else torch.zeros(0) for k, v in bank.items()}
        out: dict[str, Any] = {}
        for part, rows in (("train", self._held.training_rows(ctx, self.max_rows)), ("held", self._held.rows)):
            chunks: dict[str, list[Tensor]] = {}
            for adapter, _inputs, labels, _logits, feats in self._held.passes(ctx, rows):
                for m in ctx.modalities:
                    chunks.setdefault(m, []).append(adapter.pooled(m, feats[m]).flatten(1).double().cpu())
                chunks.setdefault("label", []).append(labels.cpu())
            out.update({f"{part}.{k}": torch.cat(v) for k, v in chunks.items()})
        return out

    def _relearn(self, ctx: FixContext) -> None:
        s = self._s
        feats = self._features(ctx)
        local = []
        for m in ctx.modalities:
            for part in ("train", "held"):
                x, y = feats.get(f"{part}.{m}"), feats.get(f"{part}.label")
                if x is None or y is None or len(y) < 2:
                    local.append(float("nan"))
                    continue
                local.append(purity(kmeans(min_max_scale(x), ctx.n_classes, self.seed, self.kmeans_iterations), y))
        # every rank applies the same weights: purities are averaged over the processes (in hash mode
        # each rank clusters the rows of its own batches)
        mean = reduce_mean(ctx, torch.tensor(local, dtype=torch.float64)).tolist()
        for j, m in enumerate(ctx.modalities):
            p = {"train": mean[2 * j], "held": mean[2 * j + 1]}
            s["purity"][m] = p
            w = relearn_weight(p["train"], p["held"], self.lam)
            w = 0.0 if math.isnan(w) else w
            s["w"][m] = w
            soft_reinit(ctx.encoder_parameters(m), s["initial"][m], w)
        s["relearns"] += 1

    def on_epoch_end(self, ctx: FixContext, epoch: int) -> dict[str, Any]:
        if self.relearns_after(epoch):
            self._relearn(ctx)
        self._s["bank"] = {}
        return self.signals()

    # ------------------------------------------------------------------ state, signals
    def signals(self) -> dict[str, Any]:
        s = self._s
        out: dict[str, Any] = {"relearns": float(s["relearns"])}
        for m, p in s["purity"].items():
            for part in ("train", "held"):
                if math.isfinite(p[part]):
                    out[f"purity_{part}.{m}"] = p[part]
        out.update({f"w.{m}": w for m, w in s["w"].items()})
        if s["mode"]:
            out["held_out"] = "training rows" if s["mode"] == "rows" else "row hash"
        return out

    def state_dict(self) -> dict[str, Any]:
        s = self._s
        return {"relearns": s["relearns"], "mode": s["mode"], "w": dict(s["w"]),
                "purity": {m: dict(p) for m, p in s["purity"].items()},
                "initial": {m: [t.clone() for t in ts] for m, ts in s["initial"].items()},
                "bank": {k: [t.clone() for t in v] for k, v in s["bank"].items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        s = _fresh()
        s["relearns"] = int(state.get("relearns", 0))
        s["mode"] = str(state.get("mode", ""))
        s["w"] = {str(m): float(w) for m, w in dict(state.get("w", {})).items()}
        s["purity"] = {str(m): {str(k): float(v) for k, v in dict(p).items()}
                       for m, p in dict(state.get("purity", {})).items()}
        s["initial"] = {str(m): [torch.as_tensor(t).clone() for t in ts]
                        for m, ts in dict(state.get("initial", {})).items()}
        s["bank"] = {str(k): [torch.as_tensor(t).clone() for t in v] for k, v in dict(state.get("bank", {})).items()}
        self._s = s


def _fresh() -> dict[str, Any]:
    return {"relearns": 0, "mode": "", "w": {}, "purity": {}, "initial": {}, "bank": {}}
