"""Every example runs end to end at CI sizes (``--small``) and finds what the ground truth says.

Each ``examples/<name>/run.py`` runs in its own process, as a user would run it (the examples
import their own ``model.py``, so one process per example keeps them apart). Ground truth where it
exists: with clean audio AV-digits models lean on the audio; at the balancing SNR no modality
dominates strongly; BasicMotions' accelerometer carries more of the decision than the gyroscope.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mmdiag.cli.app import app

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run_example(name: str, out: Path, *extra: str) -> dict:
    # one torch thread: on a shared CI machine two spinning threads per tiny op cost far more CPU
    cmd = [sys.executable, str(EXAMPLES / name / "run.py"), "--small", "--threads", "1", "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return json.loads((out / "summary.json").read_text())


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_every_example_has_a_script_a_config_and_a_docs_section():
    docs = (ROOT / "docs" / "examples.md").read_text()
    for name in ("avdigits", "basicmotions", "three_modalities", "bring_your_own"):
        folder = EXAMPLES / name
        assert (folder / "run.py").is_file() and (folder / "mmdiag.toml").is_file(), name
        assert "--small" in (folder / "run.py").read_text(), name
        assert f"examples/{name}" in docs, name


def test_example_configs_are_valid_for_the_cli():
    from mmdiag.cli.analyze import SETTINGS as ANALYZE
    from mmdiag.cli.config import TABLES, read_toml
    from mmdiag.cli.rebalance_cmd import SETTINGS as REBALANCE

    for toml in EXAMPLES.glob("*/mmdiag.toml"):
        conf = read_toml(toml)
        unknown = [k for k in conf if k.replace("-", "_") not in set(ANALYZE) | set(TABLES)]
        assert not unknown, f"{toml}: {unknown}"
        unknown = [k for k in conf.get("rebalance", {}) if k.replace("-", "_") not in set(REBALANCE) | {"fix_params"}]
        assert not unknown, f"{toml} [rebalance]: {unknown}"


def test_ts_reader_on_the_vendored_basicmotions_files():
    tsfile = load_module(EXAMPLES / "basicmotions" / "tsfile.py", "_bm_tsfile")
    train = tsfile.read_ts(EXAMPLES / "basicmotions" / "data" / "BasicMotions_TRAIN.ts")
    test = tsfile.read_ts(EXAMPLES / "basicmotions" / "data" / "BasicMotions_TEST.ts", classes=train.classes)
    assert train.x.shape == test.x.shape == (40, 6, 100)
    assert train.classes == ["Standing", "Running", "Walking", "Badminton"]
    assert np.bincount(train.y).tolist() == [10, 10, 10, 10]
    assert np.isfinite(train.x).all()
    # channels 3-5 are the gyroscope: angular velocity averages to ~0 over each recording
    per_recording_mean = np.abs(train.x.mean(axis=2)).mean(axis=0)
    assert per_recording_mean[3:].max() < per_recording_mean[:3].min()


def test_ts_reader_rejects_malformed_files(tmp_path):
    tsfile = load_module(EXAMPLES / "basicmotions" / "tsfile.py", "_bm_tsfile")
    bad = tmp_path / "bad.ts"
    bad.write_text("@problemName x\n@classLabel true a b\n@data\n1,2,3:4,5:a\n")
    with pytest.raises(ValueError, match="equal-length"):
        tsfile.read_ts(bad)
    bad.write_text("@problemName x\n@classLabel true a b\n@data\n1,2:3,4:c\n")
    with pytest.raises(ValueError, match="not among the classes"):
        tsfile.read_ts(bad)


@pytest.mark.slow
def test_avdigits_clean_audio_dominates_noisy_balances_and_the_fix_helps(tmp_path):
    s = run_example("avdigits", tmp_path / "av")
    clean, noisy = s["clean"], s["noisy"]
    assert clean["verdict"]["dominant"] == "audio"
    assert clean["verdict"]["severity"] in ("mild", "strong")
    assert "visual" in clean["verdict"]["underused"]
    assert clean["shapley"]["audio"] > clean["shapley"]["visual"]
    # at the balancing SNR no modality dominates strongly
    assert noisy["verdict"]["severity"] != "strong"
    assert abs(noisy["shapley"]["audio"] - noisy["shapley"]["visual"]) < 0.2
    # the recommended fix trains the lazy image branch
    assert s["fix"]["requested"] == "auto" and s["fix"]["used"] == clean["verdict"]["recommended_fix"]
    assert s["rebalanced"]["unimodal_accuracy"]["visual"] > clean["unimodal_accuracy"]["visual"] + 0.1
    assert (tmp_path / "av" / "summary.png").stat().st_size > 1000


@pytest.mark.slow
def test_basicmotions_accelerometer_carries_more(tmp_path):
    s = run_example("basicmotions", tmp_path / "bm")
    before = s["before"]
    assert before["accuracy"] >= 0.8
    assert before["shapley"]["acc"] > before["shapley"]["gyro"]
    assert before["verdict"]["dominant"] in ("acc", None)
    assert s["rebalanced"]["accuracy"] >= 0.8
    assert (tmp_path / "bm" / "rebalance" / "comparison.json").is_file()


@pytest.mark.slow
def test_three_modalities_shapley_over_eight_subsets(tmp_path):
    s = run_example("three_modalities", tmp_path / "m3")
    assert set(s["shapley"]) == {"audio", "top", "bottom"}
    assert len(s["combinations"]) == 7
    assert s["verdict"]["dominant"] == "audio"
    assert s["shapley"]["audio"] > max(s["shapley"]["top"], s["shapley"]["bottom"])
    # efficiency: the values add up to v(all) - v(none) = accuracy - accuracy with nothing present
    assert 0.5 < s["shapley_sum"] <= 1.0
    assert s["combinations"]["audio+top+bottom"] == pytest.approx(s["accuracy"], abs=1e-4)


@pytest.mark.slow
def test_bring_your_own_model_with_flags_only(tmp_path, monkeypatch):
    project = tmp_path / "project"
    run_example("bring_your_own", project, "--no-analyze")
    assert {"model.py", "ckpt.pth", "val.npz"} <= {p.name for p in project.iterdir()}
    monkeypatch.chdir(project)
    res = CliRunner().invoke(app, ["analyze", "--model", "model.py:build", "--checkpoint", "ckpt.pth",
                                   "--data", "val.npz", "--out", "report"])
    assert res.exit_code == 0, res.output
    report = json.loads((project / "report" / "report.json").read_text())
    adapter = report["settings"]["adapter"]
    assert adapter["encoders"] == {"audio": "audio_net", "visual": "visual_net"}
    assert adapter["head"] == "fusion_module"
    assert report["settings"]["mask_at"] == "feature"
    assert report["accuracy"] > 0.9
    assert report["verdict"]["dominant"] == "audio"
    assert not [f for f in report["failures"] if f["kind"] == "error"], report["failures"]
