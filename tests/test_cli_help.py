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
