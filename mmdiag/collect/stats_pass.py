"""The statistics pass: per-element mean and std of each modality (and encoder output).

The ``mean`` and ``noise`` masks need them, and UDML's noise is scaled by each modality's data
std. It reads at most ``stats_samples`` rows, the same rows on every process under torchrun.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader

from mmdiag.errors import EvidenceError
from mmdiag.runtime.mask_stats import estimate_mask_stats


def estimate_stats(run: Any, loader: DataLoader) -> None:
    """Per-element mean/std of inputs (and encoder outputs) for the mean/noise masks and noise scale."""
    sums = estimate_mask_stats(run.adapter, (inputs for _, inputs, _, _ in run.batches(loader, run.settings.stats_samples)),
                               run.settings.stats_samples)
    if sums.rows == 0:
        raise EvidenceError("The dataset is empty: there is nothing to evaluate.")
    run.data_std.update(sums.overall_std())
