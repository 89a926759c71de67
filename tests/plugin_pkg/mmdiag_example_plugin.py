"""An example mmdiag plug-in: one diagnostic and one fix, registered through entry points.

The entry points in ``pyproject.toml`` name the two classes; mmdiag loads them the first time it
looks a diagnostic or a fix up, so ``mmdiag list``, ``mmdiag analyze --only readout_confidence``,
gate rules such as ``readout_confidence.audio >= 0.5`` and ``mmdiag rebalance --fix unimodal_aux``
work with no edit to mmdiag. See docs/extending.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from mmdiag import Diagnostic, Fix
from mmdiag.evidence import Evidence
from mmdiag.fixes import FixContext, Step
from mmdiag.report import Result


@dataclass(frozen=True)
class ReadoutConfidence(Diagnostic):
    """Readout confidence: the mean true-class probability the model gives from one modality alone.

    Definition: with z_m the logits when only modality m is present (the others masked as the
    adapter masks them), c_m = mean_i softmax(z_{m,i})[y_i]. Headline: the spread
    max_m c_m - min_m c_m (0 = every modality alone is as convincing as the others).

    Intervals: percentile bootstrap over the evaluated rows (``bootstrap`` resamples, ``level``).

    Cost: none beyond the evidence (the subset logits). Source: this example.
    """

    name: ClassVar[str] = "readout_confidence"
    summary: ClassVar[str] = "mean true-class probability from each modality alone (others masked)"
    needs: ClassVar[frozenset[str]] = frozenset({"subsets"})
    higher_is_better: ClassVar[bool | None] = None
    contribution: ClassVar[bool] = True  # ranks modalities by how much the model draws from them
    shareable: ClassVar[bool] = False  # a probability is no amount: 1/C means "nothing", not 0
    scale: ClassVar[str] = "probability of the true class"
    higher_means: ClassVar[str] = "the model is more confident from the modality alone"
    how_to_read: ClassVar[str] = (
        "A modality whose readout stays near 1/C (chance) gives the model little to go on by itself. "
        "Compare with ``unimodal``: a confident readout that is often wrong is overconfidence."
    )
    figures: ClassVar[tuple[str, ...]] = ("modality_bars",)

    def compute(self, ev: Evidence, prior: Mapping[str, Result] | None = None) -> Result:
        ev.require("subsets")
        probs = np.stack([ev.true_logprob(ev.subset_logits([m])).exp().double().numpy() for m in ev.modalities],
                         axis=1)  # [N, M]
        means = probs.mean(axis=0)
        ci: dict[str, list[float]] = {}
        value_ci = None
        if self.bootstrap > 0:
            rng = np.random.default_rng(self.seed)
            draws = np.stack([probs[rng.integers(0, len(probs), len(probs))].mean(axis=0)
                              for _ in range(self.bootstrap)])
            tail = 100 * (1 - self.level) / 2
            lo, hi = np.percentile(draws, [tail, 100 - tail], axis=0)
            ci = {m: [float(lo[j]), float(hi[j])] for j, m in enumerate(ev.modalities)}
            spread = draws.max(axis=1) - draws.min(axis=1)
            value_ci = [float(v) for v in np.percentile(spread, [tail, 100 - tail])]
        return self.result(float(means.max() - means.min()), dict(zip(ev.modalities, means.tolist())),
                           ci=ci, value_ci=value_ci, details={"chance": 1.0 / ev.n_classes})


@dataclass
class UnimodalAux(Fix):
    """Auxiliary unimodal losses: the fused cross-entropy plus ``weight`` times the mean of each
    modality's own cross-entropy, read through the fusion head with the other modalities masked.

    It teaches the head to read every modality by itself, so the one the fused loss ignores keeps
    receiving a learning signal. It needs no known encoders: on a black box the readout masks inputs.
    """

    name: ClassVar[str] = "unimodal_aux"
    summary: ClassVar[str] = "fused CE + weight x mean unimodal CE through the fusion head"
    matches: ClassVar[str] = "the fusion ignores a modality its encoder has learned"
    targets: ClassVar[tuple[str, ...]] = ("ignored_features",)
    needs_encoders: ClassVar[bool] = False

    weight: float = 0.5

    def loss(self, ctx: FixContext, step: Step) -> torch.Tensor:
        assert step.loss is not None
        unimodal = [F.cross_entropy(step.readout(ctx, [m]), step.labels) for m in ctx.modalities]
        return step.loss + self.weight * torch.stack(unimodal).mean()
