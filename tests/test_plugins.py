"""A real third-party plug-in, end to end: tests/plugin_pkg installed with pip, then mmdiag run with it.

The package is installed into a temporary folder (``pip install --target``, no network, no build
isolation) that only the mmdiag processes started here see on their ``PYTHONPATH``: the virtual
environment that runs the tests, and so every other test, never sees the plug-in (a plug-in there
would join every registry-driven test: conformance, docs pages, the CLI reference). Its diagnostic and fix must
show up in ``mmdiag list``, in ``mmdiag analyze`` (report, HTML section and plot), in gate rules,
and in ``mmdiag rebalance --fix``, with no edit to mmdiag (docs/extending.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

PLUGIN = Path(__file__).resolve().parent / "plugin_pkg"
DIAG, FIX = "readout_confidence", "unimodal_aux"

MODELS_PY = textwrap.dedent('''
    import torch
    from torch import nn

    class TwoBranch(nn.Module):
        """Positional forward, encoders named like the modalities, concat head."""
        def __init__(self):
            super().__init__()
            self.audio_net = nn.Sequential(nn.Linear(6, 12), nn.ReLU())
            self.visual_net = nn.Sequential(nn.Linear(6, 12), nn.ReLU())
            self.fusion_head = nn.Linear(24, 3)
        def forward(self, audio, visual):
            return self.fusion_head(torch.cat([self.audio_net(audio), self.visual_net(visual)], 1))

    def build():
        torch.manual_seed(0)
        return TwoBranch()
''')


def _data(n: int, seed: int) -> dict[str, np.ndarray]:
    """Audio carries the label clearly, visual faintly."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 3, n)
    audio = rng.normal(size=(n, 6)).astype(np.float32)
    visual = rng.normal(size=(n, 6)).astype(np.float32)
    audio[np.arange(n), label] += 2.5
    visual[np.arange(n), label] += 0.5
    return {"audio": audio, "visual": visual, "label": label}


@pytest.fixture(scope="module")
def plugin_ws(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """(workspace, environment): the plug-in installed in ``site/``, a model factory and data."""
    ws = tmp_path_factory.mktemp("plugin")
    src = ws / "src"
    shutil.copytree(PLUGIN, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--quiet", "--target", str(ws / "site"), str(src)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert list((ws / "site").glob("mmdiag_example_plugin-*.dist-info/entry_points.txt"))
    (ws / "models.py").write_text(MODELS_PY)
    np.savez(ws / "train.npz", **_data(240, 0))
    np.savez(ws / "test.npz", **_data(160, 1))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ws / "site"), os.environ.get("PYTHONPATH", "")]),
           "COLUMNS": "200"}
    return ws, env


def mmdiag(ws: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmdiag", *args], cwd=ws, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_an_installed_plugin_is_listed_analysed_gated_and_trained(plugin_ws) -> None:
    ws, env = plugin_ws
    listed = mmdiag(ws, env, "list", "diagnostics")
    assert listed.returncode == 0, listed.stderr
    assert DIAG in listed.stdout and "shapley" in listed.stdout and "skipped" not in listed.stderr
    fixes = mmdiag(ws, env, "list", "fixes")
    assert fixes.returncode == 0 and FIX in fixes.stdout and "ignored_features" in fixes.stdout

    res = mmdiag(ws, env, "analyze", "--model", "models.py:build", "--data", "test.npz", "--only",
                 f"{DIAG},shapley", "--bootstrap", "50", "--device", "cpu", "--out", "an")
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads((ws / "an" / "report.json").read_text())
    got = report["diagnostics"][DIAG]
    assert set(got["per_modality"]) == {"audio", "visual"} and all(0 <= v <= 1 for v in got["per_modality"].values())
    assert got["ci"]["audio"][0] <= got["per_modality"]["audio"] <= got["ci"]["audio"][1]
    html = (ws / "an" / "report.html").read_text()
    assert f'id="diag-{DIAG}"' in html and "gives the model little to go on by itself" in html
    assert "Per modality: probability of the true class" in html
    assert (ws / "an" / "plots" / f"{DIAG}_bars.png").stat().st_size > 1000
    # a contribution measure: the verdict compares its ranking with shapley's
    assert any(DIAG in r for r in report["verdict"]["reasons"]), report["verdict"]["reasons"]

    passed = mmdiag(ws, env, "gate", "an/report.json", "--bound", "point", "--json",
                    "--rule", f"{DIAG}.audio >= 0", "--rule", f"{DIAG} <= 1")
    assert passed.returncode == 0, passed.stdout + passed.stderr
    outcomes = json.loads(passed.stdout)
    assert [o["status"] for o in outcomes["outcomes"]] == ["PASS", "PASS"], outcomes
    failed = mmdiag(ws, env, "gate", "an/report.json", "--bound", "point", "--rule", f"{DIAG}.visual >= 2")
    assert failed.returncode == 1, failed.stdout + failed.stderr

    trained = mmdiag(ws, env, "rebalance", "--model", "models.py:build", "--data", "train.npz", "--val-data",
                     "test.npz", "--fix", FIX, "--fix-param", "weight=0.3", "--epochs", "1", "--only", DIAG,
                     "--bootstrap", "0", "--device", "cpu", "--quiet", "--out", "rb")
    assert trained.returncode == 0, trained.stdout + trained.stderr
    state = json.loads((ws / "rb" / "fix.json").read_text())
    assert state["fix"] == FIX and state["params"]["weight"] == 0.3
    after = json.loads((ws / "rb" / "after" / "report.json").read_text())
    assert DIAG in after["diagnostics"]
