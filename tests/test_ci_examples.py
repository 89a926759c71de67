"""The CI examples run as written: parse the workflow files and run their mmdiag commands on a toy model."""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from mmdiag.cli.app import app
from mmdiag.examples_data.synthetic import ToyNet, fit_toy, make_toy

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "ci"


def github_commands() -> list[str]:
    doc = yaml.safe_load((EXAMPLES / "github-actions.yml").read_text())
    steps = [s for job in doc["jobs"].values() for s in job["steps"]]
    return [" ".join(s["run"].split()) for s in steps if "run" in s]


def gitlab_commands() -> list[str]:
    doc = yaml.safe_load((EXAMPLES / "gitlab-ci.yml").read_text())
    jobs = [v for v in doc.values() if isinstance(v, dict) and "script" in v]
    return [" ".join(str(c).split()) for job in jobs for c in job["script"]]


def run_commands(commands: list[str]) -> list[tuple[str, int]]:
    """Run the mmdiag and example-script commands of a CI job in-process; skip install and shell steps."""
    done = []
    for cmd in commands:
        argv = shlex.split(cmd)
        if argv[0] == "mmdiag":
            result = CliRunner().invoke(app, argv[1:])
            if result.exception and not isinstance(result.exception, SystemExit):
                raise result.exception
            done.append((cmd, result.exit_code))
            if result.exit_code:
                break  # a CI job stops at the first failing step
        elif argv[:2] == ["python", "examples/ci/toy_model.py"]:
            sys.path.insert(0, str(Path("examples/ci").resolve()))
            try:
                import toy_model

                toy_model.main(argv[2:])
            finally:
                sys.path.pop(0)
                sys.modules.pop("toy_model", None)
            done.append((cmd, 0))
    return done


@pytest.fixture()
def ci_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A checkout-like folder holding examples/ci, as the working directory."""
    shutil.copytree(EXAMPLES, tmp_path / "examples" / "ci", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_workflow_files_parse_and_use_the_sample_config() -> None:
    gh, gl = github_commands(), gitlab_commands()
    assert any(c.startswith("pip install") and "mmdiag" in c for c in gh)
    assert any(c.startswith("mmdiag analyze") for c in gh) and any(c.startswith("mmdiag gate") for c in gh)
    assert any(c.startswith("mmdiag analyze") and "--gate" in c for c in gl)
    gitlab = yaml.safe_load((EXAMPLES / "gitlab-ci.yml").read_text())
    assert gitlab["mmdiag-gate"]["artifacts"]["reports"]["junit"] == "mmdiag-report/gate.xml"
    conf = tomllib.loads((EXAMPLES / "mmdiag.toml").read_text())
    assert conf["gate"]["rules"] and conf["gate"]["rule"][0]["warn"] is True
    from mmdiag.cli.gate_cmd import rules_from_table

    assert len(rules_from_table(conf["gate"])) == len(conf["gate"]["rules"]) + len(conf["gate"]["rule"])


@pytest.mark.slow
def test_github_workflow_runs_and_passes_on_a_balanced_model(ci_dir: Path) -> None:
    done = run_commands(github_commands())
    assert [c.split()[:2] for c, _ in done] == [["python", "examples/ci/toy_model.py"], ["mmdiag", "analyze"],
                                                 ["mmdiag", "gate"]]
    assert all(code == 0 for _, code in done), done
    out = ci_dir / "mmdiag-report"
    for name in ("report.json", "metrics.csv", "report.html", "gate.xml", "gate.md"):
        assert (out / name).is_file(), name
    suite = ET.parse(out / "gate.xml").getroot().find("testsuite")
    assert suite is not None and suite.get("failures") == "0" and len(suite.findall("testcase")) == 4


@pytest.mark.slow
def test_gitlab_job_fails_the_gate_on_a_dominated_model(ci_dir: Path) -> None:
    # the checkpoint a training job would hand over: audio carries most of the signal
    data = make_toy(n=1000, strength=(3.0, 0.8), modalities=["audio", "visual"], seed=0)
    torch.manual_seed(0)
    model = fit_toy(ToyNet(["audio", "visual"]), {k: v[:600] for k, v in data.items()}, epochs=8, seed=0)
    art = ci_dir / "ci-artifacts"
    art.mkdir()
    torch.save(model.state_dict(), art / "model.pt")
    np.savez(art / "val.npz", **{k: v[600:] for k, v in data.items()})
    commands = [c for c in gitlab_commands() if not c.startswith("python examples/ci/toy_model.py")]
    done = run_commands(commands)
    assert done[-1][0].startswith("mmdiag analyze") and done[-1][1] == 1
    out = ci_dir / "mmdiag-report"
    assert (out / "report.json").is_file() and (out / "report.html").is_file()
    suite = ET.parse(out / "gate.xml").getroot().find("testsuite")
    assert suite is not None and int(suite.get("failures", "0")) >= 1
    failure = suite.find("testcase/failure")
    assert failure is not None and "measured" in failure.get("message", "")
