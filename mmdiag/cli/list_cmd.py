"""``mmdiag list``: the registered diagnostics (and fixes), plug-ins included, with what they declare."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from mmdiag.cli.common import console, err_console, handle_errors, print_table


def _diagnostics_table() -> tuple[Table, dict[str, str]]:
    from mmdiag.diagnostics import DIAGNOSTICS
    from mmdiag.verdict import fixes_for

    table = Table("name", "measures", "per modality", "needs", "default", "argues for",
                  title="diagnostics", title_justify="left")
    for cls in DIAGNOSTICS.classes():
        lines = [cls.scale] if cls.scale else []
        lines += [f"higher: {cls.higher_means}"] if cls.higher_means else []
        lines += ["(contribution measure)"] if cls.contribution else []
        fixes = dict.fromkeys(f for problem in cls.argues_for for f in fixes_for(problem))
        table.add_row(escape(cls.name), escape(cls.summary), escape("\n".join(lines)) or "-",
                      ", ".join(sorted(cls.needs)) or "-", "yes" if cls.default else "no", ", ".join(fixes) or "-")
    return table, DIAGNOSTICS.skipped


def _fixes_table() -> tuple[Table, dict[str, str]]:
    from mmdiag.fixes import FIXES

    table = Table("name", "changes", "targets", "needs encoders", title="fixes", title_justify="left")
    for cls in FIXES.classes():
        table.add_row(escape(cls.name), escape(cls.summary), ", ".join(cls.targets) or "-",
                      "yes" if cls.needs_encoders else "no")
    return table, FIXES.skipped


def registry_json(what: str) -> list[dict[str, Any]]:
    """The registered diagnostics or fixes and their declared metadata, as JSON-safe dicts."""
    if what.startswith("diag"):
        from mmdiag.diagnostics import DIAGNOSTICS

        return [{"name": c.name, "summary": c.summary, "headline": c.headline, "scale": c.scale,
                 "higher_means": c.higher_means, "contribution": c.contribution, "needs": sorted(c.needs),
                 "default": c.default, "argues_for": list(c.argues_for), "params": c.param_names()}
                for c in DIAGNOSTICS.classes()]
    from mmdiag.fixes import FIXES

    return [{"name": c.name, "summary": c.summary, "targets": list(c.targets),
             "needs_encoders": c.needs_encoders} for c in FIXES.classes()]


@handle_errors
def list_command(
    what: str = typer.Argument("diagnostics", help="diagnostics or fixes"),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list (name and declared metadata) instead of a table."),
) -> None:
    """List diagnostics (or fixes), plug-ins included, with what they measure and what they need."""
    if as_json and (what.startswith("diag") or what.startswith("fix")):
        typer.echo(json.dumps(registry_json(what), indent=2))
        return
    if what.startswith("diag"):
        table, skipped = _diagnostics_table()
    elif what.startswith("fix"):
        table, skipped = _fixes_table()
    else:
        from mmdiag.errors import ConfigError

        raise ConfigError(f"mmdiag list takes 'diagnostics' or 'fixes'; found {what!r}.")
    print_table(console, table)
    for name, why in skipped.items():
        err_console.print(f"[bold yellow]skipped plug-in[/] {escape(name)}: {escape(why)}", highlight=False,
                          soft_wrap=True)
