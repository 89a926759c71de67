"""The statistics pass: per-element mean and std of each modality (and encoder output).

The ``mean`` and ``noise`` masks need them, and UDML's noise is scaled by each modality's data
std. It reads at most ``stats_samples`` rows, the same rows on every process under torchrun.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from mmdiag.adapter import MaskStats
from mmdiag.errors import EvidenceError


def estimate_stats(run: Any, loader: DataLoader) -> None:
    """Per-element mean/std of inputs (and encoder outputs) for the mean/noise masks and noise scale."""
    a = run.adapter
    sums: dict[str, list[Any]] = {}
    count = 0
    feat_sums: dict[str, list[Tensor]] = {}
    with torch.no_grad():
        for _, inputs, _, _ in run.batches(loader, run.settings.stats_samples):
            for m, x in inputs.items():
                xf = x.double()
                acc = sums.setdefault(m, [0.0, 0.0])
                acc[0] = acc[0] + xf.sum(0)
                acc[1] = acc[1] + (xf * xf).sum(0)
            if a.mask_at == "feature" and a.needs_stats():
                _, feats = a.encode(inputs)
                for m, f in feats.items():
                    if isinstance(f, Tensor):
                        ff = f.double()
                        acc2 = feat_sums.setdefault(m, [0.0, 0.0])  # type: ignore[list-item]
                        acc2[0] = acc2[0] + ff.sum(0)
                        acc2[1] = acc2[1] + (ff * ff).sum(0)
            count += next(iter(inputs.values())).shape[0]
    if count == 0:
        raise EvidenceError("The dataset is empty: there is nothing to evaluate.")

    def finish(acc: list[Any]) -> tuple[Tensor, Tensor]:
        mean = acc[0] / count
        var = (acc[1] / count - mean * mean).clamp_min(0.0)
        return mean.float(), var.sqrt().float()

    a.input_stats = MaskStats()
    for m, acc in sums.items():
        mean, std = finish(acc)
        a.input_stats.mean[m], a.input_stats.std[m] = mean, std
        total_mean = acc[0].sum() / (count * mean.numel())
        total_var = acc[1].sum() / (count * mean.numel()) - total_mean**2
        run.data_std[m] = float(total_var.clamp_min(0.0).sqrt())
    a.feature_stats = MaskStats()
    for m, acc in feat_sums.items():
        mean, std = finish(acc)
        a.feature_stats.mean[m], a.feature_stats.std[m] = mean, std
