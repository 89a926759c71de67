"""``param_grads``: per batch, the cosine of the fused-loss and the m-only-loss gradients on each
encoder's parameters, and the norm of each encoder's mean fused-loss gradient.

An encoder forward and two encoder backwards a row, so it runs on a smaller seeded share than the
feature gradients (``param_grad_fraction``, N/32; at least :data:`PARAM_GRAD_FLOOR`, never more
than the feature-gradient rows), taken as ``param_grad_rows`` (16) rows from each of a seeded set
of batches (:func:`~mmdiag.collect.sampling.pick_slices`): the cosine of a batch is always the
cosine of the gradients of 16 rows, whatever N, the share or the cap (when the share asks for
every batch, as at the floor on a small set, its rows are spread over all of them).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mmdiag.collect.gradients import gradient_rows
from mmdiag.collect.producer import Batch, Producer, register_producer
from mmdiag.collect.sampling import pick_slices, rows_in, subsample_size, take
from mmdiag.errors import EvidenceError
from mmdiag.evidence import Evidence, EvidenceKind, FieldSpec

#: fewest rows of parameter-gradient evidence, whatever the fraction: five batches of 16 rows (an
#: interval that rests on fewer than five batches is reported as too wide to read).
PARAM_GRAD_FLOOR = 80


def _merge_norm(parts: Sequence[Evidence]) -> Tensor | None:
    """The row-weighted mean of the shards' norms (a mean gradient's norm cannot be merged exactly)."""
    if not all(p.param_grad_norm is not None and p.grad_batch_sizes is not None for p in parts):
        return None
    weights = torch.tensor([float(p.grad_batch_sizes.sum()) for p in parts])
    return (torch.stack([p.param_grad_norm for p in parts]) * weights[:, None]).sum(0) / weights.sum()


def parameter_gradients(adapter: Any, inputs: Mapping[str, Tensor], labels: Tensor,
                        generator: torch.Generator | None) -> tuple[Tensor, list[Tensor]]:
    """([M] cosine of the fused-loss and m-only-loss gradients on each encoder's parameters,
    the flattened fused-loss gradient of each encoder)."""
    a = adapter
    with torch.enable_grad():
        z, feats = a.encode(inputs)
        fused = F.cross_entropy(z.float(), labels)
        cos, fused_grads = [], []
        per_modality = {m: [p for p in a.encoder_module(m).parameters() if p.requires_grad] for m in a.modalities}
        for m, params in per_modality.items():
            if not params:
                raise EvidenceError(
                    f"The encoder of {m!r} has no trainable parameters (frozen), so parameter "
                    "gradients are undefined."
                )
        flat = [p for m in a.modalities for p in per_modality[m]]
        all_fused = torch.autograd.grad(fused, flat, retain_graph=True, allow_unused=True)
        only = {m: F.cross_entropy(a.head_forward(inputs, a.masked_features(feats, [m], generator)).float(),
                                   labels) for m in a.modalities}
        if len({id(p) for p in flat}) == len(flat):
            # The m-only loss reaches encoder m alone (every other modality is replaced by a
            # constant baseline), so one backward of their sum gives every encoder its own
            # unimodal gradient: 2 backwards in all instead of M + 1.
            all_only = torch.autograd.grad(sum(only.values()), flat, allow_unused=True)
        else:  # encoders share parameters: one backward per modality keeps them apart
            all_only = tuple(g for m in a.modalities for g in torch.autograd.grad(
                only[m], per_modality[m], retain_graph=True, allow_unused=True))
        start = 0
        for m in a.modalities:
            params = per_modality[m]
            g_f = all_fused[start:start + len(params)]
            g_u = all_only[start:start + len(params)]
            start += len(params)
            vf = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(g_f, params)])
            vu = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(g_u, params)])
            denom = vf.norm() * vu.norm()
            cos.append(float((vf @ vu) / denom) if denom > 0 else 0.0)
            fused_grads.append(vf.detach().cpu())
    return torch.tensor(cos), fused_grads


@register_producer
class ParamGradProducer(Producer):
    kind = EvidenceKind(
        "param_grads", "cosine of fused and unimodal loss gradients on each encoder's parameters (needs encoders)",
        (FieldSpec("grad_cosine", "batch"), FieldSpec("grad_batch_sizes", "batch"),
         FieldSpec("param_grad_norm", "summary", merge=_merge_norm)),
        present="grad_cosine", needs_encoders=True,
    )
    order = 60
    caps = ("max_grad_samples",)

    def __init__(self, run: Any) -> None:
        super().__init__(run)
        self.cos: list[Tensor] = []
        self.sizes: list[int] = []
        self.fused_sum: list[Tensor] | None = None

    def start(self) -> None:
        s = self.run.settings
        rows = min(gradient_rows(self.run), subsample_size(
            self.run.n_total, s.max_grad_samples, s.param_grad_fraction, -(-PARAM_GRAD_FLOOR // self.run.world)))
        self.chosen = pick_slices(self.run.n_total, rows, s.batch_size, s.param_grad_rows, s.seed + 12)
        self.n_rows = rows if self.chosen is None else len(self.chosen)

    def accumulate(self, batch: Batch) -> None:
        r = rows_in(batch.offset, batch.size, self.chosen, self.n_rows)
        if not r.numel():
            return
        cos, fused = parameter_gradients(self.run.adapter, take(batch.inputs, r),
                                         batch.labels[r.to(batch.labels.device)], self.run.gen)
        self.cos.append(cos)
        self.sizes.append(r.numel())
        weighted = [v * r.numel() for v in fused]
        self.fused_sum = weighted if self.fused_sum is None else [x + y for x, y in zip(self.fused_sum, weighted)]

    def finish(self) -> dict[str, Any]:
        if not self.cos or self.fused_sum is None:
            return {}
        seen = max(sum(self.sizes), 1)
        return {"grad_cosine": torch.stack(self.cos), "grad_batch_sizes": torch.tensor(self.sizes),
                "param_grad_norm": torch.stack([g.norm() / seen for g in self.fused_sum])}

    def meta(self) -> dict[str, Any]:
        return {"subsample_rows": {"param_grad": self.n_rows}}
