"""The ``mmdiag`` command: one typer app, one module per command."""

from __future__ import annotations

from typing import Optional

import typer

from mmdiag._version import __version__
from mmdiag.cli.acquire_cmd import HELP as ACQUIRE_HELP
from mmdiag.cli.acquire_cmd import acquire
from mmdiag.cli.analyze import HELP as ANALYZE_HELP
from mmdiag.cli.analyze import analyze
from mmdiag.cli.common import STATE, console
from mmdiag.cli.compare_cmd import compare
from mmdiag.cli.demo import demo
from mmdiag.cli.gate_cmd import HELP as GATE_HELP
from mmdiag.cli.gate_cmd import gate
from mmdiag.cli.list_cmd import list_command
from mmdiag.cli.rebalance_cmd import HELP as REBALANCE_HELP
from mmdiag.cli.rebalance_cmd import rebalance
from mmdiag.cli.render_cmd import render

app = typer.Typer(
    name="mmdiag",
    help="Diagnose, fix and gate modality imbalance in multimodal classifiers.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
    pretty_exceptions_enable=False,
    # plain help text: rich markup would eat "[gate]" and "[tool.mmdiag]" and print <bool> metavars
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        console.print(f"mmdiag {__version__}")
        raise typer.Exit(0)


@app.callback()
def root(
    version: Optional[bool] = typer.Option(None, "--version", "-V", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks of errors."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also print what was detected (call convention, encoders, pooling, checkpoint layout)."),
) -> None:
    """mmdiag: diagnose, fix and gate modality imbalance."""
    STATE["debug"] = debug
    STATE["verbose"] = verbose


app.command("analyze", help=ANALYZE_HELP)(analyze)
app.command("list")(list_command)
app.command("demo")(demo)
app.command("rebalance", help=REBALANCE_HELP)(rebalance)
app.command("gate", help=GATE_HELP)(gate)
app.command("render")(render)
app.command("compare")(compare)
app.command("acquire", help=ACQUIRE_HELP)(acquire)


def main() -> None:
    """Console-script entry point."""
    app()
