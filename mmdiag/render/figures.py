"""The report's figures, registered by name: a diagnostic lists the ones it draws in ``figures``.

Each figure is a function ``draw(result, modalities, colors) -> Figure | None`` registered with
:func:`register_figure` under a name (``modality_bars``, ``combination_heatmap``...), with the key of
its PNG and its caption as templates of the diagnostic's name. It returns None when the result holds
no data for it; :func:`mmdiag.render.plots.report_plots` then skips it with a reason.
:func:`fig_contributions` is the overview across diagnostics: every registered contribution measure
the report holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from mmdiag.diagnostics.base import contribution_measures, declared
from mmdiag.registry import Registry
from mmdiag.render.canvas import (HEAT_CMAP, NEUTRAL, SMALL, axis_label, bars, new_figure, num, pad_ylim,
                                  short_scale, style, suptitle)
from mmdiag.report import Report, Result, interval
from mmdiag.render.html import cell_label, cells_of
from mmdiag.report_text import ordered_names, too_wide

#: draw(result, modalities in report order, modality -> colour) -> a figure, or None without data
Draw = Callable[[Result, Sequence[str], Mapping[str, str]], "Figure | None"]


@dataclass(frozen=True)
class FigureSpec:
    """A registered figure.

    Attributes:
        name: what ``Diagnostic.figures`` lists.
        key: the plot's key and PNG name, a template of ``{name}`` (the diagnostic's name).
        title: the caption, the same kind of template.
        draw: the function that draws it.
    """

    name: str
    key: str
    title: str
    draw: Draw


FIGURES: Registry[FigureSpec] = Registry("figure")


def register_figure(name: str, key: str, title: str) -> Callable[[Draw], Draw]:
    """Decorator registering a figure function under ``name`` (see :class:`FigureSpec`)."""

    def decorate(draw: Draw) -> Draw:
        FIGURES.register(name)(FigureSpec(name, key, title, draw))
        return draw

    return decorate


def _scale(name: str) -> str:
    cls = declared(name)
    return cls.scale if cls is not None else ""


def modalities_of(report: Report) -> list[str]:
    mods = list(report.modalities)
    for res in report.diagnostics.values():
        mods += [m for m in res.per_modality if m not in mods]
    return mods


# ------------------------------------------------------------------------------- overview


def fig_contributions(report: Report, colors: Mapping[str, str]) -> Figure | None:
    """The registered contribution measures the report holds, side by side (in reading order), each
    panel's y axis labelled with what its values are (the diagnostic's declared scale)."""
    measures = set(contribution_measures())
    present = [n for n in ordered_names(report) if n in measures
               and any(num(v) is not None for v in report.diagnostics[n].per_modality.values())]
    if not present:
        return None
    mods = modalities_of(report)
    panel_w = 0.45 * len(mods) + 1.6
    ncols = max(1, min(len(present), int(10.4 // panel_w)))
    nrows = math.ceil(len(present) / ncols)
    fig = new_figure(max(4.0, panel_w * ncols + 0.2), 3.1 * nrows + 0.4)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(present):]:
        ax.set_visible(False)
    for ax, name in zip(axes, present):
        res = report.diagnostics[name]
        ms = [m for m in mods if m in res.per_modality]
        bars(ax, ms, [num(res.per_modality[m]) for m in ms], [(res.ci or {}).get(m) for m in ms],
             [colors[m] for m in ms], annotate=len(ms) <= 4)
        ax.set_xticks(range(len(ms)), ms, rotation=0 if len(ms) <= 3 else 40, ha="center" if len(ms) <= 3 else "right",
                      fontsize=9.5)
        ax.axhline(0, color="#444444", linewidth=0.8)
        ax.set_title(name, fontsize=11, fontweight="bold")
        axis_label(ax, short_scale(_scale(name)) or name, 2.2)
        style(ax)
        pad_ylim(ax)
    suptitle(fig, "Contribution measures side by side: each on its own scale (y axis), compare the rankings",
             fontsize=11)
    return fig


# --------------------------------------------------------------------------- per diagnostic


@register_figure("modality_bars", "{name}_bars", "{name}: per-modality values (whiskers: 95% intervals)")
def fig_modality_bars(res: Result, modalities: Sequence[str], colors: Mapping[str, str]) -> Figure | None:
    """Per-modality values of one diagnostic with their bootstrap-interval whiskers; the y axis says
    what the values are, mirrored cells are named 'without <modality>', a chance line is named below
    the axis (never over the bars) and intervals too wide to read are said so in the title."""
    mods = [m for m in modalities if m in res.per_modality]
    if not mods:
        return None
    values = [num(res.per_modality.get(m)) for m in mods]
    if all(v is None for v in values):
        return None
    cells = cells_of(res.name, res)
    labels = [cell_label(m, cells) for m in mods]
    fig = new_figure(max(4.6, (1.2 if cells else 0.9) * len(mods) + 2.4), 3.7)
    ax = fig.add_subplot()
    bars(ax, labels, values, [(res.ci or {}).get(m) for m in mods], [colors[m] for m in mods])
    tilt = len(mods) > 4 or (cells and len(mods) > 3)
    ax.set_xticks(range(len(mods)), labels, rotation=30 if tilt else 0, ha="right" if tilt else "center")
    ax.axhline(0, color="#444444", linewidth=0.8)
    chance = num((res.details or {}).get("chance")) if isinstance(res.details, Mapping) else None
    if chance is not None and _scale(res.name) == "accuracy":  # a chance line on an accuracy scale
        ax.axhline(chance, color=NEUTRAL, linestyle="--", linewidth=1.1, zorder=4)
        ax.set_xlabel(f"dashed line: chance level ({chance:.2f})", fontsize=SMALL + 0.5, color="#444444")
    lines = [f"{res.name} per modality"]
    head = num(res.value)
    if head is not None:
        iv = interval(res.value_ci)
        word = f": {res.headline} =" if res.headline else ""
        lines.append(f"headline{word} {head:.3f}" + (f" [{iv[0]:.3f}, {iv[1]:.3f}]" if iv else ""))
    if any(too_wide(res, m) for m in mods):
        lines.append("intervals too wide to read: no finding")
    suptitle(fig, "\n".join(lines), fontsize=10.5)
    scale = short_scale(_scale(res.name))
    if scale:
        axis_label(ax, scale + (" without the modality" if cells == "without" else ""), 3.1 - 0.2 * len(lines))
    else:
        direction = {True: "higher is better", False: "lower is better"}.get(res.higher_is_better, "")  # type: ignore[arg-type]
        axis_label(ax, res.name + (f" ({direction})" if direction else ""), 3.1 - 0.2 * len(lines))
    style(ax)
    pad_ylim(ax)
    return fig


def _subset_members(name: str, modalities: Sequence[str]) -> set[str]:
    if name in modalities:
        return {name}
    return {p for p in name.split("+") if p}


@register_figure("combination_heatmap", "{name}_heatmap", "Accuracy for every combination of modalities")
def fig_combinations(res: Result, modalities: Sequence[str], colors: Mapping[str, str]) -> Figure | None:
    """Accuracy for every combination of modalities: membership dots and a heat column."""
    acc = (res.details or {}).get("accuracy") if isinstance(res.details, Mapping) else None
    if not isinstance(acc, Mapping) or not acc:
        return None
    entries = [(str(k), num(v)) for k, v in acc.items()]
    mods = list(modalities) or sorted({p for k, _ in entries for p in k.split("+")})
    entries.sort(key=lambda kv: (len(_subset_members(kv[0], mods)), -(kv[1] if kv[1] is not None else -1)))
    cis = (res.details or {}).get("ci") or {}
    n = len(entries)
    fig = new_figure(max(6.0, 0.5 * len(mods) + 5.0), max(2.8, 0.26 * n + 1.7))
    gs = fig.add_gridspec(1, 2, width_ratios=[max(1.0, 0.45 * len(mods)), 2.2])
    ax_m = fig.add_subplot(gs[0, 0])
    ax_h = fig.add_subplot(gs[0, 1], sharey=ax_m)
    xs_in, ys_in, cs_in, xs_out, ys_out = [], [], [], [], []
    for i, (name, _) in enumerate(entries):
        members = _subset_members(name, mods)
        for j, m in enumerate(mods):
            if m in members:
                xs_in.append(j), ys_in.append(i), cs_in.append(colors.get(m, NEUTRAL))
            else:
                xs_out.append(j), ys_out.append(i)
    ax_m.scatter(xs_out, ys_out, s=70, color="#E4E4E4", linewidths=0, zorder=3)
    ax_m.scatter(xs_in, ys_in, s=70, c=cs_in, edgecolors="#333333", linewidths=0.5, zorder=3)
    ax_m.set_xticks(range(len(mods)), mods, rotation=40 if len(mods) > 3 else 0, ha="right" if len(mods) > 3 else "center",
                    fontsize=9.5)
    if n > 15:  # long lists: repeat the modality names on top
        ax_m.tick_params(axis="x", labeltop=True)
    ax_m.set_xlim(-0.6, len(mods) - 0.4)
    ax_m.set_yticks([])
    ax_m.set_ylim(n - 0.5, -0.5)
    ax_m.set_title("modalities present", fontsize=10)
    for s in ax_m.spines.values():
        s.set_visible(False)
    values = np.array([[v if v is not None else np.nan] for _, v in entries], dtype=float)
    img = ax_h.imshow(np.ma.masked_invalid(values), aspect="auto", cmap=HEAT_CMAP, vmin=0.0, vmax=1.0,
                      extent=(-0.5, 0.5, n - 0.5, -0.5))
    for i, (name, v) in enumerate(entries):
        iv = interval(cis.get(name)) if isinstance(cis, Mapping) else None
        text = "n/a" if v is None else f"{v:.3f}" + (f" [{iv[0]:.2f}, {iv[1]:.2f}]" if iv else "")
        ax_h.text(0, i, text, ha="center", va="center", fontsize=9.5,
                  color="white" if v is not None and v < 0.6 else "black")
    ax_h.set_xticks([])
    ax_h.tick_params(axis="y", left=False, labelleft=False)
    ax_h.set_ylim(n - 0.5, -0.5)
    ax_h.set_title("accuracy [95% interval]", fontsize=10)
    fig.colorbar(img, ax=ax_h, fraction=0.08, pad=0.02, label="accuracy")
    chance = num((res.details or {}).get("chance"))
    weakest = (res.details or {}).get("weakest")
    sub = []
    if weakest:
        sub.append(f"weakest: {weakest}")
    if chance is not None:
        sub.append(f"chance {chance:.2f}")
    suptitle(fig, "Accuracy with only the marked modalities present" + (f"\n{'; '.join(sub)}" if sub else ""), fontsize=10)
    return fig


@register_figure("per_class_heatmap", "{name}_per_class", "Per-class accuracy of each modality alone")
def fig_per_class(res: Result, modalities: Sequence[str], colors: Mapping[str, str] | None = None) -> Figure | None:
    """Per-class accuracy of each modality alone (rows: modalities, columns: classes)."""
    per_class = (res.details or {}).get("per_class") if isinstance(res.details, Mapping) else None
    if not isinstance(per_class, Mapping) or not per_class:
        return None
    mods = [m for m in modalities if isinstance(per_class.get(m), Mapping)]
    mods += [m for m in per_class if m not in mods and isinstance(per_class[m], Mapping)]
    if not mods:
        return None
    classes: list[str] = []
    for m in mods:
        classes += [str(c) for c in per_class[m] if str(c) not in classes]
    if all(c.lstrip("-").isdigit() for c in classes):
        classes.sort(key=int)
    def cell(m: str, c: str) -> float:
        table = per_class[m]
        v = table.get(c, table.get(int(c)) if c.lstrip("-").isdigit() else None)
        v = num(v)
        return np.nan if v is None else v

    values = np.array([[cell(m, c) for c in classes] for m in mods], dtype=float)
    fig = new_figure(max(4.5, 0.42 * len(classes) + 2.5), max(2.2, 0.45 * len(mods) + 1.5))
    ax = fig.add_subplot()
    img = ax.imshow(np.ma.masked_invalid(values), aspect="auto", cmap=HEAT_CMAP, vmin=0.0, vmax=1.0)
    if len(classes) <= 30:
        for i in range(len(mods)):
            for j in range(len(classes)):
                v = values[i, j]
                ax.text(j, i, "–" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=SMALL,
                        color="white" if not np.isnan(v) and v < 0.6 else "black")
    step = max(1, len(classes) // 30)
    ax.set_xticks(range(0, len(classes), step), classes[::step], fontsize=9.5)
    ax.set_yticks(range(len(mods)), mods, fontsize=10)
    ax.set_xlabel("class")
    ax.set_title("Per-class accuracy with one modality alone", fontsize=11)
    fig.colorbar(img, ax=ax, fraction=0.05, pad=0.02, label="accuracy")
    return fig


def _curve(points: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(level, mean, std) from a list of {level, mean_pred, std_pred} or a dict of lists."""
    if isinstance(points, Mapping):
        lv, mp, sp = points.get("level"), points.get("mean_pred"), points.get("std_pred")
        if isinstance(lv, list) and isinstance(mp, list) and len(lv) == len(mp):
            sp = sp if isinstance(sp, list) and len(sp) == len(lv) else [0.0] * len(lv)
            rows = list(zip(lv, mp, sp))
        else:
            return None
    elif isinstance(points, list):
        rows = [(p.get("level"), p.get("mean_pred"), p.get("std_pred", 0.0)) for p in points if isinstance(p, Mapping)]
    else:
        return None
    clean = [(num(a), num(b), num(c) or 0.0) for a, b, c in rows]
    clean = [(a, b, c) for a, b, c in clean if a is not None and b is not None]
    if not clean:
        return None
    clean.sort()
    arr = np.array(clean, dtype=float)
    return arr[:, 0], arr[:, 1], arr[:, 2]


@register_figure("noise_calibration", "{name}_calibration", "{name}: noise estimator calibration")
def fig_udml_calibration(res: Result, modalities: Sequence[str], colors: Mapping[str, str]) -> Figure | None:
    """Predicted noise level against the injected one, per modality (mean ± std band)."""
    cal = (res.details or {}).get("calibration") if isinstance(res.details, Mapping) else None
    if not isinstance(cal, Mapping):
        return None
    curves = {m: _curve(cal[m]) for m in list(modalities) + [m for m in cal if m not in modalities] if m in cal}
    curves = {m: c for m, c in curves.items() if c is not None}
    if not curves:
        return None
    fig = new_figure(5.6, 3.8)
    ax = fig.add_subplot()
    lo = min(float(c[0].min()) for c in curves.values())
    hi = max(float(c[0].max()) for c in curves.values())
    ax.plot([lo, hi], [lo, hi], linestyle="--", color=NEUTRAL, linewidth=1, label="ideal (predicted = injected)")
    for m, (lv, mean, std) in curves.items():
        col = colors.get(m, NEUTRAL)
        ax.plot(lv, mean, marker="o", markersize=3.5, color=col, label=m, linewidth=1.6)
        ax.fill_between(lv, mean - std, mean + std, color=col, alpha=0.18, linewidth=0)
    ax.set_xlabel("injected noise level")
    ax.set_ylabel("predicted noise level (mean ± std)")
    ax.set_title(f"{res.name}: noise estimator calibration", fontsize=11)
    ax.legend(fontsize=9, frameon=False)
    style(ax)
    return fig


def _spread_data(details: Mapping[str, Any], modalities: Sequence[str]) -> tuple[str, dict[str, list[float]]] | None:
    """The first details entry mapping modalities to lists of numbers (per permutation, per sample...)."""
    preferred = sorted(details, key=lambda k: (str(k) != "per_permutation",
                                               not any(w in str(k) for w in ("perm", "score", "sample", "run")), str(k)))
    for key in preferred:
        val = details[key]
        if not isinstance(val, Mapping) or not val:
            continue
        if not any(m in val for m in modalities):
            continue
        series: dict[str, list[float]] = {}
        for m, xs in val.items():
            if isinstance(xs, list) and xs and all(num(x) is not None for x in xs):
                series[str(m)] = [float(x) for x in xs]
        if series:
            return str(key), series
    return None


@register_figure("permutation_spread", "{name}_spread", "{name}: spread over permutations")
def fig_perceptual(res: Result, modalities: Sequence[str], colors: Mapping[str, str]) -> Figure | None:
    """Perceptual-score spread: per-permutation values as points over a box, else mean ± std bars."""
    details = res.details if isinstance(res.details, Mapping) else {}
    found = _spread_data(details, modalities)
    mods_order = list(modalities)
    if found is not None:
        key, series = found
        ms = [m for m in mods_order if m in series] + [m for m in series if m not in mods_order]
        fig = new_figure(max(4.0, 0.9 * len(ms) + 2.4), 3.5)
        ax = fig.add_subplot()
        data = [series[m] for m in ms]
        box = ax.boxplot(data, positions=range(len(ms)), widths=0.5, patch_artist=True, showfliers=False)
        for patch, m in zip(box["boxes"], ms):
            patch.set_facecolor(colors.get(m, NEUTRAL))
            patch.set_alpha(0.35)
        rng = np.random.default_rng(0)
        for j, m in enumerate(ms):
            xs = j + rng.uniform(-0.12, 0.12, size=len(series[m]))
            ax.scatter(xs, series[m], s=14, color=colors.get(m, NEUTRAL), edgecolors="#222222", linewidths=0.4, zorder=3)
        ax.set_xticks(range(len(ms)), ms)
        ax.axhline(0, color="#444444", linewidth=0.8)
        axis_label(ax, f"{short_scale(_scale(res.name)) or 'perceptual score'} ({key.replace('_', ' ')})", 2.6)
        ax.set_title(f"{res.name}: spread over permutations", fontsize=11)
        style(ax)
        return fig
    std = None
    for k in details:
        if "std" in str(k) and isinstance(details[k], Mapping):
            std = details[k]
            break
    if std is None:
        return None
    ms = [m for m in mods_order if num(res.per_modality.get(m)) is not None and num(std.get(m)) is not None]
    if not ms:
        return None
    fig = new_figure(max(4.0, 0.9 * len(ms) + 2.4), 3.5)
    ax = fig.add_subplot()
    vals = [float(res.per_modality[m]) for m in ms]
    sds = [float(std[m]) for m in ms]
    bars(ax, ms, vals, [[v - s, v + s] for v, s in zip(vals, sds)], [colors.get(m, NEUTRAL) for m in ms])
    ax.set_xticks(range(len(ms)), ms)
    ax.axhline(0, color="#444444", linewidth=0.8)
    axis_label(ax, f"{short_scale(_scale(res.name)) or 'perceptual score'} (mean ± std over permutations)", 2.6)
    ax.set_title(f"{res.name}: spread over permutations", fontsize=11)
    style(ax)
    return fig
