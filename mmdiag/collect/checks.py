"""Checks of what the model returns during the pass, and eval mode with the flags restored."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor

from mmdiag.errors import EvidenceError


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode for the duration; the previous train/eval flags of every submodule are restored."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


def check_finite(logits: Tensor, what: str) -> None:
    bad = ~torch.isfinite(logits).all(dim=1)
    if bad.any():
        raise EvidenceError(
            f"The model produced NaN or Inf logits for {int(bad.sum())} of {logits.shape[0]} samples "
            f"({what}). Check the inputs' scale, the checkpoint, and the mask (`mask=zero|mean|noise`)."
        )


def check_labels(labels: Tensor, n_classes: int, output_kind: str | None = None) -> None:
    if labels.numel() and (int(labels.max()) >= n_classes or int(labels.min()) < 0) and output_kind == "binary":
        raise EvidenceError(
            f"The model returns one logit per sample (a binary classifier), but the labels go from "
            f"{int(labels.min())} to {int(labels.max())}; a binary classifier needs labels 0 and 1. "
            "Check the label column, or return [batch, classes] logits for more classes."
        )
    if labels.numel() and (int(labels.max()) >= n_classes or int(labels.min()) < 0):
        raise EvidenceError(
            f"Labels go up to {int(labels.max())} but the model outputs {n_classes} classes "
            "(labels must be 0..C-1). Check the label column or the model's number of classes."
        )
