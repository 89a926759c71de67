"""Matplotlib plots of a report (PNG), with one fixed colour per modality across every figure.

Figures are built on :class:`matplotlib.figure.Figure` with the Agg canvas directly, never through
``pyplot``, so rendering neither needs a display nor changes the backend of a user's session.
Colours follow the Okabe-Ito palette (safe for the common colour-vision deficiencies), assigned in
the report's modality order. A plot whose data is missing or malformed is skipped with a reason;
it never breaks the rest of the report.
"""

from __future__ import annotations

import io
import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mmdiag.report import Report, Result

#: Okabe & Ito (2008), reordered so that the first colours are the most distinct.
OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#56B4E9", "#CC79A7", "#F0E442", "#000000")
#: beyond eight modalities: further distinct colours (no longer guaranteed colour-blind safe)
EXTRA = ("#882255", "#44AA99", "#999933", "#AA4499", "#332288", "#117733", "#88CCEE", "#DDCC77")
NEUTRAL = "#6E6E6E"
#: the diagnostics the side-by-side contribution figure shows, in this order
CONTRIBUTION_MEASURES = ("shapley", "reliance", "attribution", "mdi", "cal")
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(figure_png(fig, dpi))
    return path


# ------------------------------------------------------------------------------------------- helpers


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return None if math.isnan(v) or math.isinf(v) else v


def _interval(ci: Any) -> tuple[float, float] | None:
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        lo, hi = _num(ci[0]), _num(ci[1])
        if lo is not None and hi is not None:
            return (min(lo, hi), max(lo, hi))
    return None


def _wrap(text: str, width: int = 60) -> str:
    return "\n".join("\n".join(textwrap.wrap(line, width)) or line for line in text.split("\n")) if text else ""


def _bars(ax: Any, labels: Sequence[str], values: Sequence[float | None], intervals: Sequence[Any],
          colors: Sequence[str], annotate: bool = True, offset: float = 0.0, width: float = 0.7,
          hatch: str | None = None, alpha: float = 1.0, label: str | None = None) -> None:
    """Bars with asymmetric interval whiskers; missing values are left out, labelled 'n/a'."""
    x = np.arange(len(labels)) + offset
    heights = [v if v is not None else 0.0 for v in values]
    ax.bar(x, heights, width=width, color=colors, edgecolor="#333333", linewidth=0.6, hatch=hatch, alpha=alpha,
           label=label)
    for xi, v, ci in zip(x, values, intervals):
        iv = _interval(ci)
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


def _suptitle(fig: Figure, text: str, fontsize: float = 10) -> None:
    """A figure title wrapped to the figure's width (about 11 characters per inch at 10 pt)."""
    width = fig.get_figwidth()
    fig.suptitle(_wrap(text, max(20, int(width * 11 * 10 / fontsize))), fontsize=fontsize)


def _style(ax: Any) -> None:
    ax.spines["top"].set_visible(False)
    ax.spines["right"].set_visible(False)
    ax.grid(axis="y", color="#DDDDDD", linewidth=0.6)
    ax.set_axisbelow(True)


def _pad_ylim(ax: Any) -> None:
    lo, hi = ax.get_ylim()
    span = hi - lo or 1.0
    ax.set_ylim(lo - (0.05 * span if lo < 0 else 0), hi + 0.1 * span)


def _modalities_of(report: Report) -> list[str]:
    mods = list(report.modalities)
    for res in report.diagnostics.values():
        mods += [m for m in res.per_modality if m not in mods]
    return mods


# ------------------------------------------------------------------------------------ report figures


def fig_modality_bars(res: Result, modalities: Sequence[str], colors: Mapping[str, str]) -> Figure | None:
    """Per-modality values of one diagnostic with their bootstrap-interval whiskers."""
    mods = [m for m in modalities if m in res.per_modality]
    if not mods:
        return None
    values = [_num(res.per_modality.get(m)) for m in mods]
    if all(v is None for v in values):
        return None
    fig = new_figure(max(3.6, 0.8 * len(mods) + 2.2), 3.3)
    ax = fig.add_subplot()
    _bars(ax, mods, values, [(res.ci or {}).get(m) for m in mods], [colors[m] for m in mods])
    ax.set_xticks(range(len(mods)), mods, rotation=0 if len(mods) <= 4 else 30, ha="center" if len(mods) <= 4 else "right")
    ax.axhline(0, color="#444444", linewidth=0.8)
    chance = _num((res.details or {}).get("chance")) if isinstance(res.details, Mapping) else None
    if chance is not None and res.name in ("unimodal", "combinations", "probe"):
        ax.axhline(chance, color=NEUTRAL, linestyle="--", linewidth=1, zorder=4)
        ax.annotate(f"chance {chance:.2f}", (0.01, chance), xycoords=("axes fraction", "data"), ha="left",
                    va="bottom", fontsize=8, color="#333333", zorder=5,
                    bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.8})
    head = _num(res.value)
    sub = ""
    if head is not None:
        iv = _interval(res.value_ci)
        sub = f"headline {head:.3f}" + (f" [{iv[0]:.3f}, {iv[1]:.3f}]" if iv else "")
    direction = {True: "higher is better", False: "lower is better"}.get(res.higher_is_better, "")  # type: ignore[arg-type]
    ax.set_title(f"{res.name}: per modality, 95% interval" + (f"\n{sub}" if sub else ""), fontsize=10)
    ax.set_ylabel(res.name + (f" ({direction})" if direction else ""), fontsize=9)
    _style(ax)
    _pad_ylim(ax)
    return fig


def fig_contributions(report: Report, colors: Mapping[str, str]) -> Figure | None:
    """shapley, reliance, attribution, mdi and cal side by side (whichever the report holds)."""
    present = [n for n in CONTRIBUTION_MEASURES
               if n in report.diagnostics and any(_num(v) is not None for v in report.diagnostics[n].per_modality.values())]
    if not present:
        return None
    mods = _modalities_of(report)
    panel_w = 0.5 * len(mods) + 1.3
    ncols = max(1, min(len(present), int(11.5 // panel_w)))
    nrows = math.ceil(len(present) / ncols)
    fig = new_figure(max(4.0, panel_w * ncols + 0.4), 3.2 * nrows + 0.4)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(present):]:
        ax.set_visible(False)
    for ax, name in zip(axes, present):
        res = report.diagnostics[name]
        ms = [m for m in mods if m in res.per_modality]
        _bars(ax, ms, [_num(res.per_modality[m]) for m in ms], [(res.ci or {}).get(m) for m in ms],
              [colors[m] for m in ms], annotate=len(ms) <= 4)
        ax.set_xticks(range(len(ms)), ms, rotation=0 if len(ms) <= 3 else 40, ha="center" if len(ms) <= 3 else "right",
                      fontsize=8)
        ax.axhline(0, color="#444444", linewidth=0.8)
        ax.set_title(name, fontsize=10)
        _style(ax)
        _pad_ylim(ax)
    _suptitle(fig, "Contribution measures side by side (each on its own scale; compare the rankings)", fontsize=10)
    return fig


def _subset_members(name: str, modalities: Sequence[str]) -> set[str]:
    if name in modalities:
        return {name}
    return {p for p in name.split("+") if p}


def fig_combinations(res: Result, modalities: Sequence[str], colors: Mapping[str, str]) -> Figure | None:
    """Accuracy for every combination of modalities: membership dots and a heat column."""
    acc = (res.details or {}).get("accuracy") if isinstance(res.details, Mapping) else None
    if not isinstance(acc, Mapping) or not acc:
        return None
    entries = [(str(k), _num(v)) for k, v in acc.items()]
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
                    fontsize=8)
    if n > 15:  # long lists: repeat the modality names on top
        ax_m.tick_params(axis="x", labeltop=True)
    ax_m.set_xlim(-0.6, len(mods) - 0.4)
    ax_m.set_yticks([])
    ax_m.set_ylim(n - 0.5, -0.5)
    ax_m.set_title("modalities present", fontsize=9)
    for s in ax_m.spines.values():
        s.set_visible(False)
    values = np.array([[v if v is not None else np.nan] for _, v in entries], dtype=float)
    img = ax_h.imshow(np.ma.masked_invalid(values), aspect="auto", cmap=HEAT_CMAP, vmin=0.0, vmax=1.0,
                      extent=(-0.5, 0.5, n - 0.5, -0.5))
    for i, (name, v) in enumerate(entries):
        iv = _interval(cis.get(name)) if isinstance(cis, Mapping) else None
        text = "n/a" if v is None else f"{v:.3f}" + (f" [{iv[0]:.2f}, {iv[1]:.2f}]" if iv else "")
        ax_h.text(0, i, text, ha="center", va="center", fontsize=8,
                  color="white" if v is not None and v < 0.6 else "black")
    ax_h.set_xticks([])
    ax_h.tick_params(axis="y", left=False, labelleft=False)
    ax_h.set_ylim(n - 0.5, -0.5)
    ax_h.set_title("accuracy [95% interval]", fontsize=9)
    fig.colorbar(img, ax=ax_h, fraction=0.08, pad=0.02, label="accuracy")
    chance = _num((res.details or {}).get("chance"))
    weakest = (res.details or {}).get("weakest")
    sub = []
    if weakest:
        sub.append(f"weakest: {weakest}")
    if chance is not None:
        sub.append(f"chance {chance:.2f}")
    _suptitle(fig, "Accuracy with only the marked modalities present" + (f"\n{'; '.join(sub)}" if sub else ""), fontsize=10)
    return fig


def fig_per_class(res: Result, modalities: Sequence[str]) -> Figure | None:
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
        v = _num(v)
        return np.nan if v is None else v

    values = np.array([[cell(m, c) for c in classes] for m in mods], dtype=float)
    fig = new_figure(max(4.5, 0.42 * len(classes) + 2.5), max(2.2, 0.45 * len(mods) + 1.5))
    ax = fig.add_subplot()
    img = ax.imshow(np.ma.masked_invalid(values), aspect="auto", cmap=HEAT_CMAP, vmin=0.0, vmax=1.0)
    if len(classes) <= 30:
        for i in range(len(mods)):
            for j in range(len(classes)):
                v = values[i, j]
                ax.text(j, i, "–" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if not np.isnan(v) and v < 0.6 else "black")
    step = max(1, len(classes) // 30)
    ax.set_xticks(range(0, len(classes), step), classes[::step], fontsize=8)
    ax.set_yticks(range(len(mods)), mods, fontsize=9)
    ax.set_xlabel("class")
    ax.set_title("Per-class accuracy with one modality alone", fontsize=10)
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
    clean = [(_num(a), _num(b), _num(c) or 0.0) for a, b, c in rows]
    clean = [(a, b, c) for a, b, c in clean if a is not None and b is not None]
    if not clean:
        return None
    clean.sort()
    arr = np.array(clean, dtype=float)
    return arr[:, 0], arr[:, 1], arr[:, 2]


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
    ax.set_title("UDML noise estimator calibration", fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    _style(ax)
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
            if isinstance(xs, list) and xs and all(_num(x) is not None for x in xs):
                series[str(m)] = [float(x) for x in xs]
        if series:
            return str(key), series
    return None


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
        ax.set_ylabel(f"perceptual score ({key})", fontsize=9)
        ax.set_title("Perceptual score: spread over permutations", fontsize=10)
        _style(ax)
        return fig
    std = None
    for k in details:
        if "std" in str(k) and isinstance(details[k], Mapping):
            std = details[k]
            break
    if std is None:
        return None
    ms = [m for m in mods_order if _num(res.per_modality.get(m)) is not None and _num(std.get(m)) is not None]
    if not ms:
        return None
    fig = new_figure(max(4.0, 0.9 * len(ms) + 2.4), 3.5)
    ax = fig.add_subplot()
    vals = [float(res.per_modality[m]) for m in ms]
    sds = [float(std[m]) for m in ms]
    _bars(ax, ms, vals, [[v - s, v + s] for v, s in zip(vals, sds)], [colors.get(m, NEUTRAL) for m in ms])
    ax.set_xticks(range(len(ms)), ms)
    ax.axhline(0, color="#444444", linewidth=0.8)
    ax.set_ylabel("perceptual score (mean ± std over permutations)", fontsize=9)
    ax.set_title("Perceptual score: spread over permutations", fontsize=10)
    _style(ax)
    return fig


# ---------------------------------------------------------------------------------------- plot sets


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


def report_plots(report: Report, out_dir: str | Path | None = None, dpi: int = DEFAULT_DPI) -> PlotSet:
    """Draw every plot the report has data for; write ``out_dir/<key>.png`` when a folder is given."""
    mods = _modalities_of(report)
    colors = modality_colors(mods)
    plan: list[tuple[str, str, str, Callable[[], Figure | None]]] = []
    plan.append(("contributions", "_overview", "Contribution measures side by side",
                 lambda: fig_contributions(report, colors)))
    for name, res in report.diagnostics.items():
        plan.append((f"{name}_bars", name, f"{name}: per-modality values with 95% intervals",
                     lambda res=res: fig_modality_bars(res, mods, colors)))
        if name == "combinations":
            plan.append(("combinations_heatmap", name, "Accuracy for every combination of modalities",
                         lambda res=res: fig_combinations(res, mods, colors)))
        if name == "unimodal":
            plan.append(("unimodal_per_class", name, "Per-class accuracy of each modality alone",
                         lambda res=res: fig_per_class(res, mods)))
        if name == "udml":
            plan.append(("udml_calibration", name, "UDML noise estimator calibration",
                         lambda res=res: fig_udml_calibration(res, mods, colors)))
        if name == "perceptual":
            plan.append(("perceptual_spread", name, "Perceptual score spread over permutations",
                         lambda res=res: fig_perceptual(res, mods, colors)))
    out = PlotSet()
    folder = Path(out_dir) if out_dir is not None else None
    for key, owner, title, build in plan:
        fig = None
        try:
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
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{key}.png"
            path.write_bytes(png)
            out.paths[key] = path
    return out


# ------------------------------------------------------------------------- training and comparisons


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
    xs = np.array([_num(r.get("epoch")) if _num(r.get("epoch")) is not None else i for i, r in enumerate(rows)], float)

    def series(col: str) -> np.ndarray:
        return np.array([np.nan if _num(r.get(col)) is None else _num(r.get(col)) for r in rows], dtype=float)

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
        ax.set_title(ptitle, fontsize=10)
        ax.set_xlabel("epoch", fontsize=9)
        ax.legend(fontsize=7, frameon=False)
        _style(ax)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    _suptitle(fig, title, fontsize=11)
    return save_figure(fig, path, dpi)


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
        return list(ci) if _interval(ci) else None
    lo = _row_get(row, f"ci_{side}_low", f"{word}_low")
    hi = _row_get(row, f"ci_{side}_high", f"{word}_high")
    return [lo, hi] if _interval([lo, hi]) else None


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
        if any(_num(_row_get(r, "value_a", "before")) is not None or _num(_row_get(r, "value_b", "after")) is not None
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
        va = [_num(_row_get(r, "value_a", "before")) for r in rs]
        vb = [_num(_row_get(r, "value_b", "after")) for r in rs]
        _bars(ax, names, va, [_row_ci(r, "a") for r in rs], cols, annotate=False, offset=-0.2, width=0.38,
              hatch="///", alpha=0.45, label=labels[0])
        _bars(ax, names, vb, [_row_ci(r, "b") for r in rs], cols, annotate=False, offset=0.2, width=0.38,
              label=labels[1])
        for j, r in enumerate(rs):
            if _row_get(r, "separated", "separated_after_before") is True:
                top = max([v for v in (va[j], vb[j]) if v is not None] +
                          [iv[1] for iv in (_interval(_row_ci(r, "a")), _interval(_row_ci(r, "b"))) if iv])
                ax.annotate("*", (j, top), xytext=(0, 2), textcoords="offset points", ha="center", fontsize=12)
        ax.set_xticks(range(len(names)), names, rotation=0 if len(names) <= 3 else 35,
                      ha="center" if len(names) <= 3 else "right", fontsize=8)
        ax.axhline(0, color="#444444", linewidth=0.8)
        ax.set_title(diag, fontsize=10)
        _style(ax)
        _pad_ylim(ax)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    from matplotlib.patches import Patch

    handles = [Patch(facecolor="#BBBBBB", hatch="///", alpha=0.6, edgecolor="#333333", label=labels[0]),
               Patch(facecolor="#555555", edgecolor="#333333", label=labels[1])]
    fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    _suptitle(fig, title or f"{labels[0]} vs {labels[1]} (hatched: {labels[0]}; * = intervals do not overlap)",
                 fontsize=10)
    return save_figure(fig, path, dpi)
