"""``mmdiag list``: the registered diagnostics (and fixes) with one-line descriptions."""

from __future__ import annotations

import typer
from rich.table import Table

from mmdiag.cli.common import console, handle_errors


@handle_errors
def list_command(
    what: str = typer.Argument("diagnostics", help="diagnostics or fixes"),
) -> None:
    """List diagnostics (or fixes) with what they measure and what they need."""
    if what.startswith("diag"):
        from mmdiag.diagnostics import DIAGNOSTICS

        table = Table("name", "measures", "needs", "default", title="diagnostics", title_justify="left")
        for name in DIAGNOSTICS.names():
            cls = DIAGNOSTICS.get(name)
            table.add_row(name, cls.summary, ", ".join(sorted(cls.needs)) or "-", "yes" if cls.default else "no")
    elif what.startswith("fix"):
        from mmdiag.fixes import FIXES

        table = Table("name", "changes", title="fixes", title_justify="left")
        for name in FIXES.names():
            table.add_row(name, FIXES.get(name).summary)
    else:
        from mmdiag.errors import ConfigError

        raise ConfigError(f"mmdiag list takes 'diagnostics' or 'fixes'; found {what!r}.")
    console.print(table)
