"""Tabular renderings: the tidy metrics CSV and the optional per-sample CSV."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import pandas as pd

from mmdiag.io import write_atomic
from mmdiag.report import Report, Result


def write_metrics_csv(report: Report, path: Path) -> Path:
    """Tidy CSV: diagnostic, modality, key, value, ci_low, ci_high (one row per headline and modality)."""
    write_atomic(path, report.to_frame().to_csv(index=False))
    return path


def write_per_sample_csv(results: Mapping[str, Result], path: Path) -> Path | None:
    """One row per evaluated sample with every diagnostic's per-sample columns (``<diag>.<column>``)."""
    columns: dict[str, list] = {}
    for name, res in results.items():
        for col, values in (res.per_sample or {}).items():
            columns[f"{name}.{col}"] = list(values)
    if not columns:
        return None
    lengths = {len(v) for v in columns.values()}
    frame = pd.DataFrame({k: pd.Series(v) for k, v in columns.items()}) if len(lengths) > 1 else pd.DataFrame(columns)
    write_atomic(path, frame.to_csv(index=False))
    return path
