"""An interrupted run leaves either nothing or everything in its output folder."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmdiag.io import staged_folder
from tests.helpers.cli_run import run
from tests.helpers.toys import DOMINANT, toy_split, trained_toy


def test_staged_folder_moves_everything_and_keeps_other_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("the user's file")
    (out / "plots").mkdir()
    (out / "plots" / "old.png").write_text("old")
    with staged_folder(out) as stage:
        (stage / "report.json").write_text("{}")
        (stage / "plots").mkdir()
        (stage / "plots" / "new.png").write_text("new")
    assert (out / "mine.txt").read_text() == "the user's file"
    assert (out / "report.json").is_file() and (out / "plots" / "new.png").is_file()
    assert not (out / "plots" / "old.png").exists()  # a folder of outputs is replaced whole
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left


def test_staged_folder_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with staged_folder(out) as stage:
            (stage / "report.json").write_text("{}")
            raise KeyboardInterrupt
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_ctrl_c_while_rendering_leaves_no_report_and_the_rerun_needs_no_overwrite(tmp_path, monkeypatch):
    import torch

    import mmdiag.render as render

    train, test = toy_split(DOMINANT, 0)
    np.savez(tmp_path / "test.npz", **test)
    torch.save(trained_toy(DOMINANT, 0).state_dict(), tmp_path / "toy.pt")
    (tmp_path / "m.py").write_text(
        "from mmdiag.examples_data.synthetic import ToyNet\n"
        "def toy():\n    return ToyNet(['audio', 'visual'])\n")
    args = ["analyze", "--model", f"{tmp_path}/m.py:toy", "--checkpoint", str(tmp_path / "toy.pt"),
            "--data", str(tmp_path / "test.npz"), "--out", str(tmp_path / "r"), "--bootstrap", "20",
            "--only", "unimodal,shapley", "--device", "cpu"]
    real = render.write_outputs

    def interrupted(report, out, **kw):
        report.save(out / "report.json")  # the report is written, then Ctrl-C while plotting
        raise KeyboardInterrupt

    monkeypatch.setattr(render, "write_outputs", interrupted)
    res = run(args)
    assert res.exit_code == 130
    assert not (tmp_path / "r" / "report.json").exists()
    monkeypatch.setattr(render, "write_outputs", real)
    res = run(args)  # no --overwrite needed: the interrupted run left nothing
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "r" / "report.json").read_text())["modalities"] == ["audio", "visual"]
    assert (tmp_path / "r" / "report.html").is_file()
