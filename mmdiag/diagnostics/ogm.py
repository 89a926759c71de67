"""ogm: OGM-GE's discrepancy ratio of unimodal confidence on the true class, per batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from mmdiag.diagnostics._common import only
from mmdiag.diagnostics.base import Diagnostic, register_diagnostic
from mmdiag.errors import ConfigError, EvidenceError
from mmdiag.evidence import Evidence
from mmdiag.report import Result
from mmdiag.stats import bootstrap_indices, modality_intervals, percentile_interval

#: the smallest score a ratio divides by (keeps ratios finite when a readout gives probability 0).
SCORE_FLOOR = 1e-12


def true_class_prob(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """[N] softmax probability of the true class (float64)."""
    p = torch.softmax(logits.detach().double(), dim=-1)
    return p.gather(-1, labels.long()[:, None])[:, 0].numpy()


def batch_scores(conf: np.ndarray, batch_size: int) -> np.ndarray:
    """[n_batches, M] s^m per batch of ``batch_size`` consecutive rows (last batch may be short)."""
    n = conf.shape[0]
    starts = np.arange(0, n, batch_size)
    return np.add.reduceat(conf, starts, axis=0)


def ratios(scores: np.ndarray) -> np.ndarray:
    """rho^m = s^m / min_k s^k over the last axis (denominator floored at 1e-12)."""
    return scores / np.maximum(scores.min(axis=-1, keepdims=True), SCORE_FLOOR)


def coefficients(rho: np.ndarray, alpha: float) -> np.ndarray:
    """OGM's k^m = 1 - tanh(alpha * rho^m) where rho^m > 1, else 1."""
    return np.where(rho > 1.0, 1.0 - np.tanh(alpha * rho), 1.0)


@register_diagnostic
@dataclass(frozen=True)
class OGM(Diagnostic):
    """OGM-GE discrepancy ratio (Peng et al., CVPR 2022): which modality's readout is more confident.

    Definition (methods.md §1): split the evaluated rows, in the evidence's seeded shuffled order,
    into batches B_t of ``batch_size`` consecutive rows (the last batch may be shorter, as in a
    training loop without drop_last). Per batch and modality,
    s^m_t = sum_{i in B_t} softmax(z_{m,i})[y_i], the summed true-class probability of the unimodal
    readout z_m, and rho^m_t = s^m_t / min_k s^k_t. ``per_modality`` is mean_t rho^m_t; the headline
    is max_m of it (1 = balanced; 1.5 = the most confident modality scores 50% more than the least
    confident one on a typical batch).

    Unimodal readout z_m: OGM's head split z_m = W_m h_m + b/M (R1) when the evidence holds it
    (``head_split``, present when the fusion head is one Linear layer over the concatenated pooled
    features; details ``readout: head_split``), otherwise the logits with every modality but m
    masked (R2/R3 as the adapter masks; ``readout: masked``).

    Two modalities: OGM computes rho^a = s^a / s^v and rho^v = 1 / rho^a and slows the modality
    whose ratio exceeds 1. Here rho^m = s^m / min_k s^k, which for the more confident modality is
    exactly the paper's ratio and for the other is 1; ``frac_above_one`` (share of batches with
    rho^m > 1) is the paper's share of batches with rho^a > 1. For M > 2 the same definition is
    BalanceMM's three-modality OGM (ratio to the least confident modality).

    Details: ``coefficient`` = mean over batches of the gradient coefficient OGM-GE would apply,
    k^m = 1 - tanh(alpha * rho^m) when rho^m > 1 else 1 (alpha = 0.1, OGM's default setting;
    CREMA-D used 0.8); ``dataset_ratio`` = the same ratio with one batch holding every row;
    ``confidence`` = mean true-class probability of each readout.

    Intervals: rows are resampled with replacement ``bootstrap`` times and the resampled rows,
    in their drawn order, are cut into batches again; the ratio statistics are recomputed per
    draw (no model calls).

    Cost: forward only; R1 is free with the fused forward, R2 adds M fusion-head calls per sample.
    Source: OGM-GE (Peng et al., CVPR 2022), GeWu-Lab/OGM-GE_CVPR2022 ``main.py`` (score, ratio
    and coefficient block); BalanceMM ``trainer/OGM_trainer.py`` for three modalities.
    """

    name = "ogm"
    summary = "OGM-GE discrepancy ratio: per-batch true-class confidence over the least confident readout (1 = balanced)"
    needs = frozenset({"subsets"})
    higher_is_better = None
    contribution = True
    headline = "max ratio"
    scale = "confidence ratio to the least confident modality's readout (>= 1)"
    higher_means = "the modality's readout is more confident on the true class than the others'"
    how_to_read = (
        "A headline near 1 means no modality's readout is systematically more confident; OGM-GE would "
        "then barely modulate. A modality with mean ratio well above 1 and frac_above_one near 1 "
        "dominates the fused head's confidence and is the one OGM-GE slows down."
    )

    batch_size: int = 64
    alpha: float = 0.1

    def __post_init__(self) -> None:
        if int(self.batch_size) < 1:
            raise ConfigError(f"ogm: batch_size must be at least 1; found {self.batch_size}.")
        if not np.isfinite(self.alpha) or self.alpha < 0:
            raise ConfigError(f"ogm: alpha must be a finite number >= 0; found {self.alpha}.")

    def readouts(self, ev: Evidence) -> tuple[np.ndarray, str]:
        """([N, M] true-class probability of each unimodal readout, readout name)."""
        if ev.head_split is not None:
            split = ev.head_split
            if split.shape[0] != ev.n_modalities or split.shape[1] != ev.n_samples:
                raise EvidenceError(
                    f"ogm: head_split has shape {list(split.shape)}; expected [{ev.n_modalities}, {ev.n_samples}, C]."
                )
            conf = np.stack([true_class_prob(split[j], ev.labels) for j in range(ev.n_modalities)], axis=1)
            return conf, "head_split"
        ev.require("subsets")
        assert ev.subsets is not None
        conf = np.stack([true_class_prob(ev.subsets[only(ev, m)], ev.labels) for m in ev.modalities], axis=1)
        return conf, "masked"

    def _stats(self, conf: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean ratio [M], frac above one [M], mean coefficient [M]) over the batches of ``conf``."""
        rho = ratios(batch_scores(conf, int(self.batch_size)))
        return rho.mean(axis=0), (rho > 1.0).mean(axis=0), coefficients(rho, self.alpha).mean(axis=0)

    def _mean_ratio_draws(self, conf: np.ndarray) -> np.ndarray:
        """[bootstrap, M] mean_t rho^m_t of each resample (rows drawn with replacement, then batched),
        a chunk of resamples at a time."""
        starts = np.arange(0, conf.shape[0], int(self.batch_size))
        columns = np.ascontiguousarray(conf.T)  # one modality at a time: a [chunk, n] gather each
        out = []
        for idx in bootstrap_indices(conf.shape[0], self.bootstrap, self.seed):
            idx = idx.astype(np.intp, copy=False)  # shared indices may be compact: convert once, not per modality
            # [chunk, n_batches, M]; half the time of gathering conf[idx] as one [chunk, n, M] block
            scores = np.stack([np.add.reduceat(col[idx], starts, axis=1) for col in columns], axis=-1)
            out.append(ratios(scores).mean(axis=1))
        return np.concatenate(out, axis=0)

    def compute(self, ev: Evidence, prior: Mapping[str, Result] | None = None) -> Result:
        mods = ev.modalities
        if ev.n_samples == 0:
            raise EvidenceError("ogm: the evidence has no rows.")
        conf, readout = self.readouts(ev)
        mean_rho, frac, coef = self._stats(conf)
        values = {m: float(mean_rho[j]) for j, m in enumerate(mods)}
        data_rho = ratios(conf.sum(axis=0))

        per_mod_ci: dict[str, list[float]] = {}
        value_ci = None
        if self.bootstrap > 0:
            draws = self._mean_ratio_draws(conf)
            per_mod_ci = modality_intervals(mods, percentile_interval(draws, self.level, finite=True))
            value_ci = percentile_interval(draws.max(axis=1), self.level, finite=True).tolist()

        n_batches = -(-ev.n_samples // int(self.batch_size))
        return self.result(
            float(mean_rho.max()),
            values,
            ci=per_mod_ci,
            value_ci=value_ci,
            details={
                "readout": readout,
                "frac_above_one": {m: float(frac[j]) for j, m in enumerate(mods)},
                "coefficient": {m: float(coef[j]) for j, m in enumerate(mods)},
                "dataset_ratio": {m: float(data_rho[j]) for j, m in enumerate(mods)},
                "confidence": {m: float(conf[:, j].mean()) for j, m in enumerate(mods)},
                "dominant": mods[int(np.argmax(mean_rho))] if mean_rho.max() > 1.0 else None,
                "n_batches": int(n_batches),
            },
            per_sample={f"confidence_{m}": conf[:, j].copy() for j, m in enumerate(mods)},
        )
