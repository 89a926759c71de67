"""The rendered help text: literal config table names, no type placeholders, -h and -V."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from mmdiag.cli.app import app
from mmdiag.registry import unknown_name_message

runner = CliRunner()


def test_help_keeps_config_table_names_and_has_no_type_placeholders():
    text = runner.invoke(app, ["analyze", "--help"]).output
    assert "[gate]" in text
    assert "<bool>" not in text and "<list[str]>" not in text
    assert "MODALITY=MODULE" in text
    assert "[tool.mmdiag]" in runner.invoke(app, ["analyze", "--help"], terminal_width=200).output + \
        runner.invoke(app, ["gate", "--help"], terminal_width=200).output + \
        runner.invoke(app, ["rebalance", "--help"], terminal_width=200).output


@pytest.mark.parametrize("command", ["analyze", "rebalance", "gate", "render", "compare", "list", "demo"])
def test_short_help_alias(command):
    res = runner.invoke(app, [command, "-h"])
    assert res.exit_code == 0 and "Usage:" in res.output


def test_version_alias_and_completion():
    assert runner.invoke(app, ["-V"]).output.startswith("mmdiag ")
    assert "--install-completion" in runner.invoke(app, ["--help"]).output


def test_unknown_fix_message_spells_fixes():
    assert "Known fixes:" in unknown_name_message("fix", "ogmge", ["ogm_ge"])


def test_ctrl_c_while_the_command_line_starts_prints_no_traceback() -> None:
    """A KeyboardInterrupt raised while ``mmdiag`` imports its modules (simulated in the import of
    mmdiag.api) ends with "interrupted" and exit code 130; imported as a library it propagates."""
    import subprocess
    import sys

    script = ("import builtins, sys\n"
              "sys.argv = [sys.argv[1]]\n"
              "real = builtins.__import__\n"
              "def fake(name, *args, **kwargs):\n"
              "    if name == 'mmdiag.api':\n"
              "        raise KeyboardInterrupt\n"
              "    return real(name, *args, **kwargs)\n"
              "builtins.__import__ = fake\n"
              "import mmdiag\n")
    cli = subprocess.run([sys.executable, "-c", script, "mmdiag"], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 130 and cli.stderr.strip() == "interrupted", cli.stderr
    library = subprocess.run([sys.executable, "-c", script, "my_notebook"], capture_output=True, text=True, timeout=120)
    assert library.returncode != 130 and "KeyboardInterrupt" in library.stderr
