"""modality_dropout: random modality-combination dropout with extra supervision of the hardest
combination (DMRNet, Wei et al., ECCV 2024; MMANet's weak-combination regulariser, CVPR 2023)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from mmdiag.errors import ConfigError
from mmdiag.evidence import nonempty_subsets
from mmdiag.fixes._combinations import mix, mixed_features
from mmdiag.fixes._common import check_range
from mmdiag.fixes.base import Fix, FixContext, Step, register_fix

HARD_MODES = ("dropped", "all")


@register_fix
@dataclass
class ModalityDropout(Fix):
    """Random modality-combination dropout plus extra CE on the hardest combination.

    Every training sample gets one combination of present modalities drawn uniformly from the
    2^M - 1 non-empty ones (the full set included: for M=2, {a}, {v} and {a, v} with probability
    1/3 each, as DMRNet). The absent modalities are masked at the *feature level* (their encoder
    outputs replaced by the adapter's baseline, zeros by default, and the fusion head re-run on the
    mixed features: one extra head call; at the input level on black-box models), and the fused
    cross-entropy is taken on these outputs: ``forward`` returns them.

    The hardest combination is the proper combination with the lowest running training accuracy of
    the dropout outputs over the last epoch (re-estimated at every epoch end, counts summed over the
    processes; MMANet and DMRNet also pick it from the first epochs). From ``begin_epoch`` on, the
    loss gains beta * L_hard:

    * ``hard="dropped"`` (DMRNet): L_hard = sum of the CE of the samples whose drawn combination is
      the hardest, divided by the batch size;
    * ``hard="all"``: L_hard = CE of the hardest combination's readout for every sample (one more
      head call).

    Defaults: beta = 0.2 (DMRNet's best CREMA-D script; its argument default is 0.5),
    begin_epoch = 1 (the first epoch only estimates), ``hard="dropped"``. DMRNet's probabilistic
    embedding and KL term and MMANet's distillation are not part of this fix: it is their shared
    core, modality dropout with hard-combination supervision, which needs no change to the model.

    Signals: ``acc.<combination>`` (running training accuracy of each combination this epoch),
    ``weakest`` (the combination in use, a name) and ``weakest_acc`` (its accuracy when it was chosen).

    Cost: one extra fusion-head call per step (two with ``hard="all"``).

    Source: DMRNet ``audio-visual classification/main.py`` and ``models/basic_model.py``
    (modality_drop), ``cramed.sh``; MMANet ``classification/lib/model_develop.py``.
    """

    name: ClassVar[str] = "modality_dropout"
    summary: ClassVar[str] = "random modality-combination dropout + extra CE on the weakest combination"
    matches: ClassVar[str] = "accuracy collapses for some modality combination (per-combination accuracy)"
    targets: ClassVar[tuple[str, ...]] = ("collapsed_combination",)
    needs_encoders: ClassVar[bool] = False

    beta: float = 0.2
    begin_epoch: int = 1
    hard: str = "dropped"
    _weakest: int | None = field(default=None, init=False, repr=False, compare=False)
    _weakest_acc: float | None = field(default=None, init=False, repr=False, compare=False)
    _correct: list[float] = field(default_factory=list, init=False, repr=False, compare=False)
    _seen: list[float] = field(default_factory=list, init=False, repr=False, compare=False)
    _pending: Tensor | None = field(default=None, init=False, repr=False, compare=False)
    _names: list[str] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_range("modality_dropout", "beta", self.beta, 0)
        check_range("modality_dropout", "begin_epoch", self.begin_epoch, 0, integer=True)
        if self.hard not in HARD_MODES:
            raise ConfigError(f"modality_dropout: hard must be one of {', '.join(HARD_MODES)}; found {self.hard!r}.")

    # ------------------------------------------------------------------ combinations
    @staticmethod
    def combinations(modalities: tuple[str, ...]) -> list[tuple[str, ...]]:
        """The non-empty combinations, by size then order (the last one is the full set)."""
        return [combo for _, combo in nonempty_subsets(modalities)]

    def _ensure(self, modalities: tuple[str, ...]) -> list[tuple[str, ...]]:
        combos = self.combinations(modalities)
        if len(self._seen) != len(combos):
            self._correct = [0.0] * len(combos)
            self._seen = [0.0] * len(combos)
        self._names = ["+".join(c) for c in combos]
        return combos

    @property
    def weakest(self) -> str | None:
        """Name of the combination that currently gets the extra supervision."""
        return None if self._weakest is None or not self._names else self._names[self._weakest]

    def _masked_logits(self, ctx: FixContext, step: Step, keep: Tensor) -> Tensor:
        """Logits with modality j present for sample i iff keep[i, j]."""
        adapter = ctx.adapter
        mods = ctx.modalities
        if step.features is not None:
            return adapter.head_forward(step.inputs, mixed_features(adapter, step.features, keep))
        base_in = adapter.masked_inputs(step.inputs, [])
        mixed_in = {m: mix(step.inputs[m], base_in[m], keep[:, j]) for j, m in enumerate(mods)}
        return adapter.call_model(mixed_in)

    # ------------------------------------------------------------------ hooks
    def setup(self, ctx: FixContext) -> None:
        self._ensure(ctx.modalities)

    def forward(self, ctx: FixContext, step: Step) -> Tensor | None:
        mods = ctx.modalities
        combos = self._ensure(mods)
        b = step.labels.shape[0]
        members = torch.tensor([[m in c for m in mods] for c in combos], dtype=torch.bool)
        drawn = torch.randint(len(combos), (b,))
        keep = members[drawn].to(step.labels.device)
        logits = self._masked_logits(ctx, step, keep)
        drawn = drawn.to(step.labels.device)
        with torch.no_grad():
            hit = (logits.argmax(1) == step.labels).float()
            for j in range(len(combos)):
                sel = drawn == j
                self._seen[j] += float(sel.sum())
                self._correct[j] += float(hit[sel].sum())
        self._pending = None
        if self.beta > 0 and self._weakest is not None and step.epoch >= self.begin_epoch:
            if self.hard == "dropped":
                sel = drawn == self._weakest
                ce = F.cross_entropy(logits[sel], step.labels[sel], reduction="sum") if bool(sel.any()) \
                    else logits.sum() * 0.0
                self._pending = ce / b
            else:
                hard_keep = members[self._weakest].to(step.labels.device).expand(b, len(mods))
                self._pending = F.cross_entropy(self._masked_logits(ctx, step, hard_keep), step.labels)
        return logits

    def loss(self, ctx: FixContext, step: Step) -> Tensor:
        assert step.loss is not None
        extra, self._pending = self._pending, None
        if extra is None:
            return step.loss
        step.logs["hard_loss"] = float(extra.detach())
        return step.loss + self.beta * extra

    def on_epoch_end(self, ctx: FixContext, epoch: int) -> dict[str, Any]:
        combos = self._ensure(ctx.modalities)
        counts = ctx.all_reduce_sum(torch.tensor(self._correct + self._seen, dtype=torch.float64))
        correct, seen = counts[:len(combos)].tolist(), counts[len(combos):].tolist()
        accs = {j: correct[j] / seen[j] for j in range(len(combos)) if seen[j] > 0}
        proper = {j: a for j, a in accs.items() if len(combos[j]) < len(ctx.modalities)}
        if proper:
            self._weakest = min(proper, key=lambda j: (proper[j], j))
            self._weakest_acc = proper[self._weakest]
        out = self.signals_from(accs)
        self._correct = [0.0] * len(combos)
        self._seen = [0.0] * len(combos)
        return out

    def signals_from(self, accs: Mapping[int, float]) -> dict[str, Any]:
        out: dict[str, Any] = {f"acc.{self._names[j]}": a for j, a in sorted(accs.items())}
        if self.weakest is not None:
            out["weakest"] = self.weakest
            out["weakest_acc"] = self._weakest_acc
        return out

    def signals(self) -> dict[str, Any]:
        accs = {j: self._correct[j] / self._seen[j] for j in range(len(self._seen)) if self._seen[j] > 0}
        return self.signals_from(accs)

    def teardown(self, ctx: FixContext) -> None:
        self._pending = None

    def state_dict(self) -> dict[str, Any]:
        return {"weakest": self._weakest, "weakest_acc": self._weakest_acc, "correct": list(self._correct),
                "seen": list(self._seen), "names": list(self._names)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        w = state.get("weakest")
        self._weakest = None if w is None else int(w)
        acc = state.get("weakest_acc")
        self._weakest_acc = None if acc is None else float(acc)
        self._correct = [float(v) for v in state.get("correct", [])]
        self._seen = [float(v) for v in state.get("seen", [])]
        self._names = [str(v) for v in state.get("names", [])]

