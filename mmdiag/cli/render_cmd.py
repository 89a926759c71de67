"""``mmdiag render``: re-render a stored report.json as HTML, Markdown, CSV and plots."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mmdiag.cli.common import console, handle_errors


@handle_errors
def render(
    report: Path = typer.Argument(..., metavar="REPORT", help="The report.json to render."),
    format: str = typer.Option("html,md,csv,png", "--format", "-f",
                               help="Comma-separated outputs: html, md, csv, png, json."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default: the report's folder)."),
    dpi: int = typer.Option(90, "--dpi", help="Resolution of the plots (90 keeps report.html small)."),
) -> None:
    """Re-render a stored report.json (no model needed)."""
    from mmdiag.errors import ConfigError
    from mmdiag.render import parse_formats, write_outputs
    from mmdiag.report import Report

    formats = parse_formats(format)
    if dpi < 20 or dpi > 600:
        raise ConfigError(f"--dpi must be between 20 and 600; found {dpi}.")
    the_report = Report.load(report)
    out_dir = out if out is not None else report.parent
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} exists and is not a folder. Choose another --out.")
    paths = write_outputs(the_report, out_dir, formats=formats, dpi=dpi)
    plots = [p for p in paths if p.parent.name == "plots"]
    others = [p for p in paths if p.parent.name != "plots"]
    for p in others:
        console.print(f"wrote {p}", highlight=False)
    if plots:
        console.print(f"wrote {len(plots)} plots to {plots[0].parent}", highlight=False)
