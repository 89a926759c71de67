"""Tables in a CI log (a console that is not a terminal) keep every key and value whole."""

from __future__ import annotations

import io

from rich.console import Console
from rich.table import Table

from mmdiag.cli.common import print_table


def _table() -> Table:
    table = Table(title="comparison")
    for name in ("value", "better", "before", "after", "baseline", "after-before", "after-baseline"):
        table.add_column(name)
    table.add_row("gradient_conflict.visual", "higher: less conflict", "-0.502", "0.613", "0.455", "+1.115*", "+0.158")
    return table


def test_a_log_gets_the_whole_table_at_its_natural_width() -> None:
    buf = io.StringIO()
    log = Console(file=buf, width=80, force_terminal=False)
    print_table(log, _table())
    text = buf.getvalue()
    for cell in ("gradient_conflict.visual", "higher: less conflict", "-0.502", "+1.115*", "after-baseline"):
        assert cell in text
    assert "…" not in text
    assert log.width == 80  # restored


def test_a_terminal_wide_enough_keeps_its_own_width() -> None:
    buf = io.StringIO()
    term = Console(file=buf, width=140, force_terminal=True, color_system=None)
    print_table(term, _table())
    assert max(len(line) for line in buf.getvalue().splitlines()) <= 140 and "…" not in buf.getvalue()


def test_a_narrow_terminal_never_cuts_a_number_or_key() -> None:
    buf = io.StringIO()
    term = Console(file=buf, width=60, force_terminal=True, color_system=None)
    print_table(term, _table())
    text = buf.getvalue()
    assert "…" not in text
    for cell in ("gradient_conflict.visual", "higher: less conflict", "-0.502", "+1.115*", "+0.158"):
        assert cell in text
    assert term.width == 60
