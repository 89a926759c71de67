"""The import layering of the architecture, checked from the source's imports.

cli -> api -> render | gate | train | collect -> diagnostics | fixes
    -> adapter | evidence | report | registry | stats | loading -> errors
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "mmdiag"

# layer number of each top-level module or package (higher may import lower, never the reverse)
LAYERS = {
    "errors": 0, "_version": 0,
    "registry": 1, "validation": 1, "stats": 1, "report": 1, "evidence": 1,
    "loading": 1, "adapter": 1, "synthetic": 1,
    "distributed": 1, "categorical": 1, "tensors": 1, "pooling": 1, "detect": 1, "replay": 1,
    "avdigits": 1, "demo_model": 1,
    "diagnostics": 2, "fixes": 2,
    "collect": 3, "render": 3, "gate": 3, "gate_rules": 3, "train": 3, "verdict": 3, "compare": 3,
    "api": 4, "rebalance": 5, "demo": 5,
    "cli": 6, "__main__": 7, "__init__": 7,
}

# third-party libraries allowed only in some layers
ONLY_IN = {
    "matplotlib": {"render"},
    "typer": {"cli"},
    "rich": {"cli"},
    "captum": {"collect"},
}


def modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        top = rel.parts[0].removesuffix(".py")
        yield path, top


def imports_of(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


@pytest.mark.parametrize("path,top", list(modules()), ids=lambda x: str(x) if isinstance(x, str) else x.name)
def test_imports_respect_layers(path, top):
    assert top in LAYERS, f"{top} has no layer: add it to LAYERS in this test and ARCHITECTURE's diagram"
    for name in imports_of(path):
        parts = name.split(".")
        if parts[0] == "mmdiag" and len(parts) > 1:
            target = parts[1]
            if target == top:
                continue
            assert LAYERS[target] <= LAYERS[top], f"{path.relative_to(ROOT)} imports {name} (a higher layer)"
            if top == "diagnostics":
                assert target not in {"adapter", "collect", "render", "cli"}
        lib = parts[0]
        if lib in ONLY_IN:
            assert top in ONLY_IN[lib], f"{path.relative_to(ROOT)} imports {lib}, allowed only in {ONLY_IN[lib]}"


def test_diagnostics_do_not_import_each_other():
    pkg = ROOT / "diagnostics"
    names = {p.stem for p in pkg.glob("*.py") if not p.stem.startswith("_") and p.stem != "base"}
    for path in pkg.glob("*.py"):
        for name in imports_of(path):
            parts = name.split(".")
            if parts[:2] == ["mmdiag", "diagnostics"] and len(parts) > 2:
                assert parts[2] not in names or parts[2] == path.stem, f"{path.name} imports {name}"
