"""The benchmark harness runs at tiny sizes and writes every table (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_quick_writes_every_table(tmp_path):
    spec = importlib.util.spec_from_file_location("_mmdiag_bench", ROOT / "benchmarks" / "run.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up while the class is built
    spec.loader.exec_module(bench)
    bench.main(["--quick", "--out", str(tmp_path)])
    text = (tmp_path / "results.md").read_text()
    for header in bench.HEADERS:
        assert header in text, header
    assert "cpu_count" in text and "torch" in text
    assert (tmp_path / "results.png").stat().st_size > 1000
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["cost"]["rows"] and res["subsets"] and res["fixes"]["rows"] and res["scaling"]
    # the two ways of evaluating subsets agree (the harness asserts allclose; the diff is reported)
    assert all(r["max_abs_diff"] < 1e-5 for r in res["subsets"])
    assert any(r["fix"] == "none" and "step_ms" in r for r in res["fixes"]["rows"])
    if not res["machine"]["cuda_available"]:
        assert "no GPU available: skipped" in text
