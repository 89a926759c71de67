"""Renderings of a report (pure data in, files out).

``write_outputs`` writes any of: ``report.json`` (the canonical artifact), ``metrics.csv`` (tidy
table), ``report.html`` (one self-contained page), ``report.md`` (Markdown) and ``plots/*.png``.
Tables live in :mod:`mmdiag.render.tables`, plots in :mod:`mmdiag.render.plots` (matplotlib, Agg
canvas, imported only when a plot is drawn; the figures each diagnostic declares are registered by
name in :mod:`mmdiag.render.figures`, training figures in :mod:`mmdiag.render.history`), the page in
:mod:`mmdiag.render.html` and :mod:`mmdiag.render.markdown`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

from mmdiag.errors import ConfigError
from mmdiag.registry import closest
from mmdiag.render.tables import write_metrics_csv, write_per_sample_csv
from mmdiag.report import Report, Result

__all__ = ["FORMATS", "DEFAULT_FORMATS", "parse_formats", "write_metrics_csv", "write_per_sample_csv", "write_outputs"]

#: every output format: name -> what it writes
FORMATS = {
    "json": "report.json",
    "csv": "metrics.csv (and per_sample.csv on request)",
    "html": "report.html (self-contained, plots embedded)",
    "md": "report.md",
    "png": "plots/*.png",
}
DEFAULT_FORMATS = ("json", "csv", "html", "png")


def parse_formats(formats: str | Iterable[str] | None) -> tuple[str, ...]:
    """``"html,md"`` or ``["html", "md"]`` -> validated names; ConfigError naming the closest for unknown ones."""
    if formats is None:
        return DEFAULT_FORMATS
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    out: list[str] = []
    for item in items:
        name = str(item).strip().lower()
        if not name:
            continue
        name = {"markdown": "md", "plots": "png", "png/plots": "png"}.get(name, name)
        if name not in FORMATS:
            near = closest(name, list(FORMATS))
            hint = f" Did you mean {near!r}?" if near else ""
            raise ConfigError(f"Unknown output format {item!r}; formats are {', '.join(FORMATS)}.{hint}")
        if name not in out:
            out.append(name)
    if not out:
        raise ConfigError(f"No output format given; choose from {', '.join(FORMATS)}.")
    return tuple(out)


def write_outputs(report: Report, out: Path, *, per_sample: Mapping[str, Result] | None = None,
                  formats: str | Iterable[str] | None = DEFAULT_FORMATS, dpi: int | None = None) -> list[Path]:
    """Write the report's renderings into ``out`` and return the files written.

    Args:
        report: the report.
        out: the output folder (created).
        per_sample: results whose per-sample columns go to ``per_sample.csv`` (with ``csv``).
        formats: any of ``json``, ``csv``, ``html``, ``md``, ``png`` (default: json, csv, html, png).
        dpi: resolution of the plots (default :data:`mmdiag.render.canvas.DEFAULT_DPI`).
    """
    chosen = parse_formats(formats)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    if "json" in chosen:
        paths.append(report.save(out / "report.json"))
    if "csv" in chosen:
        paths.append(write_metrics_csv(report, out / "metrics.csv"))
        if per_sample is not None:
            path = write_per_sample_csv(per_sample, out / "per_sample.csv")
            if path is not None:
                paths.append(path)
    if "md" in chosen:
        from mmdiag.render.markdown import write_markdown

        paths.append(write_markdown(report, out / "report.md"))
    if "png" in chosen or "html" in chosen:
        from mmdiag.render.plots import report_plots

        plots = report_plots(report, out / "plots" if "png" in chosen else None, dpi=dpi)
        paths.extend(plots.paths.values())
        if "html" in chosen:
            from mmdiag.render.html import write_html

            paths.append(write_html(report, out / "report.html", plots))
    return paths
