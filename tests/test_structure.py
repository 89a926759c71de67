"""The size limits of the house style: no module of mmdiag over 500 lines, no function body over 100.

A function's body is counted from its first statement after the signature (a typer command's
signature is one line per option), to its last line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mmdiag"
MODULE_LINES = 500
BODY_LINES = 100
MODULES = sorted(PACKAGE.rglob("*.py"))


def body_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the first statement of ``fn``'s body (its docstring included) to its end."""
    return (fn.end_lineno or fn.lineno) - fn.body[0].lineno + 1


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_and_function_sizes(path: Path) -> None:
    text = path.read_text()
    assert len(text.splitlines()) <= MODULE_LINES, f"{path.name} has {len(text.splitlines())} lines; split it"
    long = [(n.name, body_lines(n)) for n in ast.walk(ast.parse(text))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and body_lines(n) > BODY_LINES]
    assert not long, f"functions of {path.name} over {BODY_LINES} lines: {long}"


def test_the_check_counts_bodies_not_signatures() -> None:
    source = "def f(\n    a,\n    b,\n):\n    x = 1\n    return x\n"
    fn = ast.parse(source).body[0]
    assert isinstance(fn, ast.FunctionDef) and body_lines(fn) == 2
