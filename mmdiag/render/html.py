"""``report.html``: one self-contained page (inline CSS, plots as base64 PNG, no script, no network).

Order: the verdict first (dominant, under-used, severity, recommended fix, reasons), then the
overview (a table of every diagnostic saying what each measures, and the contribution measures
side by side), then one section per diagnostic in the reading order of the terminal summary
(:data:`mmdiag.report_text.READING_ORDER`: unimodal, Shapley and reliance first), each with its
plots, its per-modality table with intervals, how to read it and its settings (folded), then failed
and skipped diagnostics with their reasons, then the run settings (the per-diagnostic parameters
folded). Raw data (per-sample values, evidence) is never embedded; only the report's numbers and
the plots drawn from them.
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
from mmdiag.report_text import OLDER_REPORT_CELLS, TOO_WIDE, legend, ordered_names, too_wide

SEVERITY_COLOURS = {"strong": "#D55E00", "mild": "#E69F00", "none": "#009E73"}
#: a settings entry with more values than this is folded into its own <details> block
FOLD_OVER = 8

CSS = """
:root { --ink:#1d1d1f; --muted:#5f6368; --line:#e3e3e3; --panel:#f7f7f8; --warn:#8a4b00; }
* { box-sizing: border-box; }
body { margin:0; font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--ink); background:#fff; }
main { max-width: 1200px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 20px; margin: 0 0 8px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
h2 small { font-weight: normal; color: var(--muted); font-size: 15px; }
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
.side { min-width: 300px; flex: 1 1 300px; }
figure { margin: 10px 0 14px; }
code { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 13px; background: #f1f1f3; padding: 0 3px; border-radius: 3px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
figcaption { color: var(--muted); font-size: 13px; }
table { border-collapse: collapse; margin: 8px 0 10px; font-size: 14px; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 10px; text-align: right; vertical-align: top; }
th:first-child, td:first-child { text-align: left; }
thead th { background: var(--panel); }
td.num { font-variant-numeric: tabular-nums; white-space: nowrap; }
td small, th small { color: var(--muted); }
table.overview { width: 100%; }
table.overview td.what, table.overview th.what { text-align: left; color: var(--muted); font-size: 13px; }
table.overview td.name { white-space: nowrap; }
.wide { overflow-x: auto; }
.how { background: #eef4fb; border-radius: 6px; padding: 8px 12px; margin: 8px 0; }
.note { background: #fff4e5; border-left: 4px solid #E69F00; border-radius: 6px; padding: 8px 12px; margin: 8px 0; }
small.wide-ci, span.wide-ci { color: var(--warn); font-weight: 600; }
.summary { color: var(--muted); margin: 0 0 6px; }
.tag { font-size: 11px; padding: 0 6px; border-radius: 8px; margin-left: 6px; color: #fff; }
.tag.dom { background: #D55E00; } .tag.under { background: #0072B2; }
dl.params { display:grid; grid-template-columns: max-content 1fr; gap: 2px 14px; font-size: 13px; margin: 4px 0; }
dl.params dt { color: var(--muted); } dl.params dd { margin: 0; font-family: ui-monospace, Menlo, Consolas, monospace; overflow-wrap:anywhere; }
details { margin: 6px 0; } details > summary { cursor: pointer; color: var(--muted); font-size: 14px; }
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


def _declared(name: str, attr: str) -> str:
    cls = _class_of(name)
    return str(getattr(cls, attr, "") or "") if cls is not None else ""


def _declared_scale(name: str) -> str:
    """'Per modality: <scale>; higher means <...>.' from the diagnostic's declarations ('' when none)."""
    scale, higher = _declared(name, "scale"), _declared(name, "higher_means")
    if not (scale or higher):
        return ""
    text = f"Per modality: {scale}" if scale else "Per modality"
    return text + (f"; higher means {higher}." if higher else ".")


def cells_of(name: str, res: Result) -> str:
    """What a result's per-modality cells are when not "more of this modality" ('without'...), else ''."""
    return res.cells or OLDER_REPORT_CELLS.get(name, "") or _declared(name, "cells")


def cell_label(m: str, cells: str) -> str:
    """How a modality's cell is named: 'without audio' for mirrored cells, else the modality."""
    return f"{cells} {m}" if cells == "without" else m


def headline_of(name: str, res: Result) -> str:
    """What the headline value is, in a word or two ('' when neither the result nor a class says)."""
    return res.headline or _declared(name, "headline")


def what_it_measures(name: str, res: Result) -> str:
    """One line (HTML) for the overview: what the cells are, and what the headline is.

    From the diagnostic's declared ``scale`` and the result's headline label; a result without
    metadata (an older report, a plug-in not installed here) falls back to its summary line.
    """
    scale, head, cells = _declared(name, "scale"), headline_of(name, res), cells_of(name, res)
    if not scale:
        text = _e(res.summary) if res.summary else ""
        if head:
            text += ("<br>" if text else "") + f"<small>headline: {_e(head)}</small>"
        return text or "–"
    if cells == "without":
        scale = f"{scale} without the modality"
    return _rst(scale) + (f"<br><small>headline: {_e(head)}</small>" if head else "")


def _rst(text: str) -> str:
    """Escape text and turn docstring ``literals`` into <code>."""
    text = re.sub(r"``(.+?)``", r"<code>\1</code>", _e(text))
    return re.sub(r"(?<![\w*])\*(\w[^*]*?)\*(?![\w*])", r"<em>\1</em>", text)


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{_e(alt)}">'
            f"<figcaption>{_e(alt)}</figcaption></figure>")


def _swatch(m: str, colours: Mapping[str, str]) -> str:
    return f'<span class="swatch" style="background:{_e(colours.get(m, "#6E6E6E"))}"></span>'


def _modality_cell(m: str, report: Report, colours: Mapping[str, str], cells: str = "") -> str:
    """The modality's name with its verdict tags; mirrored cells ('without audio') get no tag, so the
    dominant badge never sits beside the accuracy *without* the dominant modality."""
    tags = ""
    if not cells and report.verdict.dominant == m:
        tags += '<span class="tag dom">dominant</span>'
    if not cells and m in (report.verdict.underused or []):
        tags += '<span class="tag under">under-used</span>'
    return f"<td>{_swatch(m, colours)}{_e(cell_label(m, cells))}{tags}</td>"


def _flatten(prefix: str, value: Any, out: list[tuple[str, str]]) -> None:
    if isinstance(value, Mapping) and value:
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        text = value if isinstance(value, str) else json.dumps(value)
        if len(text) > 300:
            text = text[:297] + "..."
        out.append((prefix, text))


def _dl(rows: Sequence[tuple[str, str]]) -> str:
    return '<dl class="params">' + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in rows) + "</dl>"


def _params(params: Mapping[str, Any]) -> str:
    """Settings as a list; an entry holding more than :data:`FOLD_OVER` values folds into a <details>."""
    plain: list[tuple[str, str]] = []
    folded = []
    for key, value in dict(params or {}).items():
        rows: list[tuple[str, str]] = []
        _flatten(str(key), value, rows)
        if len(rows) > FOLD_OVER:
            folded.append(f"<details><summary>{_e(key)}.* ({len(rows)} values)</summary>{_dl(rows)}</details>")
        else:
            plain += rows
    if not plain and not folded:
        return "<p class=\"summary\">No parameters.</p>"
    return (_dl(plain) if plain else "") + "".join(folded)


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


def _cell(res: Result, m: str, cells: str) -> str:
    """An overview cell: value, then its interval (marked when too wide to read) and 'without m'."""
    v, ci = res.per_modality.get(m), interval((res.ci or {}).get(m))
    under = []
    if ci:
        wide = too_wide(res, m)
        under.append(f'<small class="wide-ci">{_interval_text(ci)} too wide</small>' if wide
                     else f"<small>{_interval_text(ci)}</small>")
    if cells == "without" and m in res.per_modality:
        under.append(f"<small>without {_e(m)}</small>")
    return f'<td class="num">{_fmt(v)}' + "".join(f"<br>{u}" for u in under) + "</td>"


def _overview_table(report: Report, colours: Mapping[str, str]) -> str:
    head = "".join(f"<th>{_swatch(m, colours)}{_e(m)}</th>" for m in report.modalities)
    body = []
    for name in ordered_names(report):
        res = report.diagnostics[name]
        cells = cells_of(name, res)
        label = f'<a href="#diag-{_e(name)}">{_e(name)}</a>' + (f" <small>({_e(cells)})</small>" if cells else "")
        body.append(f'<tr><td class="name">{label}</td><td class="what">{what_it_measures(name, res)}</td>'
                    f'<td class="num">{_fmt(res.value)}</td>'
                    + "".join(_cell(res, m, cells) for m in report.modalities) + "</tr>")
    return (f'<div class="wide"><table class="overview"><thead><tr><th>diagnostic</th><th class="what">what it '
            f"measures</th><th>headline</th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"
            f'<p class="summary"><small>{_e(legend(report))}.</small></p>')


def too_wide_note(name: str, res: Result) -> str:
    """A plain-words warning when the result's intervals are too wide to read ('' when they can be)."""
    why: dict[str, list[str]] = {}
    for m in res.per_modality:
        reason = too_wide(res, m)
        if reason:
            why.setdefault(reason, []).append(m)
    if not why:
        return ""
    widest, fewest = TOO_WIDE[res.name]
    ends = ", ".join(f"{m} {_interval_text((res.ci or {}).get(m))}" for ms in why.values() for m in ms)
    rows = (res.details or {}).get("n_rows") if isinstance(res.details, Mapping) else None
    reasons = next(iter(why)) if len(why) == 1 else "; ".join(f"{', '.join(ms)} {r}" for r, ms in why.items())
    flagged = [m for ms in why.values() for m in ms]
    many = len(flagged) > 1
    source = f", from {rows} rows" if isinstance(rows, int) else ""
    read = "the values below" if many else f"the value of {flagged[0]}"
    return (f'<div class="note"><strong>Too wide to read.</strong> The 95% interval{"s" if many else ""} of '
            f"{_e(ends)} say{'' if many else 's'} nothing either way: {_e(reasons + source)}. Read {_e(read)} "
            "as no finding, neither as a conflict nor as its absence. Rule: an interval of "
            f"<code>{_e(name)}</code> that rests on fewer than {fewest} batches, or is wider than {widest:g} "
            "on its scale, is too wide to read. Collect more gradient batches (raise "
            "<code>max_grad_samples</code> or lower the batch size) to read it.</div>")


def _side_table(name: str, res: Result, report: Report, colours: Mapping[str, str]) -> str:
    cells = cells_of(name, res)
    head = headline_of(name, res)
    rows = [f'<tr><td><strong>headline</strong>{f" <small>{_e(head)}</small>" if head else ""}</td>'
            f'<td class="num">{_fmt(res.value)}</td><td class="num">{_interval_text(res.value_ci)}</td></tr>']
    mods = [m for m in report.modalities if m in res.per_modality] + [m for m in res.per_modality if m not in report.modalities]
    for m in mods:
        ci = (res.ci or {}).get(m)
        mark = ' <span class="wide-ci">too wide</span>' if too_wide(res, m) else ""
        rows.append(f"<tr>{_modality_cell(m, report, colours, cells)}"
                    f'<td class="num">{_fmt(res.per_modality.get(m))}</td>'
                    f'<td class="num">{_interval_text(ci)}{mark}</td></tr>')
    first = "cells" if cells == "without" else "modality"
    out = (f'<div class="wide"><table><thead><tr><th>{first}</th><th>value</th><th>95% interval</th></tr></thead>'
           f"<tbody>{''.join(rows)}</tbody></table></div>")
    scale = _declared_scale(name)
    if scale:
        out += f'<p class="summary">{_rst(scale)}</p>'
    else:  # no declared meaning: the direction is all there is to say
        direction = {True: "higher is better", False: "lower is better"}.get(res.higher_is_better)  # type: ignore[arg-type]
        out += f'<p class="summary">Direction: {direction or "no preferred direction"}.</p>'
    return out


def _diagnostic_section(name: str, res: Result, report: Report, images: Mapping[str, bytes],
                        titles: Mapping[str, str], keys: Sequence[str], colours: Mapping[str, str]) -> str:
    title, how = doc_parts(name)
    if not how:
        how = res.summary or "No description is available for this diagnostic."
    cells = cells_of(name, res)
    parts = [f'<section class="diagnostic" id="diag-{_e(name)}"><h2>{_e(name)}'
             + (f" <small>(cells: {_e(cells)} each modality)</small>" if cells == "without" else
                f" <small>(cells: {_e(cells)})</small>" if cells else "") + "</h2>"]
    if title:
        parts.append(f'<p class="summary">{_e(title)}</p>')
    if res.summary and res.summary != how:
        head = headline_of(name, res)
        parts.append(f'<p class="summary">Headline{f", {_e(head)}" if head else ""}: {_e(res.summary)}.</p>')
    parts.append(f'<div class="how"><strong>How to read this.</strong> {_rst(how)}</div>')
    parts.append(too_wide_note(name, res))
    figs = [_img(images[key], titles.get(key, key)) for key in keys if key in images]
    parts.append('<div class="figs">' + "".join(figs[:1]) + '<div class="side">')
    parts.append(_side_table(name, res, report, colours))
    scalars = _scalar_details(res.details)
    if scalars:
        parts.append("<h3>Details</h3>" + _dl(scalars))
    n_params = len(res.params or {})
    parts.append(f"<details><summary>Settings ({n_params} value{'s' if n_params != 1 else ''})</summary>"
                 + _params(res.params) + "</details>")
    parts.append("</div></div>")
    if figs[1:]:
        parts.append('<div class="figs">' + "".join(figs[1:]) + "</div>")
    parts.append("</section>")
    return "".join(parts)


def _verdict_section(report: Report) -> list[str]:
    v = report.verdict
    sev = v.severity if v.severity in SEVERITY_COLOURS else "none"
    out = [
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
    return out


def _tail_sections(report: Report, plots: Any) -> list[str]:
    """Failed and skipped diagnostics, then the run settings (long entries folded), then the footer."""
    out = []
    if report.failures:
        rows = "".join(
            f'<tr class="failure"><td>{_e(f.diagnostic)}</td><td class="kind-{_e(f.kind)}">{_e(f.kind)}</td>'
            f"<td>{_e(f.error)}</td></tr>" for f in report.failures)
        out.append('<section id="failures"><h2>Failed and skipped diagnostics</h2>'
                   f'<table class="failures"><thead><tr><th>diagnostic</th><th>kind</th><th>reason</th></tr></thead><tbody>{rows}</tbody></table>'
                   "</section>")
    skipped = getattr(plots, "skipped", {}) or {}
    drawn_errors = {k: r for k, r in skipped.items() if r.startswith("could not")}
    out.append('<section id="settings"><h2>Run settings</h2>')
    out.append(_params({"n_samples": report.n_samples, "accuracy": report.accuracy, "modalities": report.modalities,
                        "schema_version": report.schema_version, **dict(report.settings)}))
    if drawn_errors:
        out.append("<h3>Plots not drawn</h3><ul>" + "".join(f"<li>{_e(k)}: {_e(r)}</li>" for k, r in drawn_errors.items())
                   + "</ul>")
    out.append("</section>")
    out.append(f"<footer>Generated by mmdiag {_e(report.mmdiag_version or '')} from report.json "
               "(schema version " + _e(report.schema_version) + "). Self-contained: no scripts, no network.</footer>")
    return out


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
    mods = " ".join(f"{_swatch(m, colours)}{_e(m)}" for m in report.modalities)
    acc = report.accuracy
    acc_text = "–" if acc is None or acc != acc else f"{acc:.3f}"
    names = ordered_names(report)
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>mmdiag report: {_e(report.verdict.headline())}</title>",
        f"<style>{CSS}</style></head><body><main>",
        "<header><h1>mmdiag report</h1>",
        f'<p class="meta">{report.n_samples} samples &middot; fused accuracy {acc_text} &middot; modalities: {mods}'
        f" &middot; created {_e(report.created)} &middot; mmdiag {_e(report.mmdiag_version or '?')}</p></header>",
        *_verdict_section(report),
    ]
    toc = ['<a href="#verdict">verdict</a>', '<a href="#overview">overview</a>']
    toc += [f'<a href="#diag-{_e(n)}">{_e(n)}</a>' for n in names]
    if report.failures:
        toc.append('<a href="#failures">failed / skipped</a>')
    toc.append('<a href="#settings">run settings</a>')
    out.append('<nav class="toc">Sections: ' + " ".join(toc) + "</nav>")
    out.append('<section id="overview"><h2>Overview</h2>')
    out.append('<p class="summary">Every diagnostic, in reading order: the evidence behind the verdict first '
               "(unimodal accuracy, Shapley, reliance), then the other contribution measures, then the rest. "
               "Leave-one-out (reliance), Shapley, gradient and attribution scores answer different questions "
               "and can disagree when modalities interact; the verdict names the measures it relied on.</p>")
    out.append(_overview_table(report, colours) if report.diagnostics else "<p>No diagnostic produced a result.</p>")
    for key in owners.get("_overview", []):
        out.append(_img(images[key], titles.get(key, key)))
    out.append("</section>")
    for name in names:
        out.append(_diagnostic_section(name, report.diagnostics[name], report, images, titles, owners.get(name, []),
                                       colours))
    out += _tail_sections(report, plots)
    out.append("</main></body></html>")
    return "\n".join(out) + "\n"


def write_html(report: Report, path: str | Path, plots: Any | None = None) -> Path:
    """Write ``report.html`` atomically."""
    path = Path(path)
    write_atomic(path, render_html(report, plots))
    return path
