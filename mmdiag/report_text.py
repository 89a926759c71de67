"""The report's summary as rows and as plain text: what the terminal table, CI logs and
:meth:`mmdiag.report.Report.summary` show.

Rows are ordered the way people read them: the verdict's evidence first (unimodal accuracy,
Shapley, reliance, the balance summary), then the other contribution measures, then the
specialised diagnostics. Every per-modality cell reads "higher = more of this modality", except
where a diagnostic says otherwise, and then its row is labelled so (``combinations (without)``:
the accuracy with that modality missing).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from mmdiag.report import Report, Result

#: the verdict's evidence first, then the other contribution measures, then the rest
READING_ORDER = ("unimodal", "shapley", "reliance", "balance", "attribution", "cal", "mdi", "perceptual",
                 "ogm", "combinations", "deployment", "ood", "probe", "prototype", "evidential", "gradient_conflict", "udml")

#: cells of reports written before results carried ``cells``: the one built-in mirrored row
OLDER_REPORT_CELLS = {"combinations": "without"}

#: what each built-in headline label means (a plug-in's label without an entry is listed as it is)
HEADLINE_MEANINGS = {
    "spread": "max - min over the modalities",
    "weakest": "lowest value",
    "evenness": "normalised entropy of the shares (1 = even)",
    "log-ratio": "log of the largest share over the smallest",
    "max ratio": "largest value over the smallest",
    "fused u": "uncertainty of the fused opinion",
    "lowest cos": "lowest gradient cosine",
    "largest share": "largest share of new samples beyond the threshold",
    "expected": "expected accuracy when modalities go missing (uniform over the combinations, or as given)",
}
#: what each kind of per-modality cell other than the modality's own value means
CELL_MEANINGS = {
    "without": "the accuracy with that modality missing",
    "loss when missing": "the expected accuracy lost when that modality is missing",
}


def legend(report: "Report") -> str:
    """The legend line of a report's summary: the meaning of each headline label and kind of cell it uses."""
    labels = list(dict.fromkeys((report.diagnostics[n].headline or "").split(" (")[0] for n in ordered_names(report)))
    known = [f"{label} = {HEADLINE_MEANINGS[label]}" for label in labels if label in HEADLINE_MEANINGS]
    kinds = dict.fromkeys(res.cells or OLDER_REPORT_CELLS.get(name, "") for name, res in report.diagnostics.items())
    parts = [f"headline: {', '.join(known)}"] if known else []
    parts.append("cells: value [95% interval]")
    parts += [f"({kind}): {CELL_MEANINGS[kind]}" for kind in kinds if kind in CELL_MEANINGS]
    parts.append("(too wide): an interval too wide to read")
    return "; ".join(parts)


#: intervals too wide to read, per diagnostic: (widest readable interval on its scale, fewest batches
#: the interval may rest on). gradient_conflict bootstraps over a handful of gradient batches: an
#: interval wider than 1 (half the cosine's range, -1 to 1) or drawn from fewer than 5 batches says
#: nothing either way, so it is marked instead of being read as a finding.
TOO_WIDE = {"gradient_conflict": (1.0, 5)}


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def too_wide(res: "Result", modality: str | None = None) -> str:
    """Why the interval of ``res.per_modality[modality]`` (of the headline when None) is too wide to
    read by the rule of :data:`TOO_WIDE`, in words; '' when it can be read or has no such rule."""
    rule, ci = TOO_WIDE.get(res.name), res.interval(modality)
    if rule is None or ci is None:
        return ""
    widest, fewest = rule
    batches = (res.details or {}).get("n_batches") if isinstance(res.details, dict) else None
    if isinstance(batches, int) and not isinstance(batches, bool) and batches < fewest:
        return f"resting on {batches} batch{'es' if batches != 1 else ''} (fewer than {fewest})"
    if ci[1] - ci[0] > widest:
        return f"spanning {ci[1] - ci[0]:.2f} (wider than {widest:g})"
    return ""


def ordered_names(report: "Report") -> list[str]:
    """The report's diagnostics in reading order (unknown names, plug-ins say, last, as found)."""
    known = [n for n in READING_ORDER if n in report.diagnostics]
    return known + [n for n in report.diagnostics if n not in READING_ORDER]


def summary_rows(report: "Report") -> list[list[str]]:
    """Header plus one row per diagnostic: name, headline (value and what it is), one cell per
    modality; then one row per diagnostic that failed or was skipped."""
    rows = [["diagnostic", "headline", *report.modalities]]
    for name in ordered_names(report):
        res = report.diagnostics[name]
        cells_are = res.cells or OLDER_REPORT_CELLS.get(name, "")
        label = f"{name} ({cells_are})" if cells_are else name
        headline = fmt(res.value) + (f" {res.headline}" if res.headline and res.value is not None else "")
        cells = []
        for m in report.modalities:
            ci = res.interval(m)
            interval = f" [{fmt(ci[0], 2)}, {fmt(ci[1], 2)}]" if ci else ""
            interval += " (too wide)" if ci and too_wide(res, m) else ""
            cells.append(fmt(res.per_modality.get(m)) + interval)
        rows.append([label, headline, *cells])
    for f in report.failures:
        rows.append([f.diagnostic, f.kind, *(["-"] * len(report.modalities))])
    return rows


def verdict_lines(report: "Report", html_path: str | None = None) -> list[str]:
    """``verdict: ...``, then its reasons, then where the HTML report is."""
    lines = [f"verdict: {report.verdict.headline()}"]
    lines += [f"  - {r}" for r in report.verdict.reasons]
    if html_path:
        lines.append(f"open {html_path} for the plots and how to read each diagnostic")
    return lines


def plain_table(rows: list[list[str]]) -> str:
    """Columns padded to their widest cell; nothing wrapped or cut (for logs and files)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for k, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        out.append("  ".join(cells).rstrip())
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def summary_text(report: "Report", html_path: str | None = None) -> str:
    """The whole summary as plain text: title, table, legend, failures, verdict and reasons."""
    title = f"mmdiag: {report.n_samples} samples, fused accuracy {report.accuracy:.3f}"
    parts = [title, plain_table(summary_rows(report)), legend(report)]
    parts += [f"{f.diagnostic} {f.kind}: {f.error}" for f in report.failures]
    parts += verdict_lines(report, html_path)
    return "\n".join(parts)
