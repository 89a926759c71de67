"""Renderings of a report (pure data in, files out): CSV tables here; plots and HTML in sibling modules."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from mmdiag.render.tables import write_metrics_csv, write_per_sample_csv
from mmdiag.report import Report, Result

__all__ = ["write_metrics_csv", "write_per_sample_csv", "write_outputs"]


def write_outputs(report: Report, out: Path, *, per_sample: Mapping[str, Result] | None = None) -> list[Path]:
    """Write ``report.json`` and ``metrics.csv`` (and ``per_sample.csv`` when asked) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [report.save(out / "report.json"), write_metrics_csv(report, out / "metrics.csv")]
    if per_sample is not None:
        path = write_per_sample_csv(per_sample, out / "per_sample.csv")
        if path is not None:
            paths.append(path)
    return paths
