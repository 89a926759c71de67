"""Matplotlib primitives shared by the report's figures: palette, Agg figures, bars with intervals.

Figures are built on :class:`matplotlib.figure.Figure` with the Agg canvas directly, never through
``pyplot``, so rendering neither needs a display nor changes the backend of a user's session.
Colours follow the Okabe-Ito palette (safe for the common colour-vision deficiencies), assigned in
the report's modality order.
"""

from __future__ import annotations

import io
import math
import textwrap
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mmdiag.io import write_atomic
from mmdiag.report import interval

#: Okabe & Ito (2008), reordered so that the first colours are the most distinct.
OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#56B4E9", "#CC79A7", "#F0E442", "#000000")
#: beyond eight modalities: further distinct colours (no longer guaranteed colour-blind safe)
EXTRA = ("#882255", "#44AA99", "#999933", "#AA4499", "#332288", "#117733", "#88CCEE", "#DDCC77")
NEUTRAL = "#6E6E6E"
DEFAULT_DPI = 90
HEAT_CMAP = "viridis"


def modality_colors(modalities: Sequence[str]) -> dict[str, str]:
    """Modality -> colour, by position in ``modalities`` (the report's order)."""
    palette = OKABE_ITO + EXTRA
    return {m: palette[j % len(palette)] for j, m in enumerate(modalities)}


def new_figure(width: float, height: float) -> Figure:
    """A figure bound to the Agg canvas (no pyplot, no global backend)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig: Figure, dpi: int = DEFAULT_DPI) -> bytes:
    """PNG bytes of a figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    return buf.getvalue()


def save_figure(fig: Figure, path: str | Path, dpi: int = DEFAULT_DPI) -> Path:
    """Write a figure as PNG (creating the folder)."""
    return write_atomic(path, figure_png(fig, dpi))


# ------------------------------------------------------------------------------------------- helpers


def num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return None if math.isnan(v) or math.isinf(v) else v


def wrap(text: str, width: int = 60) -> str:
    return "\n".join("\n".join(textwrap.wrap(line, width)) or line for line in text.split("\n")) if text else ""


def bars(ax: Any, labels: Sequence[str], values: Sequence[float | None], intervals: Sequence[Any],
         colors: Sequence[str], annotate: bool = True, offset: float = 0.0, width: float = 0.7,
         hatch: str | None = None, alpha: float = 1.0, label: str | None = None) -> None:
    """Bars with asymmetric interval whiskers; missing values are left out, labelled 'n/a'."""
    x = np.arange(len(labels)) + offset
    heights = [v if v is not None else 0.0 for v in values]
    ax.bar(x, heights, width=width, color=colors, edgecolor="#333333", linewidth=0.6, hatch=hatch, alpha=alpha,
           label=label)
    for xi, v, ci in zip(x, values, intervals):
        iv = interval(ci)
        if v is None:
            ax.annotate("n/a", (xi, 0), ha="center", va="bottom", fontsize=8, color=NEUTRAL)
            continue
        if iv is not None:
            lo, hi = iv
            ax.errorbar([xi], [v], yerr=[[max(0.0, v - lo)], [max(0.0, hi - v)]], fmt="none", ecolor="#222222",
                        elinewidth=1.2, capsize=4)
        if annotate:
            top = max(v, iv[1] if iv else v)
            bottom = min(v, iv[0] if iv else v)
            y, va = (top, "bottom") if v >= 0 else (bottom, "top")
            ax.annotate(f"{v:.3f}", (xi, y), xytext=(0, 2 if va == "bottom" else -2), textcoords="offset points",
                        ha="center", va=va, fontsize=8)


def suptitle(fig: Figure, text: str, fontsize: float = 10) -> None:
    """A figure title wrapped to the figure's width (about 11 characters per inch at 10 pt)."""
    width = fig.get_figwidth()
    fig.suptitle(wrap(text, max(20, int(width * 11 * 10 / fontsize))), fontsize=fontsize)


def style(ax: Any) -> None:
    ax.spines["top"].set_visible(False)
    ax.spines["right"].set_visible(False)
    ax.grid(axis="y", color="#DDDDDD", linewidth=0.6)
    ax.set_axisbelow(True)


def pad_ylim(ax: Any) -> None:
    lo, hi = ax.get_ylim()
    span = hi - lo or 1.0
    ax.set_ylim(lo - (0.05 * span if lo < 0 else 0), hi + 0.1 * span)
