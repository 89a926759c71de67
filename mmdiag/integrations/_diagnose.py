"""The light analysis the DiagnoseCallbacks run during training, and the numbers they log.

Shared by the Lightning and Hugging Face callbacks so that both log the same keys with the same values.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

from mmdiag.api import analyze
from mmdiag.collect import CollectSettings
from mmdiag.errors import ConfigError
from mmdiag.report import Report

__all__ = ["DEFAULT_DIAGNOSTICS", "SEVERITY", "LightAnalysis", "report_metrics"]

#: ``verdict.severity`` as a number for loggers
SEVERITY = {"none": 0, "mild": 1, "strong": 2}
#: what the callbacks run by default: cheap, and what a dashboard needs to see a dominance appear
DEFAULT_DIAGNOSTICS = ("unimodal", "shapley", "balance")


def report_metrics(report: Report, diagnostics: Sequence[str]) -> dict[str, float]:
    """The logged numbers of ``report``, named as gate keys.

    ``<diagnostic>.<modality>`` for each per-modality value of the ``diagnostics``; ``<diagnostic>`` for
    the headline of one without per-modality values, and of ``balance``; ``verdict.severity`` as
    :data:`SEVERITY`. Values that are not finite are left out.
    """
    out: dict[str, float] = {}
    for name in diagnostics:
        result = report.diagnostics.get(name)
        if result is None:
            continue
        per = {m: v for m, v in (result.per_modality or {}).items() if v is not None}
        out.update({f"{name}.{m}": float(v) for m, v in per.items()})
        if (not per or name == "balance") and result.value is not None:
            out[name] = float(result.value)
    out["verdict.severity"] = float(SEVERITY.get(report.verdict.severity, 0))
    return {k: v for k, v in out.items() if math.isfinite(v)}


class LightAnalysis:
    """``mmdiag.analyze(model, data, only=diagnostics, bootstrap=bootstrap, seed=seed)`` run during
    training: in eval mode, with gradients enabled where the framework's validation disabled them (the
    gradient evidence needs them), the model's training mode restored afterwards.

    The collection settings (device from the first call) are kept between calls so every epoch is
    measured the same way.
    """

    def __init__(self, data: Any, diagnostics: Sequence[str] = DEFAULT_DIAGNOSTICS,
                 modalities: Sequence[str] | None = None, *, bootstrap: int = 50, seed: int = 0,
                 **analyze_kwargs: Any) -> None:
        if not diagnostics:
            raise ConfigError("DiagnoseCallback needs at least one diagnostic in `diagnostics`.")
        self.data, self.diagnostics = data, tuple(diagnostics)
        self.modalities = tuple(modalities) if modalities else None
        self.bootstrap, self.seed = int(bootstrap), int(seed)
        self.analyze_kwargs = dict(analyze_kwargs)

    def __call__(self, model: nn.Module, device: torch.device) -> Report:
        was_training = model.training
        settings = self.analyze_kwargs.pop("collect_settings", None) or CollectSettings(device=str(device),
                                                                                        seed=self.seed)
        try:
            with torch.inference_mode(False), torch.enable_grad():
                report = analyze(model, self.data, modalities=self.modalities, only=list(self.diagnostics),
                                 bootstrap=self.bootstrap, seed=self.seed, collect_settings=settings,
                                 **self.analyze_kwargs)
        finally:
            model.train(was_training)
            self.analyze_kwargs["collect_settings"] = settings
        assert isinstance(report, Report)
        return report

    def metrics(self, report: Report) -> dict[str, float]:
        return report_metrics(report, self.diagnostics)
