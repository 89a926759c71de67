"""``permutations``: correctness and loss with one modality permuted across the samples of a batch
(the perceptual score). K permutations per modality, drawn from the pass's seeded generator."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mmdiag.collect.producer import Batch, Producer, register_producer
from mmdiag.evidence import EvidenceKind, FieldSpec
from mmdiag.tensors import map_tensors


@register_producer
class PermutationsProducer(Producer):
    kind = EvidenceKind(
        "permutations", "correctness and loss with one modality permuted across samples",
        (FieldSpec("perm_correct", "sample", dim=2), FieldSpec("perm_nll", "sample", dim=2)),
        present="perm_correct",
    )
    order = 30

    def __init__(self, run: Any) -> None:
        super().__init__(run)
        self.correct: list[torch.Tensor] = []
        self.nll: list[torch.Tensor] = []

    def accumulate(self, batch: Batch) -> None:
        a, k_count = self.run.adapter, self.run.settings.permutations
        labels, b = batch.labels, batch.size
        pairs = [(k, j) for k in range(k_count) for j in range(len(a.modalities))]
        # the permutations in the order one call at a time drew them
        perms = [torch.randperm(b, generator=self.run.gen).to(labels.device) for _ in pairs]
        if a.mask_at == "feature" and batch.feats is not None:
            shuffled = []
            for (_, j), perm in zip(pairs, perms):
                m = a.modalities[j]
                shuffled.append({**batch.feats, m: map_tensors(lambda t, perm=perm: t[perm], batch.feats[m])})
            logits = self.run.stacked_head.logits(batch.inputs, shuffled)  # stacked when exact
        else:
            logits = [a.call_model({**batch.inputs, a.modalities[j]: batch.inputs[a.modalities[j]][perm]})
                      for (_, j), perm in zip(pairs, perms)]
        correct = torch.zeros(k_count, len(a.modalities), b, dtype=torch.bool)
        nll = torch.zeros(k_count, len(a.modalities), b)
        for (k, j), z in zip(pairs, logits):
            correct[k, j] = (z.argmax(-1) == labels).cpu()
            nll[k, j] = F.cross_entropy(z.float(), labels, reduction="none").cpu()
        self.correct.append(correct)
        self.nll.append(nll)

    def finish(self) -> dict[str, Any]:
        if not self.correct:
            return {}
        return {"perm_correct": torch.cat(self.correct, dim=2), "perm_nll": torch.cat(self.nll, dim=2)}
