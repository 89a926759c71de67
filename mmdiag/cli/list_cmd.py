"""``mmdiag list``: the registered diagnostics (and fixes), plug-ins included, with what they declare."""

from __future__ import annotations

import typer
from rich.markup import escape
from rich.table import Table

from mmdiag.cli.common import console, err_console, handle_errors


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


@handle_errors
def list_command(
    what: str = typer.Argument("diagnostics", help="diagnostics or fixes"),
) -> None:
    """List diagnostics (or fixes), plug-ins included, with what they measure and what they need."""
    if what.startswith("diag"):
        table, skipped = _diagnostics_table()
    elif what.startswith("fix"):
        table, skipped = _fixes_table()
    else:
        from mmdiag.errors import ConfigError

        raise ConfigError(f"mmdiag list takes 'diagnostics' or 'fixes'; found {what!r}.")
    console.print(table)
    for name, why in skipped.items():
        err_console.print(f"[bold yellow]skipped plug-in[/] {escape(name)}: {escape(why)}", highlight=False,
                          soft_wrap=True)
