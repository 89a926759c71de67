"""compare: value-by-value differences between two reports, and `mmdiag compare`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
from typer.testing import CliRunner

from mmdiag.cli.app import app
from mmdiag.compare import compare, compare_document, compare_frame
from mmdiag.report import Report, Result

from tests.test_render import assert_real_png, synthetic_report


def pair() -> tuple[Report, Report]:
    a = synthetic_report(2, seed=0, with_failures=False)
    b = synthetic_report(2, seed=1, shift=0.4, with_failures=False)
    return a, b


def test_rows_cover_every_headline_and_modality() -> None:
    a, b = pair()
    rows = compare(a, b)
    keys = [r.key for r in rows]
    assert keys[0] == "accuracy"
    for name, res in a.diagnostics.items():
        assert name in keys
        for m in res.per_modality:
            assert f"{name}.{m}" in keys
    row = next(r for r in rows if r.key == "shapley.audio")
    assert math.isclose(row.diff, b.diagnostics["shapley"].per_modality["audio"] - a.diagnostics["shapley"].per_modality["audio"])
    assert row.ci_a_low == a.diagnostics["shapley"].ci["audio"][0]


def test_separated_means_the_intervals_do_not_overlap() -> None:
    a, b = pair()
    x = Result("x", 0.5, {"audio": 0.5, "visual": 0.5, "depth": 0.5},
               ci={"audio": [0.4, 0.6], "visual": [0.4, 0.6], "depth": [0.4, 0.6]})
    y = Result("x", 0.5, {"audio": 0.9, "visual": 0.55, "depth": 0.7},
               ci={"audio": [0.85, 0.95], "visual": [0.5, 0.6], "depth": [0.6, 0.8]})
    a.diagnostics = {"x": x}
    b.diagnostics = {"x": y, "only_b": Result("only_b", 1.0, {})}
    rows = {r.key: r for r in compare(a, b)}
    assert rows["x.audio"].separated is True
    assert rows["x.visual"].separated is False
    assert rows["x.depth"].separated is False  # touching at 0.6 counts as overlapping
    assert rows["x"].separated is None  # no headline intervals
    assert rows["only_b"].value_a is None and rows["only_b"].diff is None
    doc = compare_document(a, b)
    assert doc["only_in_b"] == ["only_b"] and doc["n_separated"] == 1


def test_cli_compare_writes_csv_json_and_chart(tmp_path: Path) -> None:
    a, b = pair()
    a.save(tmp_path / "a.json")
    b.save(tmp_path / "b.json")
    res = CliRunner().invoke(app, ["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                                   "--out", str(tmp_path / "cmp"), "--label-a", "before", "--label-b", "after"])
    assert res.exit_code == 0, res.output
    assert "shapley.audio" in res.output and "separated" in res.output
    frame = pd.read_csv(tmp_path / "cmp" / "compare.csv")
    assert list(frame.columns)[:6] == ["key", "diagnostic", "modality", "value_a", "value_b", "diff"]
    assert len(frame) == len(compare(a, b))
    doc = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert doc["a"] == "before" and doc["verdict"]["a"]["severity"] == "mild"
    assert_real_png((tmp_path / "cmp" / "compare.png").read_bytes())
    as_json = CliRunner().invoke(app, ["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--json"])
    assert as_json.exit_code == 0 and json.loads(as_json.stdout)["rows"]
    missing = CliRunner().invoke(app, ["compare", str(tmp_path / "a.json"), str(tmp_path / "nope.json")])
    assert missing.exit_code == 2


def test_frame_matches_rows() -> None:
    a, b = pair()
    rows = compare(a, b)
    frame = compare_frame(rows)
    assert frame["key"].tolist() == [r.key for r in rows]
