"""``report.md``: the report as GitHub-flavoured Markdown (also fit for CI job summaries).

Text only (no images, so it renders the same in a job summary, a merge-request comment or a
repository): the verdict, a table of every diagnostic with per-modality values and intervals,
failed and skipped diagnostics, and the main run settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmdiag.io import write_atomic
from mmdiag.report_text import legend, summary_rows
from mmdiag.report import Report

#: settings shown in the Markdown (the HTML report shows them all)
MAIN_SETTINGS = ("model", "checkpoint", "data", "mask", "mask_at", "seed", "bootstrap", "device")


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(report: Report, title: str = "mmdiag report") -> str:
    """The Markdown document of a report."""
    v = report.verdict
    icon = {"strong": "🔴", "mild": "🟠", "none": "🟢"}.get(v.severity, "")
    lines = [
        f"## {title}",
        "",
        f"{report.n_samples} samples, fused accuracy {_fmt(report.accuracy)}, modalities: "
        f"{', '.join(report.modalities)}.",
        "",
        f"### Verdict {icon}",
        "",
        f"**{_cell(v.headline())}**",
        "",
        "| dominant | under-used | severity | recommended fix |",
        "|---|---|---|---|",
        f"| {_cell(v.dominant or 'none')} | {_cell(', '.join(v.underused) or 'none')} | {_cell(v.severity)} | "
        f"{_cell(v.recommended_fix or 'none')} |",
        "",
    ]
    if v.reasons:
        lines += ["Reasons:", ""] + [f"- {_cell(r)}" for r in v.reasons] + [""]
    lines += ["### Diagnostics", ""]
    if report.diagnostics:
        lines.append("| diagnostic | headline | " + " | ".join(_cell(m) for m in report.modalities) + " |")
        lines.append("|---|---:|" + "---:|" * len(report.modalities))
        for row in summary_rows(report)[1:1 + len(report.diagnostics)]:  # reading order, labelled
            lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
        lines += ["", f"Values are point estimates with 95% bootstrap intervals in brackets; {legend(report)}.", ""]
    else:
        lines += ["No diagnostic produced a result.", ""]
    if report.failures:
        lines += ["### Failed and skipped diagnostics", "", "| diagnostic | kind | reason |", "|---|---|---|"]
        lines += [f"| {_cell(f.diagnostic)} | {_cell(f.kind)} | {_cell(f.error)} |" for f in report.failures]
        lines.append("")
    shown = [(k, report.settings[k]) for k in MAIN_SETTINGS if report.settings.get(k) is not None]
    if shown or report.mmdiag_version:
        lines += ["### Run", ""]
        lines += [f"- {k}: `{_cell(v_)}`" for k, v_ in shown]
        lines += [f"- mmdiag {report.mmdiag_version}, created {report.created}", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_markdown(report: Report, path: str | Path) -> Path:
    """Write ``report.md`` atomically."""
    path = Path(path)
    write_atomic(path, render_markdown(report))
    return path
