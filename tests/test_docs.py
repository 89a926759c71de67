"""Docs stay in step with the code: a page per diagnostic and fix, and a current CLI reference."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from mmdiag.diagnostics import DIAGNOSTICS
from mmdiag.fixes import FIXES

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", DIAGNOSTICS.names())
def test_every_diagnostic_has_a_page(name):
    page = ROOT / "docs" / "diagnostics" / f"{name}.md"
    assert page.is_file(), f"write {page.relative_to(ROOT)}"
    assert len(page.read_text()) > 400


@pytest.mark.parametrize("name", [n for n in FIXES.names() if n != "none"])
def test_every_fix_has_a_page(name):
    page = ROOT / "docs" / "fixes" / f"{name}.md"
    assert page.is_file(), f"write {page.relative_to(ROOT)}"


def test_cli_reference_is_current():
    spec = importlib.util.spec_from_file_location("gen_cli_docs", ROOT / "tools" / "gen_cli_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert (ROOT / "docs" / "cli.md").read_text() == mod.render(), "run: python tools/gen_cli_docs.py"
