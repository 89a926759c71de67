"""The data statistics the ``mean`` and ``noise`` masks replace an absent modality with.

A ``mean`` mask puts each modality's per-element mean in place of the absent modality, a ``noise``
mask a draw from N(mean, std^2) per element; at the feature level these are the statistics of the
encoder outputs. An adapter without them refuses to mask (see ``ModelAdapter._baseline_like``), so
every path that masks with these kinds estimates them first on the data it evaluates or trains on.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

from mmdiag.adapter import MaskStats, ModelAdapter
from mmdiag.tensors import leaf_key, map_leaves_indexed

__all__ = ["MomentSums", "estimate_mask_stats"]


class MomentSums:
    """Running per-element sums of x and x^2 (float64) of each modality over the rows added."""

    def __init__(self) -> None:
        self.sums: dict[str, list[Tensor]] = {}
        self.rows = 0

    def add(self, values: Mapping[str, Any], rows: int) -> None:
        """Add one batch (``rows`` rows) of per-modality values: a tensor is kept under its modality,
        each tensor of a structured value (an encoder returning a tuple or a dict) under
        :func:`~mmdiag.tensors.leaf_key` (``name[i]``)."""
        for m, x in values.items():
            map_leaves_indexed(lambda t, i, m=m: self._add(leaf_key(m, i), t), x)
        self.rows += rows

    def _add(self, key: str, x: Tensor) -> None:
        xf = x.detach().double()
        acc = self.sums.setdefault(key, [torch.zeros_like(xf[0]), torch.zeros_like(xf[0])])
        acc[0] += xf.sum(0)
        acc[1] += (xf * xf).sum(0)

    def stats(self) -> MaskStats:
        """Per-element mean and (population) standard deviation of each modality, as float32."""
        out = MaskStats()
        for m, (total, squares) in self.sums.items():
            mean = total / self.rows
            out.mean[m] = mean.float()
            out.std[m] = (squares / self.rows - mean * mean).clamp_min(0.0).sqrt().float()
        return out

    def overall_std(self) -> dict[str, float]:
        """The std of all of each modality's values together (one number per modality)."""
        out = {}
        for m, (total, squares) in self.sums.items():
            count = self.rows * total.numel()
            mean = total.sum() / count
            out[m] = float((squares.sum() / count - mean**2).clamp_min(0.0).sqrt())
        return out


def estimate_mask_stats(adapter: ModelAdapter, batches: Iterable[Mapping[str, Tensor]], max_rows: int) -> MomentSums:
    """Set ``adapter.input_stats`` (and, with feature-level masking, ``adapter.feature_stats``) from
    the first ``max_rows`` rows of ``batches`` (whole batches; inputs as dicts of tensors).

    Runs without gradients and in eval mode (restored afterwards), so the encoder outputs are the
    ones the masked evaluation replaces. Returns the sums of the inputs (``rows`` = the number of
    rows used; 0 leaves the adapter as it was).
    """
    inputs_sums, feature_sums = MomentSums(), MomentSums()
    features = adapter.mask_at == "feature" and adapter.has_encoders and adapter.needs_stats()
    model = adapter.model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for inputs in batches:
                if inputs_sums.rows >= max_rows:
                    break
                rows = int(next(iter(inputs.values())).shape[0])
                inputs_sums.add(inputs, rows)
                if features:
                    feature_sums.add(adapter.encode(inputs)[1], rows)
    finally:
        model.train(was_training)
    if inputs_sums.rows:
        adapter.input_stats = inputs_sums.stats()
        adapter.feature_stats = feature_sums.stats() if features else MaskStats()
    return inputs_sums
