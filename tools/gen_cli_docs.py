"""Regenerate docs/cli.md from the typer app (run: python tools/gen_cli_docs.py).

tests/test_docs.py fails when docs/cli.md is out of date, so the reference never drifts.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import typer

from mmdiag.cli.app import app

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def render() -> str:
    group = typer.main.get_command(app)
    lines = ["# CLI reference", "", "Generated from the command definitions by `tools/gen_cli_docs.py`.", "",
             "Exit codes: 0 success; 1 a gate rule failed; 2 a usage, config or load error (a one-paragraph",
             "message, no traceback unless `--debug`).", "", "Global options: `--version`, `--debug`.", ""]
    for name in sorted(group.commands):
        cmd = group.commands[name]
        lines += [f"## `mmdiag {name}`", "", inspect.cleandoc(cmd.help or "").split("\n\n")[0], "",
                  "| option | default | meaning |", "|---|---|---|"]
        for p in cmd.params:
            if p.name == "help":
                continue
            flags = ", ".join(f"`{o}`" for o in (p.opts + p.secondary_opts)) if p.opts and p.opts[0].startswith("-") else f"`{p.name.upper()}`"
            default = p.default if p.default not in (None, (), []) else ""
            if callable(default):
                default = ""
            text = (getattr(p, "help", None) or "").replace("|", "\\|")
            lines.append(f"| {flags} | {default} | {text} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    DOC.write_text(render())
    sys.stdout.write(f"wrote {DOC}\n")
