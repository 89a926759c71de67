"""The embedded demo, end to end (trains the demo model: about half a minute on two cores)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from mmdiag.cli.app import app


@pytest.mark.slow
def test_demo_end_to_end_names_audio(tmp_path):
    res = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["verdict"]["dominant"] == "audio"
    assert "visual" in report["verdict"]["underused"]
    assert report["verdict"]["recommended_fix"]
    assert report["accuracy"] > 0.9


@pytest.mark.slow
def test_demo_with_balancing_noise_claims_no_strong_dominance(tmp_path):
    res = CliRunner().invoke(app, ["demo", "--snr-db", "-5", "--out", str(tmp_path / "demo")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["verdict"]["severity"] != "strong"
    shares = report["diagnostics"]["balance"]["per_modality"]
    assert abs(shares["audio"] - shares["visual"]) < 0.25
