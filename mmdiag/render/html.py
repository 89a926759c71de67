"""``report.html``: one self-contained page (inline CSS, plots as base64 PNG, no script, no network).

Order: the verdict first (dominant, under-used, severity, recommended fix, reasons), then the
contribution measures side by side with a table of every diagnostic, then one section per
diagnostic (its plots, its per-modality table with intervals, how to read it, its settings), then
failed and skipped diagnostics with their reasons, then the run settings. Raw data (per-sample
values, evidence) is never embedded; only the report's numbers and the plots drawn from them.
"""

from __future__ import annotations

import base64
import html
import inspect
import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from mmdiag.diagnostics.base import declared
from mmdiag.io import write_atomic
from mmdiag.report import Report, Result, interval

SEVERITY_COLOURS = {"strong": "#D55E00", "mild": "#E69F00", "none": "#009E73"}

CSS = """
:root { --ink:#1d1d1f; --muted:#5f6368; --line:#e3e3e3; --panel:#f7f7f8; }
* { box-sizing: border-box; }
body { margin:0; font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--ink); background:#fff; }
main { max-width: 1080px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 20px; margin: 0 0 8px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
h3 { font-size: 15px; margin: 14px 0 6px; }
.meta { color: var(--muted); margin: 0 0 18px; }
.swatch { display:inline-block; width:11px; height:11px; border-radius:2px; margin-right:5px;
          vertical-align:-1px; border:1px solid rgba(0,0,0,.35); }
section { margin: 26px 0; }
.verdict { border-left: 8px solid var(--sev); background: var(--panel); padding: 14px 18px 10px; border-radius: 6px; }
.verdict .headline { font-size: 18px; font-weight: 600; margin: 0 0 10px; }
.facts { display:grid; grid-template-columns: repeat(4, minmax(0, 1fr)); gap: 10px; margin: 0 0 8px; }
.fact { background:#fff; border:1px solid var(--line); border-radius:6px; padding:8px 10px; }
.fact .k { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.fact .v { font-size: 16px; font-weight: 600; overflow-wrap: anywhere; }
.pill { display:inline-block; padding: 1px 9px; border-radius: 10px; color:#fff; background: var(--sev); }
nav.toc { font-size: 14px; color: var(--muted); }
nav.toc a { color: #0b57d0; text-decoration: none; margin-right: 12px; }
.figs { display: flex; flex-wrap: wrap; gap: 8px 24px; align-items: flex-start; }
.side { min-width: 260px; flex: 1 1 260px; }
figure { margin: 10px 0 14px; }
code { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 13px; background: #f1f1f3; padding: 0 3px; border-radius: 3px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
figcaption { color: var(--muted); font-size: 13px; }
table { border-collapse: collapse; margin: 8px 0 10px; font-size: 14px; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 10px; text-align: right; vertical-align: top; }
th:first-child, td:first-child { text-align: left; }
thead th { background: var(--panel); }
td.num { font-variant-numeric: tabular-nums; }
.wide { overflow-x: auto; }
.how { background: #eef4fb; border-radius: 6px; padding: 8px 12px; margin: 8px 0; }
.summary { color: var(--muted); margin: 0 0 6px; }
.tag { font-size: 11px; padding: 0 6px; border-radius: 8px; margin-left: 6px; color: #fff; }
.tag.dom { background: #D55E00; } .tag.under { background: #0072B2; }
dl.params { display:grid; grid-template-columns: max-content 1fr; gap: 2px 14px; font-size: 13px; margin: 4px 0; }
dl.params dt { color: var(--muted); } dl.params dd { margin: 0; font-family: ui-monospace, Menlo, Consolas, monospace; overflow-wrap:anywhere; }
table.failures th, table.failures td { text-align: left; }
.kind-error { color: #b3261e; font-weight: 600; } .kind-skipped { color: var(--muted); font-weight: 600; }
footer { color: var(--muted); font-size: 12px; margin-top: 40px; }
@media (max-width: 720px) { .facts { grid-template-columns: repeat(2, minmax(0, 1fr)); } }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _interval_text(ci: Any) -> str:
    iv = interval(ci)
    return f"[{iv[0]:.3f}, {iv[1]:.3f}]" if iv else "–"


def _class_of(name: str) -> Any:
    """The registered diagnostic class behind a result (None when unknown here)."""
    try:
        return declared(name)
    except Exception:  # a broken plug-in must not break rendering
        return None


def doc_parts(name: str) -> tuple[str, str]:
    """(one-line title, "how to read") of a registered diagnostic: the first paragraph of its docstring
    and its declared ``how_to_read`` ('' for a name this installation has no class for)."""
    cls = _class_of(name)
    if cls is None:
        return "", ""
    doc = inspect.getdoc(cls) or ""
    title = " ".join(doc.split("\n\n", 1)[0].split())
    return title, " ".join(str(cls.how_to_read or "").split())


def _declared_scale(name: str) -> str:
    """'Per modality: <scale>; higher means <...>.' from the diagnostic's declarations ('' when none)."""
    cls = _class_of(name)
    if cls is None or not (cls.scale or cls.higher_means):
        return ""
    text = f"Per modality: {cls.scale}" if cls.scale else "Per modality"
    return text + (f"; higher means {cls.higher_means}." if cls.higher_means else ".")


def _rst(text: str) -> str:
    """Escape text and turn docstring ``literals`` into <code>."""
    return re.sub(r"``(.+?)``", r"<code>\1</code>", _e(text))


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{_e(alt)}">'
            f"<figcaption>{_e(alt)}</figcaption></figure>")


def _swatch(m: str, colours: Mapping[str, str]) -> str:
    return f'<span class="swatch" style="background:{_e(colours.get(m, "#6E6E6E"))}"></span>'


def _modality_cell(m: str, report: Report, colours: Mapping[str, str]) -> str:
    tags = ""
    if report.verdict.dominant == m:
        tags += '<span class="tag dom">dominant</span>'
    if m in (report.verdict.underused or []):
        tags += '<span class="tag under">under-used</span>'
    return f"<td>{_swatch(m, colours)}{_e(m)}{tags}</td>"


def _flatten(prefix: str, value: Any, out: list[tuple[str, str]]) -> None:
    if isinstance(value, Mapping) and value:
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        text = value if isinstance(value, str) else json.dumps(value)
        if len(text) > 300:
            text = text[:297] + "..."
        out.append((prefix, text))


def _params(params: Mapping[str, Any]) -> str:
    rows: list[tuple[str, str]] = []
    _flatten("", dict(params or {}), rows)
    if not rows:
        return "<p class=\"summary\">No parameters.</p>"
    return '<dl class="params">' + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in rows) + "</dl>"


def _scalar_details(details: Any) -> list[tuple[str, str]]:
    if not isinstance(details, Mapping):
        return []
    rows = []
    for k, v in details.items():
        if isinstance(v, bool) or v is None:
            continue
        if isinstance(v, (int, float)):
            rows.append((str(k), _fmt(v)))
        elif isinstance(v, str) and len(v) <= 120:
            rows.append((str(k), v))
    return rows


def _overview_table(report: Report, colours: Mapping[str, str]) -> str:
    head = "".join(f"<th>{_swatch(m, colours)}{_e(m)}</th>" for m in report.modalities)
    body = []
    for name, res in report.diagnostics.items():
        cells = []
        for m in report.modalities:
            v = res.per_modality.get(m)
            ci = (res.ci or {}).get(m)
            cells.append(f'<td class="num">{_fmt(v)}<br><small>{_interval_text(ci) if ci else ""}</small></td>')
        body.append(f'<tr><td><a href="#diag-{_e(name)}">{_e(name)}</a></td><td class="num">{_fmt(res.value)}</td>'
                    + "".join(cells) + "</tr>")
    return (f'<div class="wide"><table><thead><tr><th>diagnostic</th><th>headline</th>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def _diagnostic_section(name: str, res: Result, report: Report, images: Mapping[str, bytes],
                        titles: Mapping[str, str], keys: Sequence[str], colours: Mapping[str, str]) -> str:
    title, how = doc_parts(name)
    if not how:
        how = res.summary or "No description is available for this diagnostic."
    parts = [f'<section class="diagnostic" id="diag-{_e(name)}"><h2>{_e(name)}</h2>']
    if title:
        parts.append(f'<p class="summary">{_e(title)}</p>')
    if res.summary and res.summary != how:
        parts.append(f'<p class="summary">Headline: {_e(res.summary)}.</p>')
    parts.append(f'<div class="how"><strong>How to read this.</strong> {_rst(how)}</div>')
    figs = [_img(images[key], titles.get(key, key)) for key in keys if key in images]
    parts.append('<div class="figs">' + "".join(figs[:1]) + '<div class="side">')
    direction = {True: "higher is better", False: "lower is better"}.get(res.higher_is_better, "no preferred direction")  # type: ignore[arg-type]
    rows = [f'<tr><td><strong>headline</strong></td><td class="num">{_fmt(res.value)}</td>'
            f'<td class="num">{_interval_text(res.value_ci)}</td></tr>']
    mods = [m for m in report.modalities if m in res.per_modality] + [m for m in res.per_modality if m not in report.modalities]
    for m in mods:
        rows.append(f"<tr>{_modality_cell(m, report, colours)}<td class=\"num\">{_fmt(res.per_modality.get(m))}</td>"
                    f'<td class="num">{_interval_text((res.ci or {}).get(m))}</td></tr>')
    scale = _declared_scale(name)
    parts.append(f'<div class="wide"><table><thead><tr><th>modality</th><th>value</th><th>95% interval</th></tr></thead>'
                 f"<tbody>{''.join(rows)}</tbody></table></div>"
                 + (f'<p class="summary">{_rst(scale)}</p>' if scale else "")
                 + f'<p class="summary">Direction: {direction}.</p>')
    scalars = _scalar_details(res.details)
    if scalars:
        parts.append("<h3>Details</h3>" + '<dl class="params">'
                     + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in scalars) + "</dl>")
    parts.append("<h3>Settings</h3>" + _params(res.params))
    parts.append("</div></div>")
    if figs[1:]:
        parts.append('<div class="figs">' + "".join(figs[1:]) + "</div>")
    parts.append("</section>")
    return "".join(parts)


def render_html(report: Report, plots: Any | None = None) -> str:
    """The HTML document of a report.

    Args:
        report: the report.
        plots: a :class:`mmdiag.render.plots.PlotSet` (drawn here when None).
    """
    from mmdiag.render.plots import modality_colors, report_plots

    if plots is None:
        plots = report_plots(report)
    images, titles, owners = plots.images, plots.titles, plots.by_diagnostic
    colours = modality_colors(list(report.modalities) + [m for r in report.diagnostics.values()
                                                         for m in r.per_modality if m not in report.modalities])
    v = report.verdict
    sev = v.severity if v.severity in SEVERITY_COLOURS else "none"
    mods = " ".join(f"{_swatch(m, colours)}{_e(m)}" for m in report.modalities)
    acc = report.accuracy
    acc_text = "–" if acc is None or acc != acc else f"{acc:.3f}"
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>mmdiag report: {_e(v.headline())}</title>",
        f"<style>{CSS}</style></head><body><main>",
        "<header><h1>mmdiag report</h1>",
        f'<p class="meta">{report.n_samples} samples &middot; fused accuracy {acc_text} &middot; modalities: {mods}'
        f" &middot; created {_e(report.created)} &middot; mmdiag {_e(report.mmdiag_version or '?')}</p></header>",
        f'<section class="verdict" id="verdict" style="--sev:{SEVERITY_COLOURS[sev]}"><h2>Verdict</h2>',
        f'<p class="headline">{_e(v.headline())}</p><div class="facts">',
        f'<div class="fact"><div class="k">dominant</div><div class="v">{_e(v.dominant or "none")}</div></div>',
        f'<div class="fact"><div class="k">under-used</div><div class="v">{_e(", ".join(v.underused) or "none")}</div></div>',
        f'<div class="fact"><div class="k">severity</div><div class="v"><span class="pill">{_e(v.severity)}</span></div></div>',
        f'<div class="fact"><div class="k">recommended fix</div><div class="v">{_e(v.recommended_fix or "none")}</div></div>',
        "</div>",
    ]
    if v.reasons:
        out.append("<h3>Reasons</h3><ul>" + "".join(f"<li>{_e(r)}</li>" for r in v.reasons) + "</ul>")
    if v.recommended_fix:
        out.append('<p class="summary">After retraining with the recommended fix, compare the two reports with '
                   "<code>mmdiag compare OLD/report.json NEW/report.json</code>.</p>")
    out.append("</section>")
    toc = ['<a href="#overview">overview</a>'] + [f'<a href="#diag-{_e(n)}">{_e(n)}</a>' for n in report.diagnostics]
    if report.failures:
        toc.append('<a href="#failures">failed / skipped</a>')
    toc.append('<a href="#settings">run settings</a>')
    out.append('<nav class="toc">Sections: ' + " ".join(toc) + "</nav>")
    out.append('<section id="overview"><h2>Overview</h2>')
    for key in owners.get("_overview", []):
        out.append(_img(images[key], titles.get(key, key)))
    out.append('<p class="summary">Leave-one-out (reliance), Shapley, gradient and attribution scores answer different '
               "questions and can disagree when modalities interact; the verdict names the measures it relied on.</p>")
    out.append(_overview_table(report, colours) if report.diagnostics else "<p>No diagnostic produced a result.</p>")
    out.append("</section>")
    for name, res in report.diagnostics.items():
        out.append(_diagnostic_section(name, res, report, images, titles, owners.get(name, []), colours))
    if report.failures:
        rows = "".join(
            f'<tr class="failure"><td>{_e(f.diagnostic)}</td><td class="kind-{_e(f.kind)}">{_e(f.kind)}</td>'
            f"<td>{_e(f.error)}</td></tr>" for f in report.failures)
        out.append('<section id="failures"><h2>Failed and skipped diagnostics</h2>'
                   f'<table class="failures"><thead><tr><th>diagnostic</th><th>kind</th><th>reason</th></tr></thead><tbody>{rows}</tbody></table>'
                   "</section>")
    skipped = getattr(plots, "skipped", {}) or {}
    drawn_errors = {k: r for k, r in skipped.items() if r.startswith("could not")}
    settings = dict(report.settings)
    out.append('<section id="settings"><h2>Run settings</h2>')
    out.append(_params({"n_samples": report.n_samples, "accuracy": report.accuracy, "modalities": report.modalities,
                        "schema_version": report.schema_version, **settings}))
    if drawn_errors:
        out.append("<h3>Plots not drawn</h3><ul>" + "".join(f"<li>{_e(k)}: {_e(r)}</li>" for k, r in drawn_errors.items())
                   + "</ul>")
    out.append("</section>")
    out.append(f"<footer>Generated by mmdiag {_e(report.mmdiag_version or '')} from report.json "
               "(schema version " + _e(report.schema_version) + "). Self-contained: no scripts, no network.</footer>")
    out.append("</main></body></html>")
    return "\n".join(out) + "\n"


def write_html(report: Report, path: str | Path, plots: Any | None = None) -> Path:
    """Write ``report.html`` atomically."""
    path = Path(path)
    write_atomic(path, render_html(report, plots))
    return path
