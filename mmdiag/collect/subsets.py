"""``subsets``: the logits of every subset of modalities (the others masked) for every row.

With feature-level masking the encoder outputs of the batch are reused for all 2^M subsets, so
each subset costs a fusion-head call, not a full forward.
"""

from __future__ import annotations

from typing import Any

import torch

from mmdiag.collect.checks import check_finite
from mmdiag.collect.producer import Batch, Producer, register_producer
from mmdiag.evidence import EvidenceKind, FieldSpec, members


@register_producer
class SubsetsProducer(Producer):
    kind = EvidenceKind(
        "subsets", "logits for every subset of modalities (masking the others)",
        (FieldSpec("subsets", "sample", dim=1),), present="subsets",
    )
    order = 10

    def __init__(self, run: Any) -> None:
        super().__init__(run)
        self.parts: list[torch.Tensor] = []

    def accumulate(self, batch: Batch) -> None:
        a = self.run.adapter
        full = (1 << len(a.modalities)) - 1
        subsets = [members(mask, a.modalities) for mask in range(full)]
        if a.mask_at == "feature" and batch.feats is not None:
            # the masked feature sets first (the generator's draws in the same order as one call
            # at a time), then the fusion head on all of them, stacked when that is exact
            masked = [a.masked_features(batch.feats, present, self.run.gen) for present in subsets]
            logits = self.run.stacked_head.logits(batch.inputs, masked)
        else:
            logits = [a.subset_logits(batch.inputs, present, batch.feats, self.run.gen) for present in subsets]
        for present, z in zip(subsets, logits):
            check_finite(z, f"modalities present: {'+'.join(present) or 'none'}")
        self.parts.append(torch.stack([*logits, batch.logits]).float().cpu())

    def finish(self) -> dict[str, Any]:
        return {"subsets": torch.cat(self.parts, dim=1)} if self.parts else {}
