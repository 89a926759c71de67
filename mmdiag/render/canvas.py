"""Matplotlib primitives shared by the report's figures: palette, Agg figures, bars with intervals.

Figures are built on :class:`matplotlib.figure.Figure` with the Agg canvas directly, never through
``pyplot``, so rendering neither needs a display nor changes the backend of a user's session.
Colours follow the Okabe-Ito palette (safe for the common colour-vision deficiencies), assigned in
the report's modality order.
"""

from __future__ import annotations

import io
import math
import re
import textwrap
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import matplotlib
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
#: pixels per inch of the PNGs: at 110 a 10 pt label is 15 px high and a bar chart about 480 px wide,
#: readable at the report's width while ``report.html`` stays near a megabyte
DEFAULT_DPI = 110
HEAT_CMAP = "viridis"
#: font sizes (points) of every figure, applied while it is drawn (:func:`styled`); no figure text
#: is smaller than :data:`SMALL` points
STYLE = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "xtick.labelsize": 10,
         "ytick.labelsize": 9.5, "legend.fontsize": 9, "figure.titlesize": 11}
SMALL = 8.5


@contextmanager
def styled() -> Iterator[None]:
    """Draw with the report's font sizes (:data:`STYLE`) without changing the caller's settings."""
    with matplotlib.rc_context(STYLE):
        yield


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
    """PNG bytes of a figure, reduced to a 256-colour palette (flat charts look the same at about a
    quarter of the size, which keeps ``report.html`` small at a readable resolution)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    try:
        from PIL import Image

        buf.seek(0)
        with Image.open(buf) as img:
            small = img.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE)
        palette = small.getpalette() or []
        small.putpalette([255 if min(palette[i - i % 3:i - i % 3 + 3]) >= 250 else c  # keep white white
                          for i, c in enumerate(palette)])
        out = io.BytesIO()
        small.save(out, format="png", optimize=True, dpi=(dpi, dpi))
        return out.getvalue() if len(out.getvalue()) < len(buf.getvalue()) else buf.getvalue()
    except Exception:  # no Pillow, or an image it cannot reduce: the full-colour PNG
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


def short_scale(scale: str) -> str:
    """The unit part of a declared scale, for an axis label: 'accuracy added (Shapley value)' ->
    'accuracy added', 'cosine of ... gradients, in [-1, 1]' -> 'cosine of ... gradients'."""
    return re.split(r" \(|, in | in [\[(]|: ", scale, maxsplit=1)[0].strip() if scale else ""


def axis_label(ax: Any, text: str, height: float) -> None:
    """A y-axis label wrapped to an axes about ``height`` inches high (at most three lines)."""
    lines = textwrap.wrap(text, max(14, int(height * 72 / ((SMALL + 0.5) * 0.62))))
    if len(lines) > 3:
        lines = lines[:2] + [textwrap.shorten(" ".join(lines[2:]), max(14, len(lines[1])), placeholder="...")]
    ax.set_ylabel("\n".join(lines), fontsize=SMALL + 0.5)


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
            ax.annotate("n/a", (xi, 0), ha="center", va="bottom", fontsize=SMALL, color=NEUTRAL)
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
                        ha="center", va=va, fontsize=SMALL + 0.5)


def suptitle(fig: Figure, text: str, fontsize: float = 10) -> None:
    """A figure title wrapped to the figure's width (about 12.5 characters per inch at 10 pt)."""
    width = fig.get_figwidth()
    fig.suptitle(wrap(text, max(20, int(width * 12.5 * 10 / fontsize))), fontsize=fontsize)


def style(ax: Any) -> None:
    ax.spines["top"].set_visible(False)
    ax.spines["right"].set_visible(False)
    ax.grid(axis="y", color="#DDDDDD", linewidth=0.6)
    ax.set_axisbelow(True)


def pad_ylim(ax: Any) -> None:
    lo, hi = ax.get_ylim()
    span = hi - lo or 1.0
    ax.set_ylim(lo - (0.05 * span if lo < 0 else 0), hi + 0.1 * span)
