"""Validation during training: fused loss and accuracy, and each modality's unimodal accuracy."""

from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.nn.functional as F

from mmdiag.adapter import ModelAdapter, unwrap
from mmdiag.runtime.batching import Batches, as_dataset
from mmdiag.runtime.device import resolve_device
from mmdiag.runtime.mask_stats import estimate_mask_stats

#: rows that estimate the ``mean`` / ``noise`` mask statistics (the analyses' ``stats_samples``)
STATS_ROWS = 2048

__all__ = ["evaluate", "leading_inputs"]


def leading_inputs(batches: Batches, batch_size: int, rows: int) -> Iterator[dict[str, torch.Tensor]]:
    """The inputs of the first ``rows`` rows of ``batches``, in dataset order, ``batch_size`` at a time."""
    n = min(len(batches), rows)
    for start in range(0, n, batch_size):
        yield batches.get(range(start, min(n, start + batch_size)))[0]


def evaluate(adapter: ModelAdapter, data: Any, *, batch_size: int = 256, device: str | torch.device = "cpu",
             seed: int = 0) -> dict[str, float]:
    """Validation loss and accuracy with every modality, and each modality's unimodal accuracy.

    Unimodal accuracy of ``m`` is the accuracy with every other modality masked the way the
    adapter masks (feature level from cached encoder outputs when encoders are known, input level
    otherwise). With a ``mean`` or ``noise`` mask the mask's statistics are estimated first on the
    first :data:`STATS_ROWS` rows of ``data`` (as an analysis does on the data it evaluates). Runs
    in eval mode without gradients and restores the model's mode; it draws no numbers from the
    global generators (a noise mask uses its own seeded generator).
    """
    dev = resolve_device(device)
    dataset = as_dataset(data, adapter.modalities, what="validation data", loaders=False)
    batches = Batches(dataset, adapter.modalities, dev)
    if adapter.needs_stats():
        estimate_mask_stats(adapter, leading_inputs(batches, batch_size, STATS_ROWS), STATS_ROWS)
    model = unwrap(adapter.model)
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    n = len(batches)
    loss_sum, correct = 0.0, 0
    uni = {m: 0 for m in adapter.modalities}
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                inputs, labels = batches.get(range(start, min(n, start + batch_size)))
                if adapter.mask_at == "feature" and adapter.has_encoders:
                    logits, feats = adapter.encode(inputs)
                else:
                    logits, feats = adapter.call_model(inputs), None
                loss_sum += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
                correct += int((logits.argmax(1) == labels).sum())
                for m in adapter.modalities:
                    sub = adapter.subset_logits(inputs, [m], features=feats, generator=gen)
                    uni[m] += int((sub.argmax(1) == labels).sum())
    finally:
        model.train(was_training)
    out = {"val_loss": loss_sum / n, "val_accuracy": correct / n}
    out.update({f"unimodal_acc.{m}": uni[m] / n for m in adapter.modalities})
    return out
