"""Figures of training runs and comparisons: per-epoch dynamics, and paired before/after bars."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from mmdiag.render.canvas import (DEFAULT_DPI, NEUTRAL, SMALL, bars, modality_colors, new_figure, num, pad_ylim,
                                  save_figure, style, styled, suptitle)
from mmdiag.diagnostics.base import declared
from mmdiag.render.html import cell_label
from mmdiag.report import interval
from mmdiag.report_text import OLDER_REPORT_CELLS


def _records(frame: Any) -> list[dict[str, Any]]:
    if hasattr(frame, "to_dict"):
        try:
            return list(frame.to_dict(orient="records"))
        except TypeError:
            pass
    if isinstance(frame, Mapping):
        cols = {k: list(v) for k, v in frame.items()}
        n = max((len(v) for v in cols.values()), default=0)
        return [{k: (v[i] if i < len(v) else None) for k, v in cols.items()} for i in range(n)]
    return [dict(r) for r in frame]


@styled()
def plot_training_dynamics(history_frame: Any, path: str | Path, modalities: Sequence[str] | None = None,
                           dpi: int = DEFAULT_DPI, title: str = "Training dynamics") -> Path | None:
    """Per-epoch loss/accuracy, per-modality unimodal accuracy and every per-modality signal.

    Args:
        history_frame: a pandas DataFrame (``History.to_frame()``), a list of row dicts or a dict
            of columns with ``epoch`` and any of ``loss``, ``acc``/``accuracy`` (also ``val_loss``,
            ``val_accuracy``...), ``unimodal_acc.<m>``, ``signal.<name>.<m>`` (e.g.
            ``signal.coeff.audio`` of OGM-GE) and scalar ``signal.<name>``.
        path: the PNG to write.
        modalities: colour order (default: order of first appearance in the columns).

    Returns:
        The path, or None when the history holds nothing to plot.
    """
    rows = _records(history_frame)
    if not rows:
        return None
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    xs = np.array([num(r.get("epoch")) if num(r.get("epoch")) is not None else i for i, r in enumerate(rows)], float)

    def series(col: str) -> np.ndarray:
        return np.array([np.nan if num(r.get(col)) is None else num(r.get(col)) for r in rows], dtype=float)

    mods = list(modalities or [])
    mods += [c.split(".", 1)[1] for c in cols if c.startswith("unimodal_acc.") and c.split(".", 1)[1] not in mods]
    signals: dict[str, list[str]] = {}  # signal name -> series suffixes ("" for a scalar signal)
    for c in cols:
        if not c.startswith("signal."):
            continue
        rest = c[len("signal."):]
        name, _, suffix = rest.partition(".")
        signals.setdefault(name, [])
        if suffix not in signals[name]:
            signals[name].append(suffix)
    if not mods:  # no modality named elsewhere: per-series suffixes that are not combinations
        mods = [s for ss in signals.values() for s in ss if s and "+" not in s]
        mods = list(dict.fromkeys(mods))
    others = [s for ss in signals.values() for s in ss if s and s not in mods]
    colors = modality_colors(mods + list(dict.fromkeys(others)))
    loss_cols = [c for c in cols if c == "loss" or c.endswith("_loss")]
    acc_cols = [c for c in cols if c in ("acc", "accuracy") or c.endswith("_acc") or c.endswith("_accuracy")]
    uni_cols = [c for c in cols if c.startswith("unimodal_acc.")]
    panels: list[tuple[str, list[tuple[str, np.ndarray, str, str]]]] = []
    if loss_cols:
        panels.append(("loss", [(c, series(c), "#222222" if i == 0 else NEUTRAL, "-" if i == 0 else "--")
                                for i, c in enumerate(loss_cols)]))
    if acc_cols or uni_cols:
        lines = [(c, series(c), "#222222" if i == 0 else NEUTRAL, "-" if i == 0 else "--") for i, c in enumerate(acc_cols)]
        lines += [(f"{c.split('.', 1)[1]} alone", series(c), colors[c.split('.', 1)[1]], "-") for c in uni_cols]
        panels.append(("accuracy (fused and per modality alone)", lines))
    for name, ms in signals.items():
        panels.append((f"signal: {name}", [(m or name, series(f"signal.{name}.{m}" if m else f"signal.{name}"),
                                            colors.get(m, "#222222"), "-") for m in ms]))
    panels = [(t, [ln for ln in lines if not np.all(np.isnan(ln[1]))]) for t, lines in panels]
    panels = [p for p in panels if p[1]]
    if not panels:
        return None
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = new_figure(4.2 * ncols, 3.0 * nrows + 0.4)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (ptitle, lines) in zip(axes, panels):
        for label, ys, col, ls in lines:
            ax.plot(xs, ys, color=col, linestyle=ls, marker="o", markersize=2.5, linewidth=1.5, label=label)
        ax.set_title(ptitle, fontsize=11)
        ax.set_xlabel("epoch", fontsize=10)
        ax.legend(fontsize=SMALL, frameon=False)
        style(ax)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    suptitle(fig, title, fontsize=11)
    return save_figure(fig, path, dpi)


def _declared_cells(name: str) -> str:
    """What a diagnostic's per-modality cells are ('without' for combinations), '' for most."""
    cls = declared(name)
    return (cls.cells if cls is not None else "") or OLDER_REPORT_CELLS.get(name, "")


def _row_get(row: Any, *names: str) -> Any:
    for n in names:
        if isinstance(row, Mapping) and n in row:
            return row[n]
        if not isinstance(row, Mapping) and hasattr(row, n):
            return getattr(row, n)
    return None


def _row_ci(row: Any, side: str) -> list[float] | None:
    word = "before" if side == "a" else "after"
    ci = _row_get(row, f"ci_{side}", f"ci_{word}")
    if ci is not None:
        return list(ci) if interval(ci) else None
    lo = _row_get(row, f"ci_{side}_low", f"{word}_low")
    hi = _row_get(row, f"ci_{side}_high", f"{word}_high")
    return [lo, hi] if interval([lo, hi]) else None


@styled()
def plot_before_after(rows: Iterable[Any], path: str | Path, labels: tuple[str, str] = ("before", "after"),
                      modalities: Sequence[str] | None = None, dpi: int = DEFAULT_DPI,
                      title: str | None = None) -> Path | None:
    """Paired bars per diagnostic: value A (hatched) and B (solid) with intervals; ``*`` marks separated intervals.

    Args:
        rows: :class:`mmdiag.compare.CompareRow` objects or mappings with ``diagnostic``, ``modality``
            (``""`` or None for a headline), ``value_a``/``before`` and ``value_b``/``after``, and
            optionally intervals as ``ci_a``/``ci_b`` ([low, high]), ``ci_a_low``/``ci_a_high``... or
            ``before_low``/``before_high``/``after_low``/``after_high`` (the rebalance comparison
            rows), and ``separated`` (or ``separated_after_before``).
        path: the PNG to write.
        labels: names of the two sides (legend).

    Returns:
        The path, or None when no row has a value.
    """
    groups: dict[str, list[Any]] = {}
    for r in rows:
        diag = str(_row_get(r, "diagnostic") or "")
        if not diag:
            continue
        groups.setdefault(diag, []).append(r)
    panels: list[tuple[str, list[Any]]] = []
    for diag, rs in groups.items():
        per_mod = [r for r in rs if _row_get(r, "modality")]
        chosen = per_mod or [r for r in rs if not _row_get(r, "modality")]
        if any(num(_row_get(r, "value_a", "before")) is not None or num(_row_get(r, "value_b", "after")) is not None
               for r in chosen):
            panels.append((diag, chosen))
    if not panels:
        return None
    mods = list(modalities or [])
    for _, rs in panels:
        mods += [str(_row_get(r, "modality")) for r in rs if _row_get(r, "modality") and str(_row_get(r, "modality")) not in mods]
    colors = modality_colors(mods)
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    width = max(0.8 * max(len(rs) for _, rs in panels) + 1.8, 3.4)
    fig = new_figure(width * ncols, 3.1 * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (diag, rs) in zip(axes, panels):
        names = [str(_row_get(r, "modality") or "headline") for r in rs]
        cols = [colors.get(n, NEUTRAL) for n in names]
        cells = _declared_cells(diag)
        names = [cell_label(n, cells) if _row_get(r, "modality") else n for n, r in zip(names, rs)]
        va = [num(_row_get(r, "value_a", "before")) for r in rs]
        vb = [num(_row_get(r, "value_b", "after")) for r in rs]
        bars(ax, names, va, [_row_ci(r, "a") for r in rs], cols, annotate=False, offset=-0.2, width=0.38,
             hatch="///", alpha=0.45, label=labels[0])
        bars(ax, names, vb, [_row_ci(r, "b") for r in rs], cols, annotate=False, offset=0.2, width=0.38,
             label=labels[1])
        for j, r in enumerate(rs):
            if _row_get(r, "separated", "separated_after_before") is True:
                top = max([v for v in (va[j], vb[j]) if v is not None] +
                          [iv[1] for iv in (interval(_row_ci(r, "a")), interval(_row_ci(r, "b"))) if iv])
                ax.annotate("*", (j, top), xytext=(0, 2), textcoords="offset points", ha="center", fontsize=12)
        ax.set_xticks(range(len(names)), names, rotation=0 if len(names) <= 3 else 35,
                      ha="center" if len(names) <= 3 else "right", fontsize=9.5)
        ax.axhline(0, color="#444444", linewidth=0.8)
        ax.set_title(diag, fontsize=11)
        style(ax)
        pad_ylim(ax)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    from matplotlib.patches import Patch

    handles = [Patch(facecolor="#BBBBBB", hatch="///", alpha=0.6, edgecolor="#333333", label=labels[0]),
               Patch(facecolor="#555555", edgecolor="#333333", label=labels[1])]
    fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=9, frameon=False)
    suptitle(fig, title or f"{labels[0]} vs {labels[1]} (hatched: {labels[0]}; * = intervals do not overlap)",
             fontsize=11)
    return save_figure(fig, path, dpi)
