"""Hostile checkpoints, the trust flag, atomic outputs and determinism, through the CLI."""

from __future__ import annotations

import json
import os
import textwrap

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mmdiag.cli.app import app
from tests.helpers.toys import DOMINANT, toy_split, trained_toy

MODEL = textwrap.dedent('''
    from mmdiag.examples_data.synthetic import ToyNet
    def toy():
        return ToyNet(["audio", "visual"])
    def broken():
        raise RuntimeError("factory exploded")
''')


class Hostile:
    """Unpickling this calls os.system-free file creation: a stand-in for arbitrary code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def ws(tmp_path):
    (tmp_path / "m.py").write_text(MODEL)
    np.savez(tmp_path / "test.npz", **toy_split(DOMINANT, 0)[1])
    torch.save(trained_toy(DOMINANT, 0).state_dict(), tmp_path / "toy.pt")
    return tmp_path


def analyze(ws, *extra):
    args = ["analyze", "--model", f"{ws}/m.py:toy", "--data", f"{ws}/test.npz", "--bootstrap", "30",
            "--device", "cpu", "--only", "shapley,reliance,unimodal,combinations", *extra]
    return CliRunner().invoke(app, args)


def test_hostile_pickle_is_refused_and_never_runs(ws):
    marker = ws / "pwned.txt"
    state = trained_toy(DOMINANT, 0).state_dict()
    state["evil"] = Hostile(str(marker))
    torch.save(state, ws / "evil.pt")
    res = analyze(ws, "--checkpoint", str(ws / "evil.pt"), "--out", str(ws / "o"))
    assert res.exit_code == 2
    assert "--trust-checkpoint" in " ".join(res.output.split())
    assert not marker.exists(), "the checkpoint's code ran"


def test_full_module_pickle_needs_trust(ws):
    torch.save(trained_toy(DOMINANT, 0), ws / "module.pt")
    res = analyze(ws, "--checkpoint", str(ws / "module.pt"), "--out", str(ws / "o"))
    assert res.exit_code == 2 and "--trust-checkpoint" in " ".join(res.output.split())
    res = analyze(ws, "--checkpoint", str(ws / "module.pt"), "--trust-checkpoint", "--out", str(ws / "o"))
    assert res.exit_code == 0, res.output
    report = json.loads((ws / "o" / "report.json").read_text())
    assert report["settings"]["checkpoint_format"] == "module-pickle"
    assert report["verdict"]["dominant"] == "audio"


def test_torchscript_needs_trust(ws):
    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    scripted.save(str(ws / "ts.pt"))
    res = analyze(ws, "--checkpoint", str(ws / "ts.pt"), "--out", str(ws / "o"))
    assert res.exit_code == 2 and "--trust-checkpoint" in " ".join(res.output.split())


def test_failed_overwrite_leaves_previous_report_intact(ws):
    ok = analyze(ws, "--checkpoint", str(ws / "toy.pt"), "--out", str(ws / "o"))
    assert ok.exit_code == 0, ok.output
    before = (ws / "o" / "report.json").read_bytes()
    res = CliRunner().invoke(app, ["analyze", "--model", f"{ws}/m.py:broken", "--data", f"{ws}/test.npz",
                                   "--out", str(ws / "o"), "--overwrite"])
    assert res.exit_code == 2
    assert (ws / "o" / "report.json").read_bytes() == before
    assert not [p for p in os.listdir(ws / "o") if p.endswith(".tmp")]


def strip_volatile(report):
    report = dict(report)
    report.pop("created")
    return report


def test_same_seed_same_report(ws):
    a = analyze(ws, "--checkpoint", str(ws / "toy.pt"), "--out", str(ws / "a"), "--seed", "7")
    b = analyze(ws, "--checkpoint", str(ws / "toy.pt"), "--out", str(ws / "b"), "--seed", "7")
    assert a.exit_code == 0 and b.exit_code == 0
    ra = json.loads((ws / "a" / "report.json").read_text())
    rb = json.loads((ws / "b" / "report.json").read_text())
    ra["settings"].pop("config", None), rb["settings"].pop("config", None)
    assert strip_volatile(ra) == strip_volatile(rb)
