"""The numbers a leaderboard row and a race rung are ranked by, measured on one dataset.

:func:`score_model` runs a small analysis (the ``unimodal`` and ``balance`` diagnostics, and
``deployment`` when the analysis has a deployment distribution) through the same
:func:`~mmdiag.api.analyze_with` as every report, so each number means exactly what it means in a
report:

* ``accuracy``: fused accuracy, the mean over rows of 1[argmax z_i = y_i] with every modality present,
  with its 95% percentile bootstrap interval over the rows (``analysis.bootstrap`` resamples);
* ``unimodal[m]``: accuracy with only ``m`` present (the others masked as the adapter masks);
  ``weakest`` is the smallest of them;
* ``balance``: the ``balance`` diagnostic's headline, the normalised entropy of the modalities'
  contribution shares (1 = even, 0 = one modality does everything);
* ``deployment``: the ``deployment`` diagnostic's headline, the expected accuracy when modalities go
  missing as the distribution says (None without one).

:func:`paired_separation` is the test behind a leaderboard's ``separated`` column.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from torch import nn

from mmdiag.api import analyze_with
from mmdiag.specs import AdapterSpec, AnalysisSpec
from mmdiag.stats import bootstrap_mean_ci

__all__ = ["OBJECTIVES", "Scores", "has_deployment", "paired_separation", "score_model"]

#: What a leaderboard can be ranked by and a race can select by (see :func:`Scores.objective`).
OBJECTIVES = ("fused", "weakest", "balance", "deployment")


@dataclass(frozen=True)
class Scores:
    """The ranked numbers of one model on one dataset (see the module doc); ``correct`` holds the
    per-row 0/1 correctness of the fused prediction, in the data's row order."""

    accuracy: float
    interval: tuple[float, float] | None
    unimodal: dict[str, float]
    balance: float | None
    deployment: float | None
    correct: np.ndarray
    notes: tuple[str, ...] = ()

    @property
    def weakest(self) -> float:
        """The smallest unimodal accuracy."""
        return min(self.unimodal.values())

    def objective(self, name: str) -> float:
        """The value ``name`` (one of :data:`OBJECTIVES`) ranks by; higher is better; NaN when missing."""
        value = {"fused": self.accuracy, "weakest": self.weakest, "balance": self.balance,
                 "deployment": self.deployment}[name]
        return float("nan") if value is None else float(value)


def has_deployment(analysis: AnalysisSpec) -> bool:
    """Whether ``analysis`` carries a deployment distribution (``missing`` or ``combinations``)."""
    params = (analysis.params or {}).get("deployment") or {}
    return any(params.get(k) is not None for k in ("missing", "combinations"))


def _small_analysis(analysis: AnalysisSpec) -> AnalysisSpec:
    """``analysis`` reduced to the diagnostics a score needs; their own intervals are not needed
    (the accuracy interval is computed here), so they run without resampling."""
    only = ("unimodal", "balance") + (("deployment",) if has_deployment(analysis) else ())
    return dataclasses.replace(analysis, only=only, skip=None, bootstrap=0)


def score_model(model: nn.Module, data: Any, adapter: AdapterSpec, analysis: AnalysisSpec,
                settings: Mapping[str, Any] | None = None) -> Scores:
    """The :class:`Scores` of ``model`` on ``data`` (rows in the data's order)."""
    report, ev = analyze_with(model, data, adapter, _small_analysis(analysis), settings=settings,
                              return_evidence=True)
    correct = ev.correct().numpy().astype(np.float64)
    interval = None
    if analysis.bootstrap > 0:
        low, high = bootstrap_mean_ci(correct, analysis.bootstrap, analysis.seed)
        interval = (float(low), float(high))
    uni = report.diagnostics.get("unimodal")
    if uni is None or uni.value is None:
        _raise_failed(report, "unimodal")
    bal = report.diagnostics.get("balance")
    dep = report.diagnostics.get("deployment")
    return Scores(
        accuracy=float(correct.mean()), interval=interval,
        unimodal={m: float(uni.per_modality[m]) for m in report.modalities},  # type: ignore[union-attr]
        balance=None if bal is None or bal.value is None else float(bal.value),
        deployment=None if dep is None or dep.value is None else float(dep.value),
        correct=correct, notes=tuple(report.notes),
    )


def _raise_failed(report: Any, name: str) -> None:
    """A score cannot be given without diagnostic ``name``: say why it failed."""
    from mmdiag.errors import EvidenceError

    why = "; ".join(f.error for f in report.failures if f.diagnostic == name)
    raise EvidenceError(f"The {name} diagnostic gave no value, so the model cannot be scored"
                        + (f" ({why})." if why else "."))


def paired_separation(correct: np.ndarray, reference: np.ndarray, n_boot: int, seed: int
                      ) -> tuple[float, tuple[float, float] | None, bool | None]:
    """Paired bootstrap of an accuracy difference on the same rows.

    With d_i = c_i - r_i (the per-row correctness of the model minus the reference's), the
    difference is mean(d); its 95% interval is the percentile interval of the mean of d over
    ``n_boot`` row resamples (the same rows drawn for both models, which removes the row-to-row
    variation both share). Returns (difference, interval, separated), separated being True when
    the interval excludes 0; interval and separated are None without resamples.
    """
    d = np.asarray(correct, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    if n_boot <= 0 or d.size == 0:
        return float(d.mean()) if d.size else float("nan"), None, None
    low, high = (float(x) for x in bootstrap_mean_ci(d, n_boot, seed))
    return float(d.mean()), (low, high), bool(low > 0 or high < 0)
