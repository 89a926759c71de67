"""`mmdiag analyze`, `list`, `--version` and `python -m mmdiag` through typer's runner."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tests.helpers.cli_run import run
from mmdiag.loading import save_state_dict
from tests.helpers.toys import DOMINANT, toy_split, trained_toy

runner = CliRunner()

MODEL_PY = textwrap.dedent('''
    import torch
    from torch import nn

    class Research(nn.Module):
        """Positional forward, encoders named like the modalities, concat head."""
        def __init__(self, hidden=16):
            super().__init__()
            self.audio_net = nn.Sequential(nn.Linear(8, hidden), nn.ReLU())
            self.visual_net = nn.Sequential(nn.Linear(8, hidden), nn.ReLU())
            self.fusion_head = nn.Linear(2 * hidden, 4)
        def forward(self, audio_x, visual_x):
            return self.fusion_head(torch.cat([self.audio_net(audio_x), self.visual_net(visual_x)], 1))

    def build(hidden=16):
        return Research(hidden)

    def toy(**kw):
        from mmdiag.examples_data.synthetic import ToyNet
        return ToyNet(["audio", "visual"], **kw)
''')


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    d = tmp_path_factory.mktemp("ws")
    (d / "models.py").write_text(MODEL_PY)
    train, test = toy_split(DOMINANT, 0)
    np.savez(d / "test.npz", **test)
    torch.save(trained_toy(DOMINANT, 0).state_dict(), d / "toy.pt")
    return d




FAST = ["--bootstrap", "50", "--only", "shapley,reliance,unimodal,combinations", "--device", "cpu"]


def test_analyze_writes_report_and_names_dominant(workspace, tmp_path):
    out = tmp_path / "r"
    res = run(["analyze", "--model", f"{workspace}/models.py:toy", "--checkpoint", f"{workspace}/toy.pt",
               "--data", f"{workspace}/test.npz", "--out", str(out), *FAST])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    for key in ("schema_version", "mmdiag_version", "created", "modalities", "n_samples", "accuracy", "settings",
                "diagnostics", "failures", "verdict"):
        assert key in report
    for key in ("model", "checkpoint", "data", "mask", "mask_at", "seed"):
        assert key in report["settings"]
    assert report["verdict"]["dominant"] == "audio"
    assert set(report["diagnostics"]["shapley"]["ci"]) == {"audio", "visual"}
    csv = (out / "metrics.csv").read_text().splitlines()
    assert csv[0] == "diagnostic,modality,key,value,ci_low,ci_high"
    assert "verdict:" in res.output and "audio" in res.output


@pytest.mark.parametrize("fmt", ["plain", "wrapped", "ddp", "safetensors"])
def test_checkpoint_formats_and_positional_model(workspace, tmp_path, fmt):
    torch.manual_seed(0)
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("ws_models", workspace / "models.py")
    mod = module_from_spec(spec)
    spec.loader.exec_module(mod)
    state = mod.build().state_dict()
    path = tmp_path / ("ck.safetensors" if fmt == "safetensors" else "ck.pt")
    if fmt == "plain":
        torch.save(state, path)
    elif fmt == "wrapped":
        torch.save({"state_dict": state, "epoch": 3}, path)
    elif fmt == "ddp":
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    else:
        save_state_dict(state, path)
    res = run(["analyze", "--model", f"{workspace}/models.py:build", "--checkpoint", str(path),
               "--data", f"{workspace}/test.npz", "--call", "positional", "--out", str(tmp_path / "o"), *FAST])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["settings"]["adapter"]["call"] == "positional"
    assert report["settings"]["adapter"]["encoders"] == {"audio": "audio_net", "visual": "visual_net"}


def test_data_keys_that_match_no_forward_parameter_are_refused(workspace, tmp_path):
    """forward(audio_x, visual_x) with arrays audio, visual: a positional call would be a guess."""
    res = run(["analyze", "--model", f"{workspace}/models.py:build", "--data", f"{workspace}/test.npz",
               "--out", str(tmp_path / "o"), *FAST])
    assert res.exit_code == 2
    assert "audio, visual" in res.output and "audio_x, visual_x" in res.output and "--call positional" in res.output
    assert not (tmp_path / "o" / "report.json").exists()


def test_no_checkpoint_and_chance_accuracy_are_said_on_stderr(workspace, tmp_path):
    res = run(["analyze", "--model", f"{workspace}/models.py:build", "--data", f"{workspace}/test.npz",
               "--call", "positional", "--out", str(tmp_path / "o"), *FAST])
    assert res.exit_code == 0, res.output
    assert "no --checkpoint" in res.stderr and "chance level" in res.stderr
    notes = json.loads((tmp_path / "o" / "report.json").read_text())["notes"]
    assert any("no --checkpoint" in n for n in notes) and any("chance" in n for n in notes)


def test_black_box_fallback_and_skips_are_said_on_stderr(workspace, tmp_path):
    res = run(["analyze", "--model", f"{workspace}/models.py:toy", "--checkpoint", f"{workspace}/toy.pt",
               "--data", f"{workspace}/test.npz", "--encoder", "audio=encoders.audio",
               "--encoder", "visual=encoders.audio", "--out", str(tmp_path / "o2"), "--bootstrap", "20",
               "--device", "cpu", "--only", "unimodal,probe"])
    assert res.exit_code == 0, res.output
    assert "warning: feature-level masking is not exact" in res.stderr and "several modalities" in res.stderr
    assert "warning: probe skipped" in res.stderr


def test_call_and_encoder_flags_and_input_masking(workspace, tmp_path):
    res = run(["analyze", "--model", f"{workspace}/models.py:build", "--data", f"{workspace}/test.npz",
               "--call", "positional", "--encoder", "audio=audio_net", "--encoder", "visual=visual_net",
               "--mask-at", "input", "--mask", "mean", "--out", str(tmp_path / "o"), *FAST])
    assert res.exit_code == 0, res.output
    settings = json.loads((tmp_path / "o" / "report.json").read_text())["settings"]
    assert settings["mask_at"] == "input" and settings["mask"] == "mean"


def write_config(folder, workspace, body: str) -> None:
    """``folder/mmdiag.toml`` naming the workspace's toy model, checkpoint and test data, then ``body``."""
    head = f'model = "{workspace}/models.py:toy"\ncheckpoint = "{workspace}/toy.pt"\ndata = "{workspace}/test.npz"\n'
    (folder / "mmdiag.toml").write_text(head + textwrap.dedent(body))


def test_config_file_is_used_and_flags_win(workspace, tmp_path):
    write_config(tmp_path, workspace, '''
        bootstrap = 30
        seed = 3
        only = "shapley,unimodal"
        out = "from-config"
    ''')
    res = run(["analyze", "--seed", "4", "--device", "cpu"], cwd=tmp_path)
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "from-config" / "report.json").read_text())
    assert report["settings"]["bootstrap"] == 30 and report["settings"]["seed"] == 4
    assert set(report["diagnostics"]) == {"shapley", "unimodal"}
    assert report["settings"]["config"] == "mmdiag.toml"


def test_config_unknown_key_suggests_closest(tmp_path):
    (tmp_path / "bad.toml").write_text('bootstrapp = 5\n')
    res = run(["analyze", "--config", str(tmp_path / "bad.toml")])
    assert res.exit_code == 2
    assert "Unknown key 'bootstrapp'" in res.output and "Did you mean 'bootstrap'" in res.output
    assert "Traceback" not in res.output


def test_collect_table_sets_evidence_sampling(workspace, tmp_path):
    write_config(tmp_path, workspace, '''
        bootstrap = 20
        only = "attribution"
        out = "o"
        [collect]
        max_attribution_samples = 24
        attribution_fraction = 1.0
        ig_steps = 4
        ig_max_steps = 4
        noise_levels = [1, 3, 5]
    ''')
    res = run(["analyze", "--device", "cpu"], cwd=tmp_path)
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    collect = report["settings"]["collect"]
    assert collect["max_attribution_samples"] == 24 and collect["ig_steps"] == 4 and collect["noise_levels"] == [1, 3, 5]
    assert report["diagnostics"]["attribution"]["details"]["n_samples"] == 24


@pytest.mark.parametrize("table, message", [
    ("ig_step = 4", "Unknown key 'ig_step' in [collect]. Did you mean 'ig_steps'?"),
    ("batch_size = 8", "[collect] batch_size is set with --batch-size"),
    ("grad_fraction = 2.0", "must be a number in (0, 1]; found 2.0"),
])
def test_collect_table_errors_exit_2(tmp_path, table, message):
    (tmp_path / "bad.toml").write_text(f"[collect]\n{table}\n")
    res = run(["analyze", "--config", str(tmp_path / "bad.toml"), "--model", "m.py:build", "--data", "d.npz"])
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split()) and "Traceback" not in res.output


def test_load_errors_exit_2_without_traceback(workspace, tmp_path):
    res = run(["analyze", "--model", f"{workspace}/models.py:nope", "--data", f"{workspace}/test.npz",
               "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "Traceback" not in res.output and "nope" in res.output
    assert not (tmp_path / "o" / "report.json").exists()
    res = run(["analyze", "--model", f"{workspace}/models.py:build", "--data", f"{workspace}/missing.npz",
               "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "missing.npz" in res.output
    res = run(["analyze", "--model", f"{workspace}/models.py:build", "--data", f"{workspace}/test.npz",
               "--only", "shapely", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "Did you mean 'shapley'" in res.output


def test_debug_shows_traceback(workspace, tmp_path):
    res = run(["--debug", "analyze", "--model", f"{workspace}/models.py:nope", "--data", f"{workspace}/test.npz",
               "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "Traceback" in res.output


def test_existing_out_needs_overwrite(workspace, tmp_path):
    args = ["analyze", "--model", f"{workspace}/models.py:toy", "--checkpoint", f"{workspace}/toy.pt",
            "--data", f"{workspace}/test.npz", "--out", str(tmp_path / "o"), *FAST]
    assert run(args).exit_code == 0
    res = run(args)
    assert res.exit_code == 2 and "--overwrite" in res.output
    assert run(args + ["--overwrite"]).exit_code == 0


def test_list_and_version():
    res = run(["list"])
    assert res.exit_code == 0 and "shapley" in res.output and "reliance" in res.output
    res = run(["--version"])
    assert res.exit_code == 0 and "mmdiag" in res.output


def test_python_dash_m():
    out = subprocess.run([sys.executable, "-m", "mmdiag", "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("mmdiag")


def test_json_output_of_analyze_and_list(workspace, tmp_path):
    res = run(["analyze", "--model", f"{workspace}/models.py:toy", "--checkpoint", f"{workspace}/toy.pt",
               "--data", f"{workspace}/test.npz", "--out", str(tmp_path / "o"), "--json", *FAST])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["verdict"]["dominant"] == "audio" and set(doc["diagnostics"]) >= {"shapley", "unimodal"}
    listed = json.loads(run(["list", "diagnostics", "--json"]).stdout)
    shapley = next(d for d in listed if d["name"] == "shapley")
    assert shapley["contribution"] and "subsets" in shapley["needs"]
    fixes = json.loads(run(["list", "fixes", "--json"]).stdout)
    assert any(f["name"] == "ogm_ge" and "gradient_imbalance" in f["targets"] for f in fixes)
