"""Gate outcomes as GitHub Actions workflow commands (annotations on the run's summary page).

``::error title=...::message`` for a failed rule or one the report cannot answer, ``::warning``
for a rule that only warns, ``::notice`` for the closing count. The values are escaped as the
workflow-command syntax requires (``%``, CR and LF in messages; also ``:`` and ``,`` in properties).
"""

from __future__ import annotations

from typing import Any

from mmdiag.gate import value_text

_LEVEL = {"FAIL": "error", "ERROR": "error", "WARN": "warning"}


def annotation_data(text: str) -> str:
    """``text`` escaped as the message of a GitHub Actions workflow command."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _prop(text: str) -> str:
    return annotation_data(text).replace(":", "%3A").replace(",", "%2C")


def to_github(result: Any, file: str | None = None) -> str:
    """One workflow command per rule that did not pass, then a notice with the counts.

    ``file`` (the report's path) is attached to each annotation so GitHub links to it.
    """
    lines = []
    where = f",file={_prop(file)}" if file else ""
    for o in result.outcomes:
        level = _LEVEL.get(o.status)
        if level is None:
            continue
        title = _prop(f"mmdiag gate {o.status}: {o.rule}")
        lines.append(f"::{level} title={title}{where}::{annotation_data(f'measured {value_text(o)}; {o.message}')}")
    counts = ", ".join(f"{result.count(s)} {s.lower()}" for s in ("PASS", "WARN", "FAIL", "ERROR"))
    lines.append(f"::notice title=mmdiag gate::{annotation_data(f'{counts} (bound: {result.bound})')}")
    return "\n".join(lines)
