"""``features``: pooled encoder features of a seeded random subsample of at most
``max_feature_samples`` rows (probes, prototypes, the MDI entropy, evidential readouts)."""

from __future__ import annotations

from typing import Any

import torch

from mmdiag.collect.producer import Batch, Producer, register_producer
from mmdiag.collect.sampling import pick, rows_in, take
from mmdiag.evidence import EvidenceKind, FieldSpec


@register_producer
class FeaturesProducer(Producer):
    kind = EvidenceKind(
        "features", "pooled encoder features of a random subsample (needs encoders)",
        (FieldSpec("features", "subsample", rows="feature_rows", per_modality=True),
         FieldSpec("feature_rows", "rows")),
        present="features", needs_encoders=True,
    )
    order = 40
    caps = ("max_feature_samples",)

    def __init__(self, run: Any) -> None:
        super().__init__(run)
        self.parts: dict[str, list[torch.Tensor]] = {m: [] for m in run.adapter.modalities}
        self.rows: list[torch.Tensor] = []

    def start(self) -> None:
        s = self.run.settings
        self.chosen = pick(self.run.n_total, s.max_feature_samples, s.seed + 11)

    def accumulate(self, batch: Batch) -> None:
        if batch.feats is None:
            return
        a = self.run.adapter
        r = rows_in(batch.offset, batch.size, self.chosen, self.run.settings.max_feature_samples)
        if r.numel():
            for m in a.modalities:
                self.parts[m].append(a.pooled(m, take(batch.feats[m], r)).float().cpu())
            self.rows.append(r + batch.offset)

    def finish(self) -> dict[str, Any]:
        if not self.rows:
            return {}
        return {"features": {m: torch.cat(v) for m, v in self.parts.items()}, "feature_rows": torch.cat(self.rows)}
