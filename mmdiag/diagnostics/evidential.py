"""evidential: Dirichlet (subjective-logic) uncertainty of each modality's readout and its Dempster-Shafer fusion."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from mmdiag.diagnostics._common import only, per_modality_ci
from mmdiag.diagnostics._probes import auroc
from mmdiag.diagnostics.base import Diagnostic, register_diagnostic
from mmdiag.errors import ConfigError
from mmdiag.evidence import Evidence
from mmdiag.report import Result
from mmdiag.stats import bootstrap_mean_ci
from mmdiag.validation import Spec

#: floor of 1 - C in the combination (C -> 1 only for overwhelming, fully contradicting evidence).
_CONFLICT_FLOOR = 1e-12


def opinion(logits: np.ndarray, evidence_fn: str = "softplus", exp_clamp: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    """(belief b [N, K], uncertainty u [N]) of Dirichlet evidence e = g(z) (TMC).

    g = softplus, or exp(clamp(z, -exp_clamp, exp_clamp)); alpha = e + 1, S = sum_k alpha_k,
    b = e / S, u = K / S, so sum_k b_k + u = 1.
    """
    z = torch.as_tensor(logits, dtype=torch.float64)
    if evidence_fn == "softplus":
        e = torch.nn.functional.softplus(z)
    elif evidence_fn == "exp":
        e = torch.exp(z.clamp(-exp_clamp, exp_clamp))
    else:
        raise ConfigError(f"evidence_fn must be 'softplus' or 'exp'; found {evidence_fn!r}.")
    e_np = e.numpy()
    s = e_np.sum(axis=1) + e_np.shape[1]
    return e_np / s[:, None], e_np.shape[1] / s


def combine(b1: np.ndarray, u1: np.ndarray, b2: np.ndarray, u2: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dempster's rule for two opinions (TMC's DS_Combin for two views): (b, u, conflict C).

    C = sum_{i != j} b1_i b2_j; b = (b1 b2 + b1 u2 + b2 u1) / (1 - C); u = u1 u2 / (1 - C).
    """
    conflict = b1.sum(axis=1) * b2.sum(axis=1) - (b1 * b2).sum(axis=1)
    norm = np.maximum(1.0 - conflict, _CONFLICT_FLOOR)
    b = (b1 * b2 + b1 * u2[:, None] + b2 * u1[:, None]) / norm[:, None]
    return b, u1 * u2 / norm, conflict


def fuse(beliefs: list[np.ndarray], uncertainties: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fold :func:`combine` left over the modalities: (fused b, fused u, total conflict).

    Total conflict = 1 - prod_j (1 - C_j) over the M - 1 folding steps: the mass Dempster's rule
    discards when all M opinions are combined at once. Dempster's rule is associative and
    commutative, so the fused opinion and the total conflict do not depend on the modality order;
    for M = 2 the total conflict is TMC's C.
    """
    b, u = beliefs[0], uncertainties[0]
    kept = np.ones_like(u)
    for b2, u2 in zip(beliefs[1:], uncertainties[1:]):
        b, u, c = combine(b, u, b2, u2)
        kept = kept * (1.0 - c)
    return b, u, 1.0 - kept


@register_diagnostic
@dataclass(frozen=True)
class Evidential(Diagnostic):
    """Evidential uncertainty: how much Dirichlet evidence modality m's readout carries, and the fused opinion.

    Definition (methods.md §10, TMC; RL-MBA's EFDA, methods.md §17.3, as mmdiag's PROPOSED
    operationalisation). For every modality m the m-only logits z_m (every other modality masked,
    from ``subsets``) are read as Dirichlet evidence e_m = g(z_m), with g = softplus
    (``evidence_fn="softplus"``, TMC's choice) or exp of z clamped to [-``exp_clamp``,
    ``exp_clamp``]. alpha_m = e_m + 1, S_m = sum_k alpha_m,k, belief b_m = e_m / S_m and
    uncertainty u_m = K / S_m (K classes; u = 1 means no evidence at all). The opinions are fused
    with Dempster's rule folded left over the modalities (associative, so order-free): per-step
    conflict C = sum_{i != j} b1_i b2_j, b = (b1 b2 + b1 u2 + b2 u1)/(1 - C), u = u1 u2 / (1 - C);
    the sample's conflict is 1 - prod over steps of (1 - C) (= C for M = 2).

    Per modality: U_m = mean_i u_{m,i} (lower = more evidence). Headline value: mean fused u
    (mean sample difficulty, RL-MBA's EFDA as mmdiag defines it). Intervals: bootstrap of rows.
    Details: mean conflict; driver share = fraction of samples whose least certain modality
    (argmax_m u_{m,i}, ties to the first) is m, i.e. the modality that drives that sample's
    difficulty; ``error_auroc`` = AUROC of fused u for predicting an error of the model's fused
    prediction (0.5 = uninformative; ties count one half), and per modality the AUROC of u_m for
    an error of the m-only readout; ``ds_accuracy`` = accuracy of argmax of the fused belief.
    per_sample columns (all N rows): ``u_<m>``, ``u_fused``, ``conflict``, ``driver``.

    mmdiag's definition: an ordinary checkpoint has no evidential heads, so treating softplus (or
    exp) of its logits as evidence is an uncalibrated approximation (methods.md §10, PROPOSED);
    RL-MBA's paper text was not available, so the difficulty and driver definitions are mmdiag's.
    Any M >= 2: one opinion per modality, combined by the fold.

    Cost: none beyond the M m-only readouts in ``subsets`` (M head calls per sample with cached
    features). Source: TMC (Han et al., ICLR 2021), repository hanmenghan/TMC,
    ``TMC ICLR/model.py`` (DS_Combin); RL-MBA (Zeng et al., CVPR 2026, arXiv 2603.25107),
    abstract only, no code.
    """

    name = "evidential"
    summary = "Dirichlet uncertainty u = K/S of each modality's readout (lower = more evidence) and their DS fusion"
    needs = frozenset({"subsets"})
    higher_is_better = False
    default = True
    headline = "fused u"
    scale = "Dirichlet uncertainty u = K/S in (0, 1]"
    higher_means = "the modality's readout alone carries less evidence (the model is less certain)"
    how_to_read = (
        "The modality with the highest U_m is the one the model is least certain about when it has "
        "only that modality; if it also drives most samples' difficulty, it is the bottleneck for hard "
        "samples. A large mean conflict means the modalities' readouts often disagree confidently."
    )

    evidence_fn: str = "softplus"
    exp_clamp: float = 10.0

    limits = {"evidence_fn": Spec("choice", choices=("softplus", "exp")),
              "exp_clamp": Spec("float", minimum=0.0, above=True)}

    def compute(self, ev: Evidence, prior: Mapping[str, Result] | None = None) -> Result:
        ev.require("subsets")
        assert ev.subsets is not None
        labels = ev.labels.numpy()
        beliefs, uncerts, uni_err = [], [], []
        for m in ev.modalities:
            z = ev.subsets[only(ev, m)].double().numpy()
            b, u = opinion(z, self.evidence_fn, self.exp_clamp)
            beliefs.append(b)
            uncerts.append(u)
            uni_err.append(z.argmax(axis=1) != labels)
        b_fused, u_fused, conflict = fuse(beliefs, uncerts)
        u_all = np.stack(uncerts, axis=1)  # [N, M]
        driver = np.argmax(u_all, axis=1)
        fused_error = ev.logits.argmax(dim=-1).numpy() != labels
        values = {m: float(u_all[:, j].mean()) for j, m in enumerate(ev.modalities)}
        value_ci = bootstrap_mean_ci(u_fused, self.bootstrap, self.seed, self.level)
        conflict_ci = bootstrap_mean_ci(conflict, self.bootstrap, self.seed, self.level)
        names = np.array(ev.modalities, dtype=object)
        return self.result(
            float(u_fused.mean()),
            values,
            ci=per_modality_ci(ev, u_all, self.bootstrap, self.seed, self.level),
            value_ci=[float(value_ci[0]), float(value_ci[1])],
            details={
                "mean_fused_u": float(u_fused.mean()),
                "mean_conflict": float(conflict.mean()),
                "conflict_ci": [float(conflict_ci[0]), float(conflict_ci[1])],
                "driver_share": {m: float((driver == j).mean()) for j, m in enumerate(ev.modalities)},
                "error_auroc": auroc(u_fused, fused_error),
                "unimodal_error_auroc": {m: auroc(u_all[:, j], uni_err[j]) for j, m in enumerate(ev.modalities)},
                "ds_accuracy": float((b_fused.argmax(axis=1) == labels).mean()),
                "evidence": self.evidence_fn,
            },
            per_sample={
                **{f"u_{m}": u_all[:, j].copy() for j, m in enumerate(ev.modalities)},
                "u_fused": u_fused,
                "conflict": conflict,
                "driver": names[driver],
            },
        )
