"""``grad_x_act``: per-sample |gradient x activation| at each encoder output, for the centred
true-class logit margin (``grad_x_act``) and the fused cross-entropy (``grad_x_loss``).

Taken on a seeded subsample of N/8 rows (``grad_fraction``; at least :data:`GRAD_FLOOR`, at most
``max_grad_samples``) with fusion-head backwards on the main pass's cached encoder outputs, so no
encoder runs again.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from mmdiag.collect.producer import Batch, Producer, register_producer
from mmdiag.collect.sampling import pick, rows_in, subsample_size, take
from mmdiag.evidence import EvidenceKind, FieldSpec
from mmdiag.stats import true_class_margin
from mmdiag.tensors import map_tensors, tensor_leaves

#: fewest rows of feature-gradient evidence, whatever the fraction.
GRAD_FLOOR = 128


def gradient_rows(run: Any) -> int:
    """Rows of the feature-gradient subsample (under torchrun, this process's share)."""
    s = run.settings
    return subsample_size(run.n_total, s.max_grad_samples, s.grad_fraction, -(-GRAD_FLOOR // run.world))


def feature_gradients(adapter: Any, inputs: Mapping[str, Tensor], labels: Tensor,
                      feats: Mapping[str, Any] | None = None) -> dict[str, Tensor]:
    """[b, M] gradient x activation of each encoder output for the margin and the loss targets.

    Per row, |sum over the elements of modality m's encoder output of (d target / d h) * h|: with a
    structured output (a tuple or dict, as Hugging Face encoders return) the sum runs over every
    tensor of it, so a head that reads only one of them (the pooled output, say) gets that one's
    term, not a zero from a tensor it never reads.

    ``feats``: the encoder outputs of these rows from the main pass, when it has them (saves an
    encoder forward: only the fusion head runs, forward and backward).
    """
    a = adapter
    out: dict[str, Tensor] = {}
    with torch.enable_grad():
        if feats is None:
            with torch.no_grad():
                _, feats = a.encode(inputs)
        leaves = {m: map_tensors(lambda t: t.detach().float().requires_grad_(True), feats[m]) for m in a.modalities}
        z = a.head_forward(inputs, leaves).float()
        # every tensor of each output that carries one row per sample (a head may read any of them)
        per_modality = [[t for t in tensor_leaves(leaves[m]) if t.dim() and t.shape[0] == z.shape[0]]
                        for m in a.modalities]
        tensors = [t for ts in per_modality for t in ts]
        # Two first-order targets, both head-only backwards on the cached features: the centred
        # true-class logit margin z_y - mean_k z_k (mdi's default: it does not vanish on
        # confidently correct samples) and the fused cross-entropy (the literal proposal).
        margin = true_class_margin(z, labels).sum()
        loss = F.cross_entropy(z, labels, reduction="sum")
        for key, target in (("grad_x_act", margin), ("grad_x_loss", loss)):
            grads = torch.autograd.grad(target, tensors, allow_unused=True, retain_graph=key == "grad_x_act")
            terms = [torch.zeros(h.shape[0], device=h.device) if g is None else (g * h).flatten(1).sum(1)
                     for h, g in zip(tensors, grads)]
            gxa, start = [], 0
            for ts in per_modality:  # a modality's terms, summed over the tensors of its output
                part = terms[start:start + len(ts)]
                start += len(ts)
                gxa.append(torch.stack(part).sum(0).abs() if part else torch.zeros(z.shape[0], device=z.device))
            out[key] = torch.stack(gxa, dim=1).detach().cpu()
    return out


@register_producer
class GradientProducer(Producer):
    kind = EvidenceKind(
        "grad_x_act",
        "per-sample |gradient x activation| of the true-class logit margin and of the fused loss "
        "at each encoder output (needs encoders)",
        (FieldSpec("grad_x_act", "subsample", rows="grad_rows"),
         FieldSpec("grad_x_loss", "subsample", rows="grad_rows"), FieldSpec("grad_rows", "rows")),
        present="grad_x_act", needs_encoders=True,
    )
    order = 50
    caps = ("max_grad_samples",)

    def __init__(self, run: Any) -> None:
        super().__init__(run)
        self.act: list[Tensor] = []
        self.loss: list[Tensor] = []
        self.rows: list[Tensor] = []

    def start(self) -> None:
        self.n_rows = gradient_rows(self.run)
        self.chosen = pick(self.run.n_total, self.n_rows, self.run.settings.seed + 12)

    def accumulate(self, batch: Batch) -> None:
        r = rows_in(batch.offset, batch.size, self.chosen, self.n_rows)
        if not r.numel():
            return
        a = self.run.adapter
        sub_feats = None if batch.feats is None else {m: take(batch.feats[m], r) for m in a.modalities}
        g = feature_gradients(a, take(batch.inputs, r), batch.labels[r.to(batch.labels.device)], sub_feats)
        self.act.append(g["grad_x_act"])
        self.loss.append(g["grad_x_loss"])
        self.rows.append(r + batch.offset)

    def finish(self) -> dict[str, Any]:
        if not self.rows:
            return {}
        return {"grad_x_act": torch.cat(self.act), "grad_x_loss": torch.cat(self.loss), "grad_rows": torch.cat(self.rows)}

    def meta(self) -> dict[str, Any]:
        return {"subsample_rows": {"grad": self.n_rows}}
