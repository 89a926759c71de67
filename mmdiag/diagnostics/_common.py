"""Small maths shared by several diagnostics (they never import each other)."""

from __future__ import annotations

import numpy as np
import torch

from mmdiag.evidence import Evidence, mask_of
from mmdiag.stats import bootstrap_mean_ci, modality_intervals


def subset_correct(ev: Evidence) -> np.ndarray:
    """[2^M, N] 0/1 correctness of the logits of every subset."""
    ev.require("subsets")
    assert ev.subsets is not None
    return (ev.subsets.argmax(-1) == ev.labels[None]).double().numpy()


def subset_logprob(ev: Evidence) -> np.ndarray:
    """[2^M, N] true-class log-probability of every subset's logits."""
    ev.require("subsets")
    assert ev.subsets is not None
    logp = torch.log_softmax(ev.subsets.double(), dim=-1)
    idx = ev.labels[None, :, None].expand(logp.shape[0], -1, 1)
    return logp.gather(-1, idx)[..., 0].numpy()


def only(ev: Evidence, m: str) -> int:
    """Bit mask of the subset with only modality ``m`` present."""
    return mask_of([m], ev.modalities)


def without(ev: Evidence, m: str) -> int:
    """Bit mask of the subset with every modality but ``m`` present."""
    return ev.full_mask & ~mask_of([m], ev.modalities)


def per_modality_ci(ev: Evidence, columns: np.ndarray, n_boot: int, seed: int, level: float) -> dict[str, list[float]]:
    """Bootstrap interval of the mean of each column of ``columns`` [N, M], keyed by modality."""
    return modality_intervals(ev.modalities, bootstrap_mean_ci(columns, n_boot, seed, level))


def per_class_accuracy(correct: np.ndarray, labels: np.ndarray, n_classes: int) -> dict[str, float | None]:
    """Accuracy per class label (None for a class absent from the data)."""
    out: dict[str, float | None] = {}
    for k in range(n_classes):
        sel = labels == k
        out[str(k)] = float(correct[sel].mean()) if sel.any() else None
    return out


def spread(values: dict[str, float]) -> float:
    """max - min over modalities: 0 when every modality scores the same."""
    return float(max(values.values()) - min(values.values()))


def shapley_per_sample(ev: Evidence, values: np.ndarray) -> np.ndarray:
    """[N, M] per-sample Shapley values for per-sample coalition values ``values`` [2^M, N].

    Linear in the values, so the mean over samples is the Shapley value of the mean.
    """
    from mmdiag.stats import shapley_matrix

    return (shapley_matrix(ev.n_modalities) @ values).T
