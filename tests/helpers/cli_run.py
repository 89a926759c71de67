"""Run the ``mmdiag`` CLI in-process (typer's runner), optionally from another working folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from mmdiag.cli.app import app

runner = CliRunner()


def run(args: list[str], cwd: Path | str | None = None) -> Any:
    """``mmdiag ARGS`` run in ``cwd`` (the current folder when None); typer's ``Result``."""
    old = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        return runner.invoke(app, [str(a) for a in args])
    finally:
        os.chdir(old)
