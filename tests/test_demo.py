"""The embedded demo, end to end (trains the demo model: about half a minute on two cores)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmdiag.cli.app import app


@pytest.mark.slow
def test_demo_end_to_end_names_audio_and_its_next_commands_run_as_printed(tmp_path, monkeypatch):
    """The demo is a first step: it leaves a model, data and a config, and the two commands it
    prints at the end work on them as they are (run from the same folder)."""
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["demo"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "mmdiag-demo" / "report.json").read_text())
    assert report["verdict"]["dominant"] == "audio"
    assert "visual" in report["verdict"]["underused"]
    assert report["verdict"]["recommended_fix"]
    assert report["accuracy"] > 0.9
    verdict_line = next(x for x in res.output.splitlines() if x.startswith("verdict:"))
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert verdict_line in readme, "README quotes a verdict the demo does not print"
    for name in ("model.pt", "train.npz", "val.npz", "mmdiag.toml", "report.html"):
        assert (tmp_path / "mmdiag-demo" / name).is_file(), name
    lines = res.output.splitlines()
    commands = [line.strip() for line in lines[lines.index(next(x for x in lines if x.strip() == "then try:")) + 1:]]
    assert [c.split()[:2] for c in commands] == [["mmdiag", "analyze"], ["mmdiag", "rebalance"]]
    analysed = CliRunner().invoke(app, shlex.split(commands[0])[1:])
    assert analysed.exit_code == 0, analysed.output
    again = json.loads((tmp_path / "mmdiag-demo" / "analysis" / "report.json").read_text())
    assert again["verdict"] == report["verdict"]  # the saved model is the analysed one
    rebalanced = CliRunner().invoke(app, shlex.split(commands[1])[1:])
    assert rebalanced.exit_code == 0, rebalanced.output
    assert (tmp_path / "mmdiag-demo" / "rebalanced" / "after" / "report.json").is_file()


@pytest.mark.slow
def test_demo_with_balancing_noise_claims_no_strong_dominance(tmp_path):
    res = CliRunner().invoke(app, ["demo", "--snr-db", "-5", "--out", str(tmp_path / "demo")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["verdict"]["severity"] != "strong"
    shares = report["diagnostics"]["balance"]["per_modality"]
    assert abs(shares["audio"] - shares["visual"]) < 0.25
