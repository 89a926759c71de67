"""``head_split``: OGM's per-modality readouts of a linear concat head, z_m = W_m h_m + b / M.

Filled whenever the fusion head is one ``nn.Linear`` over the concatenated pooled encoder
features (checked on a few rows before the pass); the ``ogm`` diagnostic uses it when present.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from mmdiag.collect.producer import Batch, Producer, register_producer
from mmdiag.evidence import EvidenceKind, FieldSpec
from mmdiag.detect import unwrap
from mmdiag.tensors import as_class_logits


def concat_head(adapter: Any, sample: Mapping[str, Tensor]) -> tuple[torch.nn.Linear, list[tuple[int, int]]] | str:
    """(head, column block of each modality) when the fusion head is one ``nn.Linear`` fed with
    exactly the concatenated pooled encoder features (checked on ``sample``); else the reason why not."""
    a = adapter
    if not a.encoders or a.head is None:
        return "no fusion head is known"
    head = dict(unwrap(a.model).named_modules())[a.head]
    if not isinstance(head, torch.nn.Linear):
        return "the fusion head is not one Linear layer"
    seen: dict[str, Tensor] = {}
    handle = head.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0]))
    try:
        with torch.no_grad():
            _, feats = a.encode(sample)
    finally:
        handle.remove()
    if "x" not in seen:
        return "the fusion head did not run"
    pooled = [a.pooled(m, feats[m]) for m in a.modalities]
    cat = torch.cat(pooled, dim=1)
    if not (seen["x"].shape == cat.shape and torch.allclose(seen["x"], cat, atol=1e-5)):
        return "the fusion head's input is not the concatenated pooled features"
    cols, start = [], 0
    for p in pooled:
        cols.append((start, start + p.shape[1]))
        start += p.shape[1]
    return head, cols


@register_producer
class HeadSplitProducer(Producer):
    kind = EvidenceKind(
        "head_split", "per-modality readouts of a linear concat fusion head (OGM)",
        (FieldSpec("head_split", "sample", dim=1),), present="head_split", needs_encoders=True,
        requestable=False,
    )
    order = 20
    auto = True

    def __init__(self, run: Any) -> None:
        super().__init__(run)
        self.cols: list[tuple[int, int]] | None = None
        self.head: torch.nn.Linear | None = None
        self.parts: list[Tensor] = []

    def prepare(self, sample: Mapping[str, Tensor]) -> str | None:
        """Detect a Linear head fed with exactly the concatenated pooled features."""
        found = concat_head(self.run.adapter, sample)
        if isinstance(found, str):
            return found
        self.head, self.cols = found
        return None

    def readouts(self, feats: Mapping[str, Any]) -> Tensor:
        """[M, B, C] readouts z_m = W_m h_m + b / M (a binary head's single logit as [0, z_m])."""
        a = self.run.adapter
        assert self.head is not None
        w, b = self.head.weight, self.head.bias
        out = []
        for (lo, hi), m in zip(self.cols or [], a.modalities):
            z = a.pooled(m, feats[m]) @ w[:, lo:hi].T
            if b is not None:
                z = z + b / len(a.modalities)
            if a.output_kind == "binary":  # one logit: readouts [0, z_m] add up to [0, z]
                z = as_class_logits(z, z.shape[0])[0]
            out.append(z)
        return torch.stack(out)

    def accumulate(self, batch: Batch) -> None:
        if self.cols is not None and batch.feats is not None:
            self.parts.append(self.readouts(batch.feats).float().cpu())

    def finish(self) -> dict[str, Any]:
        return {"head_split": torch.cat(self.parts, dim=1)} if self.parts else {}

    def meta(self) -> dict[str, Any]:
        return {"head_split": self.cols is not None}
