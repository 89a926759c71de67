"""The rich summary table and verdict line printed after an analysis."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mmdiag.report import Report


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summary_table(report: Report) -> Table:
    """Diagnostics as rows, modalities as columns: value [low, high]."""
    table = Table(title=f"mmdiag: {report.n_samples} samples, fused accuracy {report.accuracy:.3f}",
                  title_justify="left")
    table.add_column("diagnostic", style="bold")
    table.add_column("headline", justify="right")
    for m in report.modalities:
        table.add_column(m, justify="right")
    for name, res in report.diagnostics.items():
        cells = []
        for m in report.modalities:
            v = res.per_modality.get(m)
            ci = res.ci.get(m) if res.ci else None
            interval = f" [{fmt(ci[0], 2)}, {fmt(ci[1], 2)}]" if ci and ci[0] is not None else ""
            cells.append(fmt(v) + interval)
        table.add_row(name, fmt(res.value), *cells)
    for f in report.failures:
        table.add_row(f"[dim]{f.diagnostic}[/]", f"[dim]{f.kind}[/]", *(["[dim]-[/]"] * len(report.modalities)))
    return table


def print_summary(report: Report, console: Console) -> None:
    """The table, skipped/failed diagnostics with reasons, and the one-line verdict."""
    console.print(summary_table(report))
    for f in report.failures:
        console.print(f"[dim]{f.diagnostic} {f.kind}: {escape(f.error)}[/]", highlight=False)
    v = report.verdict
    colour = {"strong": "red", "mild": "yellow"}.get(v.severity, "green")
    console.print(f"[bold {colour}]verdict:[/] {escape(v.headline())}", highlight=False)


def print_warnings(report: Report, console: Console) -> None:
    """One line per change of method, chance-level accuracy, and skipped diagnostic (on stderr)."""
    for note in report.notes:
        console.print(f"[bold yellow]warning:[/] {escape(note)}", highlight=False, soft_wrap=True)
    for f in report.failures:
        if f.kind == "skipped":
            console.print(f"[bold yellow]warning:[/] {escape(f.diagnostic)} skipped: {escape(f.error)}",
                          highlight=False, soft_wrap=True)
