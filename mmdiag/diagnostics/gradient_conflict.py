"""gradient_conflict: MMPareto's cosine between fused-loss and unimodal-loss gradients on each encoder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from mmdiag.diagnostics._shares import weighted_mean
from mmdiag.diagnostics.base import Diagnostic, register_diagnostic
from mmdiag.errors import EvidenceError
from mmdiag.evidence import Evidence
from mmdiag.report import Result
from mmdiag.stats import bootstrap_weighted_mean_draws, modality_intervals, percentile_interval

#: at most this many per-batch cosines per modality are copied into the report.
MAX_LISTED_BATCHES = 200


@register_diagnostic
@dataclass(frozen=True)
class GradientConflict(Diagnostic):
    """Conflict between the fused loss and each modality's own loss on that modality's encoder.

    Definition (methods.md §7, MMPareto): on evaluation batch b, with theta_m the parameters of
    encoder m, g_f = grad_theta_m CE(z, y) the gradient of the fused cross-entropy and
    g_u = grad_theta_m CE(z_m, y) that of the m-only readout z_m (the other modalities masked at the
    fusion input), c_{b,m} = <g_f, g_u> / (|g_f| |g_u|). Per modality, the batch-size-weighted mean
    C_m = sum_b n_b c_{b,m} / sum_b n_b. Headline: min_m C_m; negative means some encoder is pulled
    in conflicting directions by the multimodal and the unimodal objective.

    Intervals: bootstrap over batches (weighted by batch size); with fewer than two batches no
    interval is given. Read it on a checkpoint from training: on a converged model the fused
    gradients are mostly noise and the per-batch cosines spread whatever the balance (measured on
    the toy models after 1 epoch, DOMINANT audio/visual 0.93-0.96 / 0.07-0.63; converged, both
    anywhere in -0.6..0.97). Cost: 1 forward, M fusion-head calls and 2 backward passes (M + 1
    when encoders share parameters) per gradient batch, on the parameter-gradient subsample only
    (N/32 rows, at least 80, as 16 rows from each of a seeded set of batches: ``param_grad_fraction``,
    ``param_grad_rows``). Source: MMPareto (GeWu-Lab/MMPareto_ICML2024, ``code/MMPareto.py``).
    """

    name = "gradient_conflict"
    summary = "cosine of fused and unimodal loss gradients on each encoder (negative = conflict, MMPareto)"
    needs = frozenset({"param_grads"})
    higher_is_better = True
    headline = "lowest cos"
    scale = "cosine of the fused and unimodal loss gradients, in [-1, 1]"
    higher_means = "the fused loss trains the encoder the way the modality's own loss would"
    how_to_read = (
        "C_m near 1 means training the fused model also trains encoder m as a unimodal learner would; "
        "C_m <= 0 means the fused loss pushes encoder m away from what would make m good on its own "
        "(MMPareto's conflict), typically on the under-used modality. Details: the fraction of batches "
        "with a negative cosine, the per-batch cosines, and each encoder's share of the fused gradient "
        "norm (a small share means the fused loss barely trains that encoder)."
    )
    argues_for = ("gradient_conflict",)

    def compute(self, ev: Evidence, prior: Mapping[str, Result] | None = None) -> Result:
        ev.require("param_grads")
        assert ev.grad_cosine is not None
        cos = ev.grad_cosine.detach().double().cpu().numpy()
        m_count = ev.n_modalities
        if cos.ndim != 2 or cos.shape[1] != m_count:
            raise EvidenceError(
                f"Gradient-cosine evidence has shape {tuple(cos.shape)}; expected [batches, {m_count}]."
            )
        n_batches = cos.shape[0]
        if ev.grad_batch_sizes is not None:
            sizes = ev.grad_batch_sizes.detach().double().cpu().numpy().reshape(-1)
            if sizes.shape[0] != n_batches:
                raise EvidenceError(
                    f"Gradient evidence has {n_batches} batches of cosines but {sizes.shape[0]} batch sizes."
                )
        else:
            sizes = np.ones(n_batches)
        finite = np.isfinite(cos)
        if not finite.any(axis=0).all():
            missing = [m for j, m in enumerate(ev.modalities) if not finite[:, j].any()]
            raise EvidenceError(
                f"No finite gradient cosine for {', '.join(missing)}: the gradients of that encoder "
                "could not be compared (collect param_grads again; check the encoder is trainable)."
            )
        means = weighted_mean(cos, sizes)
        values = {m: float(means[j]) for j, m in enumerate(ev.modalities)}
        headline = float(means.min())

        if n_batches >= 2:
            draws = bootstrap_weighted_mean_draws(cos, self.bootstrap, self.seed, sizes)
        else:
            draws = np.empty((0, m_count))
        ci = modality_intervals(ev.modalities, percentile_interval(draws, self.level))
        value_ci = percentile_interval(draws.min(axis=1), self.level).tolist()

        negative = {
            m: float((cos[finite[:, j], j] < 0).mean()) for j, m in enumerate(ev.modalities)
        }
        details: dict = {
            "n_batches": int(n_batches),
            "n_rows": int(sizes.sum()),
            "negative_batch_fraction": negative,
            "conflicted": [m for m in ev.modalities if values[m] < 0],
            "most_conflicted": min(ev.modalities, key=lambda m: values[m]),
            "per_batch": {m: [float(v) for v in cos[:MAX_LISTED_BATCHES, j]] for j, m in enumerate(ev.modalities)},
            "batch_sizes": [int(s) for s in sizes[:MAX_LISTED_BATCHES]],
            "per_batch_truncated": bool(n_batches > MAX_LISTED_BATCHES),
        }
        if n_batches < 2:
            details["note"] = "only one gradient batch: no bootstrap interval (raise max_grad_samples or lower batch_size)"
        if ev.param_grad_norm is not None:
            norms = ev.param_grad_norm.detach().double().cpu().numpy().reshape(-1)
            total = float(norms.sum())
            details["param_grad_norm"] = {m: float(norms[j]) for j, m in enumerate(ev.modalities)}
            details["param_grad_norm_share"] = {
                m: (float(norms[j]) / total if total > 0 else 1.0 / m_count) for j, m in enumerate(ev.modalities)
            }
        return self.result(headline, values, ci=ci, value_ci=value_ci, details=details)
