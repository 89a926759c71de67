"""Never silently wrong, never a traceback: every failure is a one-paragraph message and exit 2.

An exception raised by the user's own code (a forward, a dataset's ``__getitem__``, a factory)
names the file and line in that code; an exception inside mmdiag is an internal error that asks
for ``--debug`` and a report; exit 1 stays reserved for a failing gate rule. Reports of an unknown
schema version, a folder given for a report.json, and ``--bound ci`` on a value without an
interval are refused with a message that says what to do.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
from torch.utils.data import DataLoader
from typer.testing import CliRunner

from tests.helpers.cli_run import run
from mmdiag.errors import UserCodeError, user_iteration
from mmdiag.report import SCHEMA_VERSION, Report, Result

from tests.test_render import synthetic_report

runner = CliRunner()

MODEL = textwrap.dedent('''
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.audio_net = nn.Linear(4, 6)
            self.visual_net = nn.Linear(5, 6)
            self.head = nn.Linear(12, 3)
        def forward(self, audio, visual):
            return self.head(torch.cat([self.audio_net(audio), self.visual_net(visual)], 1))

    class Checked(Net):
        def forward(self, audio, visual):
            x = audio
            assert x.shape[1] == 999, "my own check"
            return super().forward(audio, visual)

    def build():
        return Net()

    def checked():
        return Checked()

    def asserting_factory():
        assert False, "the factory's own check"
''')

DATA = textwrap.dedent('''
    import torch
    from torch.utils.data import Dataset

    class Items(Dataset):
        def __init__(self, fail_from):
            self.fail_from = fail_from
        def __len__(self):
            return 24
        def __getitem__(self, i):
            if i >= self.fail_from:
                raise KeyError(f"sample {i} is missing from the index")
            g = torch.Generator().manual_seed(i)
            return {"audio": torch.randn(4, generator=g), "visual": torch.randn(5, generator=g), "label": i % 3}

    def broken_later():
        return Items(fail_from=5)

    def broken_first():
        return Items(fail_from=0)
''')


def _line(text: str, needle: str) -> int:
    """1-based line number of the line holding ``needle`` in the written file."""
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    (tmp_path / "model.py").write_text(MODEL)
    (tmp_path / "data.py").write_text(DATA)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", audio=rng.normal(size=(24, 4)).astype(np.float32),
             visual=rng.normal(size=(24, 5)).astype(np.float32), label=rng.integers(0, 3, size=24))
    return tmp_path




def analyze(ws: Path, model: str, data: str, *extra: str, debug: bool = False):
    pre = ["--debug"] if debug else []
    return run([*pre, "analyze", "--model", f"{ws}/model.py:{model}", "--data", data, "--out", str(ws / "out"),
                "--device", "cpu", "--bootstrap", "0", "--only", "shapley", *extra])


# ----------------------------------------------------------------------------- the user's own code


def test_assert_in_the_users_forward_exits_2_naming_file_and_line(ws: Path) -> None:
    res = analyze(ws, "checked", str(ws / "d.npz"))
    assert res.exit_code == 2, res.output
    assert "my own check" in res.output
    assert f"model.py:{_line(MODEL, 'assert x.shape[1] == 999')}" in res.output
    assert "Traceback" not in res.output
    assert not (ws / "out" / "report.json").exists()


def test_debug_shows_the_traceback_of_the_users_error(ws: Path) -> None:
    res = analyze(ws, "checked", str(ws / "d.npz"), debug=True)
    assert res.exit_code == 2
    assert "Traceback" in res.output and "my own check" in res.output


def test_dataset_getitem_raising_during_the_pass_exits_2_naming_file_and_line(ws: Path) -> None:
    res = analyze(ws, "build", f"{ws}/data.py:broken_later")
    assert res.exit_code == 2, res.output
    assert "KeyError" in res.output and "is missing from the index" in res.output
    assert f"data.py:{_line(DATA, 'raise KeyError')}" in res.output
    assert "reading item" in res.output
    assert "Traceback" not in res.output
    res = analyze(ws, "build", f"{ws}/data.py:broken_later", debug=True)
    assert res.exit_code == 2 and "Traceback" in res.output


def test_dataset_getitem_raising_on_the_first_item_names_file_and_line(ws: Path) -> None:
    res = analyze(ws, "build", f"{ws}/data.py:broken_first")
    assert res.exit_code == 2, res.output
    assert f"data.py:{_line(DATA, 'raise KeyError')}" in res.output
    assert "Traceback" not in res.output


def test_model_factory_raising_names_file_and_line(ws: Path) -> None:
    res = analyze(ws, "asserting_factory", str(ws / "d.npz"))
    assert res.exit_code == 2, res.output
    assert "the factory's own check" in res.output
    assert f"model.py:{_line(MODEL, 'assert False')}" in res.output
    assert "Traceback" not in res.output


def test_worker_process_errors_name_the_users_file_and_line(ws: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("loud_errors_data", ws / "data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    loader = DataLoader(mod.Items(fail_from=0), batch_size=4, num_workers=1,
                        multiprocessing_context="fork")
    with pytest.raises(UserCodeError) as info:
        list(user_iteration(loader, "reading a batch of the data"))
    text = str(info.value)
    assert f"data.py:{_line(DATA, 'raise KeyError')}" in text and "is missing from the index" in text
    assert "Traceback" not in text


def test_iteration_errors_without_a_user_frame_pass_unchanged() -> None:
    with pytest.raises(TypeError):  # int(object()) raises in C code: no frame is the user's
        list(user_iteration(map(int, [object()]), "reading"))


def test_internal_errors_exit_2_and_ask_for_debug(ws: Path, monkeypatch) -> None:
    report = ws / "report.json"
    synthetic_report().save(report)
    # json.loads(PosixPath) raises TypeError inside the standard library: no frame is the user's
    monkeypatch.setattr(Report, "load", staticmethod(json.loads))
    res = run(["render", str(report), "--format", "md"])
    assert res.exit_code == 2, res.output
    assert "internal error in mmdiag (TypeError" in res.output and "--debug" in res.output
    assert "Traceback" not in res.output
    res = run(["--debug", "render", str(report), "--format", "md"])
    assert res.exit_code == 2 and "Traceback" in res.output


# ----------------------------------------------------------------------------------------- reports


def _write(path: Path, **changes) -> Path:
    doc = synthetic_report().to_dict()
    doc.update(changes)
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("command", [
    ["gate", "{r}", "--rule", "accuracy >= 0"],
    ["render", "{r}", "--format", "md"],
    ["compare", "{r}", "{r}"],
])
def test_a_newer_schema_version_is_refused_with_upgrade_advice(tmp_path: Path, command: list[str]) -> None:
    r = _write(tmp_path / "report.json", schema_version=SCHEMA_VERSION + 1, mmdiag_version="9.0.0")
    res = run([c.format(r=r) for c in command])
    assert res.exit_code == 2, res.output
    assert f"schema_version {SCHEMA_VERSION + 1}" in res.output
    assert f"schema versions {SCHEMA_VERSION}" in res.output and "Upgrade mmdiag" in res.output
    assert "Traceback" not in res.output


@pytest.mark.parametrize("version", [0, -1, "one", 1.5, True])
def test_unknown_or_malformed_schema_versions_are_refused(tmp_path: Path, version) -> None:
    r = _write(tmp_path / "report.json", schema_version=version)
    res = run(["gate", str(r), "--rule", "accuracy >= 0"])
    assert res.exit_code == 2, res.output
    assert "schema_version" in res.output and "Traceback" not in res.output


def test_reports_written_today_still_load(tmp_path: Path) -> None:
    path = synthetic_report().save(tmp_path / "report.json")
    assert json.loads(path.read_text())["schema_version"] == SCHEMA_VERSION
    assert Report.load(path).to_dict() == json.loads(path.read_text())
    res = run(["gate", str(path), "--rule", "accuracy >= 0"])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("command", [
    ["gate", "{d}", "--rule", "accuracy >= 0"],
    ["render", "{d}", "--format", "md"],
    ["compare", "{d}", "{d}"],
    ["gate", "{d}/report.json", "--rule", "reliance <= baseline", "--baseline", "{d}"],
])
def test_a_folder_given_for_report_json_asks_did_you_mean(tmp_path: Path, command: list[str]) -> None:
    synthetic_report().save(tmp_path / "report.json")
    res = run([c.format(d=tmp_path) for c in command])
    assert res.exit_code == 2, res.output
    assert f"did you mean {tmp_path / 'report.json'}?" in res.output
    assert "Traceback" not in res.output


def test_a_folder_without_report_json_says_so(tmp_path: Path) -> None:
    res = run(["gate", str(tmp_path), "--rule", "accuracy >= 0"])
    assert res.exit_code == 2
    assert "is a folder" in res.output and "holds no report.json" in res.output


# -------------------------------------------------------------------------------- gate --bound ci


def _no_interval_report(path: Path) -> Path:
    """A report analysed with bootstrap 0: point values only, interval ends null."""
    nan = float("nan")
    res = Result("shapley", 0.9, {"audio": 0.95, "visual": 0.01}, ci={"audio": [nan, nan], "visual": [nan, nan]},
                 params={"bootstrap": 0, "seed": 0, "level": 0.95})
    doc = synthetic_report().to_dict()
    doc["diagnostics"]["shapley"] = res.to_dict()
    path.write_text(json.dumps(doc))
    return path


def test_bound_ci_on_a_value_without_an_interval_is_an_error_naming_bound_point(tmp_path: Path) -> None:
    r = _no_interval_report(tmp_path / "report.json")
    res = run(["gate", str(r), "--rule", "shapley.visual <= 0.5", "--json"])
    assert res.exit_code == 1, res.output  # an ERROR fails the gate closed, like any unanswerable rule
    out = json.loads(res.output)["outcomes"][0]
    assert out["status"] == "ERROR" and "--bound point" in out["message"] and "--bootstrap 0" in out["message"]
    res = run(["gate", str(r), "--rule", "shapley.visual <= 0.5", "--bound", "point"])
    assert res.exit_code == 0, res.output
    # a warning rule reports it and does not fail; keys with no interval by nature keep the point value
    res = run(["gate", str(r), "--warn-rule", "shapley.visual <= 0.5", "--rule", "accuracy >= 0", "--json"])
    assert res.exit_code == 0, res.output
    assert [o["status"] for o in json.loads(res.output)["outcomes"]] == ["PASS", "WARN"]


def test_a_report_json_with_null_interval_ends_round_trips(tmp_path: Path) -> None:
    r = _no_interval_report(tmp_path / "report.json")
    assert Report.load(r).diagnostics["shapley"].ci["audio"] == [None, None]
