"""MMANet: margin-aware distillation and modality-aware regularisation for incomplete modalities
(Wei et al., CVPR 2023), methods.md §13."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmdiag.adapter import ModelAdapter, unwrap
from mmdiag.errors import ConfigError
from mmdiag.fixes._combinations import (all_masks, check_spec, combination_distribution, draw, histogram_kl,
                                        mask_name, mixed_features, present)
from mmdiag.fixes._common import check_range, require_encoders
from mmdiag.fixes._fused import fused_input, head_module, plain_adapter, pooled_concat, single
from mmdiag.fixes.base import Fix, FixContext, Step, register_fix
from mmdiag.runtime.batching import Batches

WEAK_BY = ("kl", "accuracy")
MAR_ON = ("drawn", "all")
TEACHERS = ("auto", "start", "begin")


def gram(features: Tensor) -> Tensor:
    """Row-normalised B x B Gram matrix of the flattened features: normalize_rows(F F^T)."""
    f = features.flatten(1).float()
    return F.normalize(f @ f.t(), p=2, dim=1)


def margin_weights(teacher_logits: Tensor) -> Tensor:
    """The teacher's prediction entropy per sample, normalised to sum 1 (uniform if all are 0)."""
    logp = F.log_softmax(teacher_logits.detach().float(), dim=1)
    h = -(logp.exp() * logp).sum(dim=1)
    total = h.sum()
    return h / total if bool(total > 0) else torch.full_like(h, 1.0 / h.numel())


def mad_loss(student: Tensor, teacher: Tensor, teacher_logits: Tensor) -> Tensor:
    """Margin-aware distillation: sum_ij (G_s - G_t)_ij^2 * w_j, with G the row-normalised Gram
    matrices and w the teacher's normalised prediction entropy (MMANet's ``MAD`` loss)."""
    diff = (gram(student) - gram(teacher.detach())) ** 2
    return (diff * margin_weights(teacher_logits)[None, :]).sum()


def untrained(correct: float, n: float, majority: float) -> bool:
    """Whether an accuracy of ``correct``/``n`` is within 3 binomial standard errors of always
    predicting the majority class (rate ``majority``): the model has not learned the task."""
    if n <= 0:
        return True
    return correct / n <= majority + 3.0 * math.sqrt(max(majority * (1 - majority), 1e-12) / n)


@register_fix
@dataclass
class MMANet(Fix):
    """MMANet: combination dropout, margin-aware distillation from a frozen teacher, and extra CE on
    the weak combination.

    What it changes:
        * Every training sample draws one non-empty combination of present modalities (uniform over
          the 2^M - 1 by default; ``missing`` rates or an explicit ``combinations`` distribution,
          see :mod:`mmdiag.fixes._combinations`); absent modalities are masked at the encoder output
          (the adapter's baseline) and the fused head re-run: the fused CE is taken on these outputs.
        * MAD (from ``begin_epoch``): the teacher is a frozen copy of the model. With B x B Gram
          matrices G = normalize_rows(F F^T) of the fused representation F (the input of the
          adapter's head, or the concatenated pooled encoder outputs when no head is known) of the
          student (dropout input) and teacher (full input), L_mad = sum_ij (G_s - G_t)_ij^2 w_j with
          w_j = H_j / sum_k H_k the teacher's normalised prediction entropy.
        * MAR: the weak combination is the proper combination (of the distribution's support) whose
          predicted-label histogram P_c is farthest from the full input's, KL(P_c || P_full), both
          mixed with ``smoothing`` of the uniform distribution (``weak_by="accuracy"``: the lowest accuracy).
          Scores are summed over the epochs before ``begin_epoch`` (evaluated at each epoch end on
          held-out training rows, ``holdout_fraction`` of them, reserved through the context;
          without training data in the context, or with ``holdout_fraction=0``, on the epoch's
          training batches: the dropout outputs per drawn combination against the full forward),
          and re-evaluated every ``mine_every`` epochs after it if set. The weak set is that
          combination plus (``constituents``) its single modalities. From ``begin_epoch``
          L_mar = sum over the weak set of the CE of the samples that drew it, divided by the batch
          size (``mar_on="drawn"``, MMANet), or of the set's readout for every sample (``"all"``).
        * Loss: CE + lambda_mar L_mar + lambda_mad L_mad.

    Teacher: ``start`` = the model at setup (the trained model when fine-tuning); ``begin`` = the
    model at the start of ``begin_epoch``; ``auto`` = ``start`` if its accuracy (held-out rows, else
    the first batch) beats the majority class by 3 standard errors, else ``begin`` (no distillation
    when ``begin_epoch`` is 0). Its weights are part of the fix's state (exact resume).

    Defaults: lambda_mad 30, lambda_mar 0.5 (MMANet's CASIA-SURF scripts), begin_epoch
    min(5, epochs // 4) (MMANet: 5 of 100 epochs), holdout 10 %, smoothing 0.01.

    Cost: per step one head call for the dropout outputs, a teacher forward (no grad) and a B x B
    Gram pair; with ``mar_on="all"`` one head call per weak combination. Per mining epoch one encoder
    pass and 2^M - 1 head calls over the held-out rows. Memory: one copy of the model (none with
    ``lambda_mad=0``).

    Source: shicaiwei123/MMANet-CVPR2023, ``classification/loss/kd/mad.py``,
    ``classification/lib/model_develop.py`` (train_knowledge_distill_patch_feature_auxi_weak),
    ``classification/src/surf_mmanet.sh``. Signals: ``weak``, ``weak_score``, ``score.<combination>``,
    ``teacher``, ``mined_on``; logs ``mad`` and ``mar``.
    """

    name: ClassVar[str] = "mmanet"
    summary: ClassVar[str] = ("combination dropout + margin-aware distillation from a frozen teacher + CE on the "
                              "weak combination")
    matches: ClassVar[str] = "accuracy drops when a modality is missing at deployment (deployment accuracy)"
    targets: ClassVar[tuple[str, ...]] = ("missing_modality",)

    lambda_mad: float = 30.0
    lambda_mar: float = 0.5
    begin_epoch: int | None = None
    missing: str | dict[str, float] | None = None
    combinations: str | dict[str, float] | None = None
    weak_by: str = "kl"
    constituents: bool = True
    mar_on: str = "drawn"
    mine_every: int | None = None
    holdout_fraction: float = 0.1
    smoothing: float = 0.01
    teacher: str = "auto"
    seed: int = 0
    _s: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)
    _teacher_model: nn.Module | None = field(default=None, init=False, repr=False, compare=False)
    _pending: Tensor | None = field(default=None, init=False, repr=False, compare=False)
    _ctx_bits: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_range(self.name, "lambda_mad", self.lambda_mad, 0)
        check_range(self.name, "lambda_mar", self.lambda_mar, 0)
        check_range(self.name, "begin_epoch", self.begin_epoch, 0, integer=True, optional=True)
        check_range(self.name, "mine_every", self.mine_every, 1, integer=True, optional=True)
        check_range(self.name, "holdout_fraction", self.holdout_fraction, 0, 1, high_open=True)
        check_range(self.name, "smoothing", self.smoothing, 0, 1, low_open=True, high_open=True)
        check_range(self.name, "seed", self.seed, integer=True)
        for key, value, options in (("weak_by", self.weak_by, WEAK_BY), ("mar_on", self.mar_on, MAR_ON),
                                    ("teacher", self.teacher, TEACHERS)):
            if value not in options:
                raise ConfigError(f"{self.name}: {key} must be one of {', '.join(options)}; found {value!r}.")
        if not isinstance(self.constituents, bool):
            raise ConfigError(f"{self.name}: constituents must be true or false; found {self.constituents!r}.")
        check_spec(self.name, self.missing, self.combinations)
        self._s = _fresh_state()

    # ------------------------------------------------------------------ setup
    def setup(self, ctx: FixContext) -> None:
        require_encoders(ctx, self.name)
        mods = ctx.modalities
        masks = all_masks(mods)
        probs = combination_distribution(self.name, mods, self.missing, self.combinations)
        s = self._s
        if len(s["seen"]) != len(masks) or len(s["full_hist"]) != ctx.n_classes:
            s.update(_counters(len(masks), ctx.n_classes))
        if len(s["score"]) != len(masks):
            s["score"] = [0.0] * len(masks)
        s["names"] = [mask_name(k, mods) for k in masks]
        if s["begin"] < 0:  # a resumed run keeps the begin epoch it started with (load_state_dict)
            s["begin"] = self.begin_epoch if self.begin_epoch is not None else min(5, ctx.epochs // 4)
        rows = ctx.hold_out(self.holdout_fraction, self.seed) if ctx.train_data is not None else ()
        s["held"] = bool(rows)
        self._ctx_bits = {"masks": masks, "probs": probs, "rows": tuple(rows), "head": head_module(ctx.adapter),
                          "teacher_head": None, "teacher_adapter": None}
        if self.lambda_mad <= 0:  # no distillation: no copy of the model
            return
        teacher = copy.deepcopy(unwrap(ctx.adapter.model)).eval()
        teacher.requires_grad_(False)
        pending = s.get("teacher_weights")
        if pending is not None:
            teacher.load_state_dict(pending)
            s["teacher_weights"] = None
        self._teacher_model = teacher
        self._ctx_bits.update(teacher_head=head_module(ctx.adapter, teacher),
                              teacher_adapter=plain_adapter(ctx.adapter, teacher))

    def _candidates(self) -> list[int]:
        masks, probs = self._ctx_bits["masks"], self._ctx_bits["probs"]
        return [k for k, p in enumerate(probs) if p > 0 and not all(masks[k])]

    # ------------------------------------------------------------------ teacher
    def _start(self, ctx: FixContext, step: Step) -> None:
        """Once, at the first step of a fresh run: the teacher choice and, with ``begin_epoch`` 0 and
        held-out rows, the first weak-combination scores (of the starting model, i.e. the teacher)."""
        s, bits = self._s, self._ctx_bits
        stats = None
        if bits["rows"]:  # the starting model: the teacher copy, or the model itself before its first update
            stats = self._evaluate(ctx, bits["teacher_adapter"] or plain_adapter(ctx.adapter))
            correct, n, majority = stats["full_correct"], stats["n"], stats["majority"]
        else:
            labels = step.labels
            counts = torch.bincount(labels.detach().cpu(), minlength=ctx.n_classes).double()
            hit = float((step.logits.detach().argmax(1) == labels).sum())
            red = ctx.all_reduce_sum(torch.cat([torch.tensor([hit], dtype=torch.float64), counts]))
            correct, n, majority = float(red[0]), float(red[1:].sum()), float(red[1:].max() / red[1:].sum())
        trained = not untrained(correct, n, majority)
        if self._teacher_model is None:
            s["teacher_mode"] = "none"
        elif self.teacher == "start" or (self.teacher == "auto" and trained):
            s["teacher_mode"] = "start"
        elif self.teacher == "begin" or s["begin"] > 0:
            s["teacher_mode"] = "begin"
        else:
            s["teacher_mode"] = "none"
        if stats is not None and s["begin"] == 0:
            self._score(stats, replace=True)
        s["started"] = True

    def _teacher_view(self, ctx: FixContext, inputs: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(fused representation, logits) of the teacher on the full inputs, without grad."""
        bits = self._ctx_bits
        adapter: ModelAdapter = bits["teacher_adapter"]
        with torch.no_grad():
            if bits["teacher_head"] is not None:
                with fused_input(bits["teacher_head"]) as seen:
                    logits = adapter.call_model(inputs)
                return single(seen, "teacher"), logits
            logits, feats = adapter.encode(inputs)
            return pooled_concat(adapter, feats), logits

    # ------------------------------------------------------------------ training step
    def forward(self, ctx: FixContext, step: Step) -> Tensor | None:
        if step.features is None:
            require_encoders(ctx, self.name)
        s, bits = self._s, self._ctx_bits
        if not s["started"]:
            self._start(ctx, step)
        active = step.epoch >= s["begin"]
        if s["teacher_mode"] == "begin" and active and not s["teacher_taken"]:
            assert self._teacher_model is not None
            self._teacher_model.load_state_dict(unwrap(ctx.adapter.model).state_dict())
            s["teacher_taken"] = True
        b = step.labels.shape[0]
        index, keep = draw(bits["probs"], bits["masks"], b, step.labels.device)
        mixed = mixed_features(ctx.adapter, step.features, keep)
        if bits["head"] is not None:
            with fused_input(bits["head"]) as seen:
                logits = ctx.adapter.head_forward(step.inputs, mixed)
            rep = single(seen, "student")
        else:
            logits = ctx.adapter.head_forward(step.inputs, mixed)
            rep = pooled_concat(ctx.adapter, mixed)
        if not bits["rows"]:
            self._count(step, logits, index)
        extra = logits.sum() * 0.0
        if active and self.lambda_mad > 0 and s["teacher_mode"] != "none":
            t_rep, t_logits = self._teacher_view(ctx, step.inputs)
            mad = mad_loss(rep, t_rep, t_logits)
            step.logs["mad"] = float(mad.detach())
            extra = extra + self.lambda_mad * mad
        if active and self.lambda_mar > 0 and s["weak"]:
            mar = self._mar(ctx, step, logits, index)
            step.logs["mar"] = float(mar.detach())
            extra = extra + self.lambda_mar * mar
        self._pending = extra
        return logits

    def _mar(self, ctx: FixContext, step: Step, logits: Tensor, index: Tensor) -> Tensor:
        """L_mar: CE of the weak set's samples (``drawn``) or readouts (``all``)."""
        b = step.labels.shape[0]
        total = logits.sum() * 0.0
        for k in self._s["weak"]:
            if self.mar_on == "drawn":
                sel = index == k
                if bool(sel.any()):
                    total = total + F.cross_entropy(logits[sel], step.labels[sel], reduction="sum") / b
            else:
                keep = present(self._ctx_bits["masks"][k], ctx.modalities)
                z = ctx.adapter.head_forward(step.inputs, ctx.adapter.masked_features(step.features, keep))
                total = total + F.cross_entropy(z, step.labels)
        return total

    def _count(self, step: Step, logits: Tensor, index: Tensor) -> None:
        """Online statistics: predicted-label counts per drawn combination and of the full forward."""
        s = self._s
        with torch.no_grad():
            pred = logits.detach().argmax(1).cpu()
            full = step.logits.detach().argmax(1).cpu()
            idx = index.cpu()
            hit = (pred == step.labels.detach().cpu()).double()
            c = len(s["full_hist"])
            s["hist"] = (torch.tensor(s["hist"], dtype=torch.float64).index_put_(
                (idx, pred), torch.ones(len(idx), dtype=torch.float64), accumulate=True)).tolist()
            s["full_hist"] = (torch.tensor(s["full_hist"], dtype=torch.float64)
                              + torch.bincount(full, minlength=c).double()).tolist()
            k = len(s["seen"])
            s["seen"] = (torch.tensor(s["seen"], dtype=torch.float64) + torch.bincount(idx, minlength=k)).tolist()
            s["correct"] = (torch.tensor(s["correct"], dtype=torch.float64)
                            + torch.bincount(idx, weights=hit, minlength=k)).tolist()

    def loss(self, ctx: FixContext, step: Step) -> Tensor:
        assert step.loss is not None
        extra, self._pending = self._pending, None
        return step.loss if extra is None else step.loss + extra

    # ------------------------------------------------------------------ mining
    @torch.no_grad()
    def _evaluate(self, ctx: FixContext, adapter: ModelAdapter, chunk: int = 256) -> dict[str, Any]:
        """Predicted-label counts of every combination and of the full input on the held-out rows."""
        masks, rows = self._ctx_bits["masks"], self._ctx_bits["rows"]
        c = ctx.n_classes
        hist = torch.zeros(len(masks), c, dtype=torch.float64)
        correct = torch.zeros(len(masks), dtype=torch.float64)
        full_hist = torch.zeros(c, dtype=torch.float64)
        labels_hist = torch.zeros(c, dtype=torch.float64)
        full_correct = 0.0
        model = unwrap(adapter.model)
        was = model.training
        model.eval()
        gen = torch.Generator().manual_seed(self.seed)
        batches = Batches(ctx.train_data, ctx.modalities, ctx.device)
        try:
            for start in range(0, len(rows), chunk):
                inputs, labels = batches.get(rows[start:start + chunk])
                logits, feats = adapter.encode(inputs)
                y = labels.cpu()
                full_hist += torch.bincount(logits.argmax(1).cpu(), minlength=c).double()
                labels_hist += torch.bincount(y, minlength=c).double()
                full_correct += float((logits.argmax(1).cpu() == y).sum())
                for k, mask in enumerate(masks):
                    z = adapter.head_forward(inputs, adapter.masked_features(feats, present(mask, ctx.modalities), gen))
                    pred = z.argmax(1).cpu()
                    hist[k] += torch.bincount(pred, minlength=c).double()
                    correct[k] += float((pred == y).sum())
        finally:
            model.train(was)
        n = float(len(rows))
        return {"hist": hist, "full_hist": full_hist, "correct": correct, "seen": torch.full_like(correct, n),
                "full_correct": full_correct, "n": n, "majority": float(labels_hist.max() / max(n, 1.0))}

    def _online_stats(self, ctx: FixContext) -> dict[str, Any]:
        """This epoch's training-batch counts, summed over the processes."""
        s = self._s
        k, c = len(s["seen"]), len(s["full_hist"])
        flat = torch.cat([torch.tensor(s["hist"], dtype=torch.float64).flatten(),
                          torch.tensor(s["full_hist"] + s["correct"] + s["seen"], dtype=torch.float64)])
        red = ctx.all_reduce_sum(flat)
        return {"hist": red[:k * c].view(k, c), "full_hist": red[k * c:k * c + c],
                "correct": red[k * c + c:k * c + c + k], "seen": red[k * c + c + k:]}

    def _score(self, stats: Mapping[str, Any], replace: bool) -> None:
        """Add (or, with ``replace``, set) the candidates' weakness scores and choose the weak set."""
        s = self._s
        for k in self._candidates():
            if float(stats["seen"][k]) <= 0:
                value = 0.0
            elif self.weak_by == "kl":
                value = histogram_kl(stats["hist"][k], stats["full_hist"], self.smoothing)
            else:
                value = 1.0 - float(stats["correct"][k]) / float(stats["seen"][k])
            s["score"][k] = value if replace else s["score"][k] + value
        cands = self._candidates()
        if not cands:
            s["weak"] = []
            return
        best = max(cands, key=lambda k: (s["score"][k], -k))
        weak = [best]
        if self.constituents:
            mask = self._ctx_bits["masks"][best]
            for j, on in enumerate(mask):
                single_k = self._ctx_bits["masks"].index(tuple(i == j for i in range(len(mask))))
                if on and single_k != best:
                    weak.append(single_k)
        s["weak"], s["weak_score"] = weak, float(s["score"][best])

    def on_epoch_end(self, ctx: FixContext, epoch: int) -> dict[str, Any]:
        s, bits = self._s, self._ctx_bits
        begin = s["begin"]
        remine = self.mine_every is not None and epoch >= begin and (epoch + 1 - begin) % self.mine_every == 0
        mining = epoch < begin or remine or (not s["weak"] and bool(self._candidates()))
        if mining:
            if bits["rows"]:
                stats = self._evaluate(ctx, plain_adapter(ctx.adapter))
            else:
                stats = self._online_stats(ctx)
            self._score(stats, replace=epoch >= begin)
            if epoch < begin - 1:
                s["weak"] = []  # scores still accumulate: the weak set is chosen at the end of begin_epoch - 1
        s.update(_counters(len(s["seen"]), len(s["full_hist"])))
        return self.signals()

    # ------------------------------------------------------------------ teardown, state, signals
    def teardown(self, ctx: FixContext) -> None:
        self._pending = None
        self._teacher_model = None  # the copy is freed: checkpoints written during training hold its weights
        self._ctx_bits = {}
        ctx.held_out = ()

    def state_dict(self) -> dict[str, Any]:
        out = {k: copy.deepcopy(v) for k, v in self._s.items() if k != "teacher_weights"}
        if self._teacher_model is not None:
            out["teacher_weights"] = {k: v.detach().clone() for k, v in self._teacher_model.state_dict().items()}
        else:
            out["teacher_weights"] = copy.deepcopy(self._s.get("teacher_weights"))
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        s = _fresh_state()
        for key in s:
            if key in state:
                s[key] = copy.deepcopy(state[key])
        s["weak"] = [int(k) for k in s["weak"]]
        weights = s.get("teacher_weights")
        if weights is not None and self._teacher_model is not None:
            self._teacher_model.load_state_dict(weights)
            s["teacher_weights"] = None
        self._s = s

    def signals(self) -> dict[str, Any]:
        s = self._s
        names = s["names"]
        out: dict[str, Any] = {f"score.{names[k]}": v for k, v in enumerate(s["score"]) if names and v != 0.0}
        if s["weak"] and names:
            out["weak"] = names[s["weak"][0]]
            out["weak_score"] = float(s["weak_score"])
        if s["teacher_mode"]:
            out["teacher"] = s["teacher_mode"]
        if names:
            out["mined_on"] = "holdout" if s["held"] else "training batches"
        return out


def _counters(k: int, c: int) -> dict[str, Any]:
    return {"hist": [[0.0] * c for _ in range(k)], "full_hist": [0.0] * c, "correct": [0.0] * k, "seen": [0.0] * k}


def _fresh_state() -> dict[str, Any]:
    return {"names": [], "score": [], "weak": [], "weak_score": 0.0, "teacher_mode": "", "teacher_taken": False,
            "started": False, "held": False, "begin": -1, "teacher_weights": None, **_counters(0, 0)}
