"""Matplotlib plots of a report (PNG), with one fixed colour per modality across every figure.

Figures are built on :class:`matplotlib.figure.Figure` with the Agg canvas directly, never through
``pyplot``, so rendering neither needs a display nor changes the backend of a user's session.
Colours follow the Okabe-Ito palette (safe for the common colour-vision deficiencies), assigned in
the report's modality order. A plot whose data is missing or malformed is skipped with a reason;
it never breaks the rest of the report.

The primitives live in :mod:`mmdiag.render.canvas`, the report's figures (registered by name, listed
by each diagnostic's ``figures``) in :mod:`mmdiag.render.figures`, the training and comparison
figures in :mod:`mmdiag.render.history`; this module draws a report's set and keeps the public names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from mmdiag.diagnostics.base import declared
from mmdiag.io import write_atomic
from mmdiag.render.canvas import (DEFAULT_DPI, EXTRA, HEAT_CMAP, NEUTRAL, OKABE_ITO, figure_png, modality_colors,
                                  new_figure, save_figure, styled)
from mmdiag.render.figures import (FIGURES, FigureSpec, fig_combinations, fig_contributions, fig_modality_bars,
                                   fig_per_class, fig_perceptual, fig_udml_calibration, modalities_of,
                                   register_figure)
from mmdiag.render.history import plot_before_after, plot_training_dynamics
from mmdiag.report import Report

__all__ = [
    "DEFAULT_DPI", "EXTRA", "FIGURES", "FigureSpec", "HEAT_CMAP", "NEUTRAL", "OKABE_ITO", "PlotSet",
    "fig_combinations", "fig_contributions", "fig_modality_bars", "fig_per_class", "fig_perceptual",
    "fig_udml_calibration", "figure_png", "modality_colors", "new_figure", "plot_before_after",
    "plot_training_dynamics", "register_figure", "report_plots", "save_figure",
]


@dataclass
class PlotSet:
    """Rendered plots of a report.

    Attributes:
        images: plot key -> PNG bytes, in display order.
        titles: plot key -> caption.
        by_diagnostic: diagnostic -> plot keys that belong to its section (``_overview`` for figures
            spanning several diagnostics).
        paths: plot key -> file written (when an output folder was given).
        skipped: plot key -> why it was not drawn.
    """

    images: dict[str, bytes] = field(default_factory=dict)
    titles: dict[str, str] = field(default_factory=dict)
    by_diagnostic: dict[str, list[str]] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def _plan(report: Report, mods: list[str], colors: Mapping[str, str]) -> list[tuple[str, str, str, Any]]:
    """(key, owner, caption, draw) of every plot: the overview, then each result's declared figures."""
    plan: list[tuple[str, str, str, Any]] = [
        ("contributions", "_overview", "Contribution measures side by side", lambda: fig_contributions(report, colors))]
    for name, res in report.diagnostics.items():
        cls = declared(name)
        for figure in cls.figures if cls is not None else ("modality_bars",):
            if figure not in FIGURES:
                plan.append((f"{name}_{figure}", name, figure, None))
                continue
            spec = FIGURES.get(figure)
            plan.append((spec.key.format(name=name), name, spec.title.format(name=name),
                         lambda res=res, spec=spec: spec.draw(res, mods, colors)))
    return plan


def report_plots(report: Report, out_dir: str | Path | None = None, dpi: int | None = None) -> PlotSet:
    """Draw every plot the report has data for; write ``out_dir/<key>.png`` when a folder is given.

    The figures of a result are those its diagnostic declares (``Diagnostic.figures``, names of
    :data:`~mmdiag.render.figures.FIGURES`); a result this installation has no class for gets the
    per-modality bars. ``dpi`` defaults to :data:`~mmdiag.render.canvas.DEFAULT_DPI`.
    """
    dpi = dpi or DEFAULT_DPI
    mods = modalities_of(report)
    colors = modality_colors(mods)
    out = PlotSet()
    folder = Path(out_dir) if out_dir is not None else None
    for key, owner, title, build in _plan(report, mods, colors):
        if build is None:
            out.skipped[key] = (f"could not be drawn: {owner} declares the figure {title!r}, which no installed "
                                "module registers")
            continue
        fig = None
        try:
            with styled():
                fig = build()
                if fig is None:
                    out.skipped[key] = "no data for this plot in the report"
                    continue
                png = figure_png(fig, dpi)
        except Exception as exc:  # a malformed detail must not break the report
            out.skipped[key] = f"could not be drawn: {type(exc).__name__}: {exc}"
            continue
        finally:
            if fig is not None:
                fig.clear()
        out.images[key] = png
        out.titles[key] = title
        out.by_diagnostic.setdefault(owner, []).append(key)
        if folder is not None:
            out.paths[key] = write_atomic(folder / f"{key}.png", png)
    return out
