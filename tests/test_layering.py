"""The import layering of the architecture, checked from the source's imports.

The layers are stated once, in :data:`LAYERS` below; ARCHITECTURE.md ("Dependency direction")
explains them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "mmdiag"

# The layer of each top-level module or package of mmdiag. A module may import from its own layer
# and the layers below it, never from a higher one.
LAYERS = {
    # errors and the version string
    "errors": 0, "_version": 0,
    # shared helpers: registries, statistics, the atomic writer, settings schemas, tensor and rule utilities
    "registry": 1, "stats": 1, "deployment": 1, "io": 1, "validation": 1, "tensors": 1, "gate_rules": 1,
    # the model adapter, evidence, the report, loading, where mmdiag runs, and the demo data
    "adapter": 2, "categorical": 2, "detect": 2, "pooling": 2, "replay": 2,
    "evidence": 2, "report": 2, "report_text": 2, "loading": 2, "runtime": 2, "examples_data": 2,
    # diagnostics, fixes and the verdict
    "diagnostics": 3, "fixes": 3, "verdict": 3,
    # running the model (collection, training), rendering, comparing and gating reports
    "collect": 4, "train": 4, "specs": 4, "render": 4, "gate": 4, "gate_annotations": 4, "compare": 4, "deploy": 4,
    # the library's entry points
    "api": 5, "rebalance": 6, "acquire": 6, "demo": 6,
    # adapters to other frameworks (optional dependencies imported only here)
    "integrations": 7,
    "cli": 8, "__main__": 9, "__init__": 9,
}
WHERE = "LAYERS in tests/test_layering.py (ARCHITECTURE.md, \"Dependency direction\")"

# third-party libraries allowed only in some layers
ONLY_IN = {
    "matplotlib": {"render"},
    "typer": {"cli"},
    "rich": {"cli"},
    "captum": {"collect"},
    "lightning": {"integrations"},
    "pytorch_lightning": {"integrations"},
    "transformers": {"integrations"},
    "accelerate": {"integrations"},
    "tensorboard": {"integrations"},
    "mlflow": {"integrations"},
    "wandb": {"integrations"},
}
# mmdiag modules that only some others may import: the demo data stays apart from the core
IMPORTED_ONLY_BY = {"examples_data": {"demo"}}


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
    assert top in LAYERS, f"mmdiag/{top} has no layer: give it one in {WHERE}"
    for name in imports_of(path):
        parts = name.split(".")
        if parts[0] == "mmdiag" and len(parts) > 1:
            target = parts[1]
            if target == top:
                continue
            assert LAYERS[target] <= LAYERS[top], (
                f"{path.relative_to(ROOT)} (layer {LAYERS[top]}) imports {name} (layer {LAYERS[target]}, higher); "
                f"see {WHERE}")
            if target in IMPORTED_ONLY_BY:
                assert top in IMPORTED_ONLY_BY[target], (
                    f"{path.relative_to(ROOT)} imports {name}; only {sorted(IMPORTED_ONLY_BY[target])} may")
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


def test_only_runtime_imports_torch_distributed():
    """One distributed layer: process groups, ranks and collectives go through mmdiag.runtime."""
    for path, top in modules():
        if top == "runtime":
            continue
        for name in imports_of(path):
            assert not name.startswith("torch.distributed"), (
                f"{path.relative_to(ROOT)} imports {name}; use mmdiag.runtime.distributed")


def test_the_core_and_the_cli_import_no_optional_integration():
    """`import mmdiag` and loading the CLI must stay light: the optional libraries load only when used."""
    import subprocess
    import sys

    optional = ("lightning", "transformers", "accelerate", "mlflow", "wandb", "tensorboard")
    code = ("import sys, mmdiag, mmdiag.cli.app; "
            f"print(','.join(m for m in {optional!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"imported at start-up: {out.stdout.strip()}"
