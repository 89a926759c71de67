"""``mmdiag compare``: the differences between two reports, value by value, with intervals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from mmdiag.cli.common import console, handle_errors, print_table


def _f(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.3f}" if signed else f"{v:.3f}"


def _ci(lo: float | None, hi: float | None) -> str:
    return "" if lo is None or hi is None else f" [{lo:.2f}, {hi:.2f}]"


@handle_errors
def compare(
    a: Path = typer.Argument(..., metavar="REPORT_A", help="The first report.json (e.g. before retraining)."),
    b: Path = typer.Argument(..., metavar="REPORT_B", help="The second report.json (e.g. after retraining)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write compare.csv, compare.json and compare.png here."),
    label_a: str = typer.Option("A", "--label-a", help="Name of the first report in the outputs."),
    label_b: str = typer.Option("B", "--label-b", help="Name of the second report in the outputs."),
    as_json: bool = typer.Option(False, "--json", help="Print compare.json to stdout instead of a table."),
) -> None:
    """Compare two reports: every headline and per-modality value, differences and whether intervals separate."""
    from mmdiag.compare import compare as compare_reports
    from mmdiag.compare import compare_document, compare_frame
    from mmdiag.errors import ConfigError
    from mmdiag.io import write_atomic
    from mmdiag.report import Report

    ra, rb = Report.load(a), Report.load(b)
    rows = compare_reports(ra, rb)
    doc = compare_document(ra, rb, rows, label_a=label_a, label_b=label_b)
    written: list[Path] = []
    if out is not None:
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out} exists and is not a folder. Choose another --out.")
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "compare.csv", compare_frame(rows).to_csv(index=False))
        write_atomic(out / "compare.json", json.dumps(doc, indent=2) + "\n")
        written += [out / "compare.csv", out / "compare.json"]
        from mmdiag.render.plots import plot_before_after

        png = plot_before_after(rows, out / "compare.png", labels=(label_a, label_b),
                                modalities=list(ra.modalities) + [m for m in rb.modalities if m not in ra.modalities])
        if png is not None:
            written.append(png)
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
        return
    table = Table(title=escape(f"{label_a}: {a}  vs  {label_b}: {b}"), title_justify="left")
    table.add_column("key", style="bold")
    table.add_column(escape(f"{label_a} [95% interval]"), justify="right")
    table.add_column(escape(f"{label_b} [95% interval]"), justify="right")
    table.add_column("difference", justify="right")
    table.add_column("separated", justify="center")
    for r in rows:
        sep = {True: "[bold]yes[/]", False: "no", None: "-"}[r.separated]
        table.add_row(escape(r.key), escape(_f(r.value_a) + _ci(r.ci_a_low, r.ci_a_high)),
                      escape(_f(r.value_b) + _ci(r.ci_b_low, r.ci_b_high)), _f(r.diff, signed=True), sep)
    print_table(console, table)
    va, vb = ra.verdict, rb.verdict
    console.print(f"verdict {label_a}: {va.headline()}", highlight=False)
    console.print(f"verdict {label_b}: {vb.headline()}", highlight=False)
    n_sep = sum(r.separated is True for r in rows)
    console.print(f"{n_sep} of {sum(r.separated is not None for r in rows)} values with intervals changed by more "
                  "than their intervals (separated = the two 95% intervals do not overlap).", highlight=False)
    for only, side in ((doc["only_in_a"], label_a), (doc["only_in_b"], label_b)):
        if only:
            console.print(f"[dim]only in {side}: {', '.join(only)}[/]", highlight=False)
    for p in written:
        console.print(f"[dim]wrote {p}[/]", highlight=False)
