"""The rich summary table and verdict line printed after an analysis."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mmdiag.cli.common import print_table
from mmdiag.cli.flags import to_cli
from mmdiag.report import Report
from mmdiag.report_text import legend, summary_rows, summary_text, verdict_lines


def summary_table(report: Report, width: int | None = None) -> Table:
    """Diagnostics as rows (the verdict's evidence first), modalities as columns: value [low, high].

    When the one-line table is wider than ``width``, each interval (and a "too wide" mark, and a
    row's kind of cells) goes on a line of its own and the frame is dropped, so two or three
    modalities fit 80 columns; a table that still does not fit is printed whole, never cut.
    """
    rows = summary_rows(report)
    one_line = sum(max(len(r[i]) for r in rows) + 3 for i in range(len(rows[0]))) + 1
    narrow = width is not None and one_line > width
    table = Table(title=f"mmdiag: {report.n_samples} samples, fused accuracy {report.accuracy:.3f}",
                  title_justify="left", box=box.SIMPLE_HEAD if narrow else box.HEAVY_HEAD,
                  pad_edge=not narrow)
    table.add_column(rows[0][0], style="bold", no_wrap=True)
    for header in rows[0][1:]:
        table.add_column(escape(header), justify="right", no_wrap=True)
    failed = {f.diagnostic for f in report.failures}
    for row in rows[1:]:
        style = "dim" if row[0] in failed else None
        cells = [c.replace(" [", "\n[", 1).replace(" (", "\n(", 1) if narrow else c for c in row[2:]]
        head = row[1].replace(" ", "\n", 1) if narrow else row[1]
        label = row[0].replace(" (", "\n(", 1) if narrow else row[0]
        table.add_row(escape(label), escape(head), *(escape(c) for c in cells), style=style)
    return table


def print_summary(report: Report, console: Console, html_path: str | None = None) -> None:
    """The table and its legend, failed/skipped diagnostics with reasons, the verdict with its
    reasons, and where the HTML report is. A console that is not a terminal (a CI log) gets the
    same as plain full-width text: nothing wrapped one word a line, no key cut short."""
    if not console.is_terminal:
        text = summary_text(report, html_path)
        for line in text.splitlines():
            console.print(to_cli(line), markup=False, highlight=False, soft_wrap=True)
        return
    print_table(console, summary_table(report, console.width))
    console.print(f"[dim]{escape(legend(report))}[/]", highlight=False)
    for f in report.failures:
        console.print(f"[dim]{f.diagnostic} {f.kind}: {escape(to_cli(f.error))}[/]", highlight=False)
    v = report.verdict
    colour = {"strong": "red", "mild": "yellow"}.get(v.severity, "green")
    head, *rest = verdict_lines(report, html_path)
    console.print(f"[bold {colour}]verdict:[/] {escape(head.removeprefix('verdict: '))}", highlight=False)
    for line in rest:
        console.print(escape(line), highlight=False)


def print_warnings(report: Report, console: Console, said: tuple[str | None, ...] = ()) -> None:
    """One line per change of method, chance-level accuracy, and skipped diagnostic (on stderr);
    notes in ``said`` were printed earlier in the run and are not repeated."""
    for note in report.notes:
        if note in said:
            continue
        console.print(f"[bold yellow]warning:[/] {escape(to_cli(note))}", highlight=False, soft_wrap=True)
    for f in report.failures:
        if f.kind == "skipped":
            console.print(f"[bold yellow]warning:[/] {escape(f.diagnostic)} skipped: {escape(to_cli(f.error))}",
                          highlight=False, soft_wrap=True)


def print_details(report: Report, console: Console) -> None:
    """What was detected and how the model was driven (``--verbose``), one line each."""
    adapter = report.settings.get("adapter") or {}
    lines = [f"mask: {report.settings.get('mask')} at the {report.settings.get('mask_at')} level"]
    lines += [str(n) for n in adapter.get("notes") or []]
    for m, text in (adapter.get("pooling") or {}).items():
        lines.append(f"pooling of {m}: {text}")
    layout = report.settings.get("checkpoint_layout")
    if layout:
        stripped = report.settings.get("checkpoint_prefix_stripped")
        lines.append(f"checkpoint layout: {layout}" + (f", prefix {stripped!r} stripped" if stripped else ""))
    for line in lines:
        console.print(f"[dim]info: {escape(to_cli(line))}[/]", highlight=False, soft_wrap=True)
