"""The simulation's learning curves (``mmdiag acquire --simulate``): fused accuracy and the weakest
modality's unimodal accuracy against the number of labels, one line per strategy (the mean over
seeds) with a band from the lowest to the highest seed."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from mmdiag.render.canvas import EXTRA, OKABE_ITO, new_figure, save_figure, styled


def _value(row: Mapping[str, Any], curve: str) -> float:
    if curve == "weakest":
        return min(float(v) for k, v in row.items() if k.startswith("unimodal."))
    return float(row[curve])


def plot_acquisition_curves(rows: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """Write the two-panel PNG of the curve rows (see the module docstring) to ``path``."""
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    colors = dict(zip(strategies, OKABE_ITO + EXTRA))
    panels = (("accuracy", "fused accuracy"), ("weakest", "weakest modality's unimodal accuracy"))
    with styled():
        fig = new_figure(10.0, 4.0)
        axes = fig.subplots(1, 2)
        for ax, (curve, label) in zip(axes, panels):
            for st in strategies:
                mine = [r for r in rows if r["strategy"] == st]
                rounds = sorted({r["round"] for r in mine})
                x = [float(np.mean([r["labels"] for r in mine if r["round"] == k])) for k in rounds]
                ys = [[_value(r, curve) for r in mine if r["round"] == k] for k in rounds]
                ax.plot(x, [np.mean(y) for y in ys], marker="o", ms=3, color=colors[st], label=st,
                        lw=2.2 if st == "rlmba" else 1.4)
                ax.fill_between(x, [min(y) for y in ys], [max(y) for y in ys], color=colors[st], alpha=0.15, lw=0)
            ax.set_xlabel("labels")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[0].legend(frameon=False, fontsize=8.5)
        seeds = len({r["seed"] for r in rows})
        fig.suptitle(title or f"acquisition curves (mean over {seeds} seed{'s' if seeds != 1 else ''}, band: min-max)")
        return save_figure(fig, path)
