"""The leaderboard's plot and HTML page (presentation only; the rows come from
:mod:`mmdiag.rebalance.board_table`)."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from mmdiag.io import write_atomic
from mmdiag.render.canvas import figure_png, modality_colors, new_figure, style, styled, suptitle

__all__ = ["leaderboard_png", "write_leaderboard_html"]


def leaderboard_png(rows: Sequence[Mapping[str, Any]], modalities: Sequence[str], objective: str) -> bytes:
    """Fused accuracy (bars with the 95% interval) and each modality's unimodal accuracy (dots) per
    fix, in rank order; the baseline's fused accuracy as a dashed line."""
    colours = modality_colors(modalities)
    with styled():
        fig = new_figure(max(6.0, 0.55 * len(rows) + 2.5), 4.2)
        ax = fig.add_subplot(1, 1, 1)
        x = np.arange(len(rows))
        acc = [r["accuracy"] for r in rows]
        low = [r["accuracy"] - r["accuracy_low"] if r.get("accuracy_low") is not None else 0.0 for r in rows]
        high = [r["accuracy_high"] - r["accuracy"] if r.get("accuracy_high") is not None else 0.0 for r in rows]
        bar_colours = ["#9e9e9e" if r["fix"] == "none" else "#4c72b0" if r.get("separated") else "#a6bddb"
                       for r in rows]
        ax.bar(x, acc, color=bar_colours, edgecolor="#333333", linewidth=0.6, label="fused accuracy")
        ax.errorbar(x, acc, yerr=[low, high], fmt="none", ecolor="#222222", elinewidth=1.0, capsize=3)
        for m in modalities:
            ax.plot(x, [r[f"unimodal.{m}"] for r in rows], "o", color=colours[m], label=f"{m} only")
        base = next((r["accuracy"] for r in rows if r["fix"] == "none"), None)
        if base is not None:
            ax.axhline(base, color="#555555", linestyle="--", linewidth=0.8, label="baseline fused")
        ax.set_xticks(x)
        ax.set_xticklabels([f"{r['rank']}. {r['fix']}" for r in rows], rotation=40, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("accuracy (validation)")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: no dot hidden
        style(ax)
        suptitle(fig, f"leaderboard by {objective}: dark bars differ from the baseline (paired bootstrap)")
        return figure_png(fig)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}"
    return html.escape(str(value))


def write_leaderboard_html(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], objective: str,
                           notes: Sequence[str], png: bytes, path: Path) -> Path:
    """``leaderboard.html``: the plot, the table and the notes, in one self-contained page."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
    items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    image = base64.b64encode(png).decode("ascii")
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>mmdiag leaderboard</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}</style></head><body>"
        f"<section id='leaderboard'><h1>Leaderboard (ranked by {html.escape(objective)})</h1>"
        f"<img alt='leaderboard plot' src='data:image/png;base64,{image}'>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        "<p>separated: the fused-accuracy difference to the baseline (<code>none</code>) has a 95% paired "
        "bootstrap interval (the same validation rows resampled for both) that excludes 0.</p>"
        + (f"<h2>Notes</h2><ul>{items}</ul>" if items else "") + "</section></body></html>\n"
    )
    return write_atomic(path, page)
