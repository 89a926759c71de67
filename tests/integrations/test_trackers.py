"""Experiment trackers (mmdiag.integrations.trackers, ``--log-to``) against the real libraries, read back
through their own readers: TensorBoard's EventAccumulator, MLflow's client on a local file store, and
W&B's offline transaction log."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from mmdiag import analyze
from mmdiag.adapter import ModelAdapter
from mmdiag.errors import ConfigError
from mmdiag.integrations.trackers import log_rebalance, parse_target, report_metrics
from mmdiag.rebalance import RebalanceResult
from mmdiag.render import write_outputs
from mmdiag.train import fit
from tests.helpers.cli_run import run
from tests.helpers.toys import DOMINANT, toy_split, trained_toy

MODS = ["audio", "visual"]
ONLY = ["unimodal", "shapley", "balance"]


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    """(report, the folder mmdiag analyze's outputs were written to) for a trained dominant toy."""
    test = {k: v[:200] for k, v in toy_split(DOMINANT, 0)[1].items()}
    report = analyze(trained_toy(DOMINANT, 0), test, modalities=MODS, only=ONLY, bootstrap=20)
    folder = tmp_path_factory.mktemp("report")
    write_outputs(report, folder)
    return report, folder


def expected_metrics(report) -> dict[str, float]:
    """The gate keys and values straight from the report's fields (independent of the gate's lookup)."""
    out = {"accuracy": report.accuracy, "n_samples": float(report.n_samples),
           "verdict.severity": {"none": 0.0, "mild": 1.0, "strong": 2.0}[report.verdict.severity]}
    for name, res in report.diagnostics.items():
        if res.value is not None:
            out[name] = res.value
        out.update({f"{name}.{m}": v for m, v in res.per_modality.items() if v is not None})
    return out


def mlflow_client(uri: str):
    from mlflow import MlflowClient

    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # MLflow 3 opens a file store only when asked to
    try:
        return MlflowClient(tracking_uri=uri)
    finally:
        os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)


def only_run(client):
    experiment = client.get_experiment_by_name("mmdiag")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return runs[0]


def test_the_metrics_are_the_gate_keys(analysed):
    report, _ = analysed
    got = report_metrics(report)
    want = expected_metrics(report)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=0, rel=0), key
    assert {"shapley.audio", "shapley.visual", "unimodal.audio", "balance"} <= set(got)


def test_tensorboard_event_files_hold_the_report(analysed, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    report, folder = analysed
    where = report.log_to(f"tensorboard:{tmp_path / 'tb'}", artifacts=folder)
    assert str(tmp_path / "tb") in where
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    for key, value in expected_metrics(report).items():
        (scalar,) = events.Scalars(key)
        assert scalar.value == pytest.approx(value, rel=1e-6), key  # stored as float32
    texts = {tag: events.Tensors(tag)[0].tensor_proto.string_val[0].decode() for tag in events.Tags()["tensors"]}
    assert any(f"| verdict.severity | {report.verdict.severity} |" in t for t in texts.values())
    plots = sorted(p.relative_to(folder).as_posix() for p in folder.glob("plots/*.png"))
    assert plots and set(plots) <= set(events.Tags()["images"])
    assert (tmp_path / "tb" / "artifacts" / "report.json").read_text() == (folder / "report.json").read_text()


def test_mlflow_file_store_holds_metrics_params_tags_artifacts(analysed, tmp_path):
    pytest.importorskip("mlflow")
    report, folder = analysed
    uri = (tmp_path / "mlruns").as_uri()
    report.log_to(f"mlflow:{uri}", artifacts=folder)
    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ  # the opt-in is scoped to the call
    client = mlflow_client(uri)
    logged = only_run(client)
    for key, value in expected_metrics(report).items():
        assert logged.data.metrics[key] == pytest.approx(value, abs=0, rel=0), key
    assert logged.data.tags["verdict.severity"] == report.verdict.severity
    assert logged.data.tags["verdict.dominant"] == str(report.verdict.dominant)
    assert logged.data.params["modalities"] == "audio,visual"
    assert logged.data.params["balance.of"] == str(report.diagnostics["balance"].params["of"])
    names = {a.path for a in client.list_artifacts(logged.info.run_id)}
    assert {"report.json", "report.html", "metrics.csv", "plots"} <= names
    assert logged.info.status == "FINISHED"


def test_a_rebalance_run_logs_its_history_per_epoch(analysed, tmp_path):
    pytest.importorskip("mlflow")
    report, _ = analysed
    train = {k: v[:128] for k, v in toy_split(DOMINANT, 0)[0].items()}
    torch.manual_seed(0)
    model = trained_toy(DOMINANT, 1)
    history = fit(ModelAdapter(model, MODS), train, epochs=2, batch_size=64, device="cpu")
    result = RebalanceResult(fix="none", fix_params={}, choice={}, model=model, history=history, after=report,
                             before=report)
    uri = (tmp_path / "mlruns").as_uri()
    log_rebalance(result, f"mlflow:{uri}")
    client = mlflow_client(uri)
    logged = only_run(client)
    steps = client.get_metric_history(logged.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in sorted(steps, key=lambda m: m.step)] == [(r["epoch"], r["loss"]) for r in history.rows]
    assert logged.data.metrics["before/shapley.audio"] == report.diagnostics["shapley"].per_modality["audio"]
    assert logged.data.metrics["shapley.audio"] == report.diagnostics["shapley"].per_modality["audio"]
    assert logged.data.params["fix"] == "none"


@pytest.mark.slow
def test_wandb_offline_run_holds_the_metrics(analysed, tmp_path, monkeypatch):
    """W&B has no public reader of offline runs: the run's transaction log must carry every key."""
    pytest.importorskip("wandb")
    report, folder = analysed
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    for variable in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(variable, str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    where = report.log_to("wandb:mmdiag-test", artifacts=folder)
    assert "offline" in where
    (log,) = list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    raw = log.read_bytes()
    for key in expected_metrics(report):
        assert key.encode() in raw, key
    assert b"mmdiag-test" in raw and b"verdict.severity:" + report.verdict.severity.encode() in raw


def test_bad_targets_are_refused_with_what_to_do(monkeypatch):
    with pytest.raises(ConfigError, match="tensorboard"):
        parse_target("tensorbord:runs")
    with pytest.raises(ConfigError, match="tensorboard:DIR"):
        parse_target("tensorboard")
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed: importing it fails
    with pytest.raises(ConfigError, match=r"pip install mmdiag\[trackers\]"):
        parse_target("wandb")


MODEL_PY = textwrap.dedent('''
    def toy():
        from mmdiag.examples_data.synthetic import ToyNet
        return ToyNet(["audio", "visual"])
''')


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    d = tmp_path_factory.mktemp("ws")
    (d / "models.py").write_text(MODEL_PY)
    np.savez(d / "test.npz", **{k: v[:200] for k, v in toy_split(DOMINANT, 0)[1].items()})
    torch.save(trained_toy(DOMINANT, 0).state_dict(), d / "toy.pt")
    return d


def test_cli_analyze_logs_to_mlflow(workspace, tmp_path):
    pytest.importorskip("mlflow")
    uri = (tmp_path / "mlruns").as_uri()
    result = run(["analyze", "-m", f"{workspace / 'models.py'}:toy", "-c", workspace / "toy.pt", "-d",
                  workspace / "test.npz", "--bootstrap", "20", "--only", ",".join(ONLY), "--device", "cpu",
                  "-o", tmp_path / "out", "--log-to", f"mlflow:{uri}"])
    assert result.exit_code == 0, result.output
    from mmdiag.report import Report

    report = Report.load(tmp_path / "out" / "report.json")
    logged = only_run(mlflow_client(uri))
    for m in MODS:
        for name in ONLY[:2]:
            assert logged.data.metrics[f"{name}.{m}"] == report.diagnostics[name].per_modality[m]
    assert logged.data.tags["verdict.severity"] == report.verdict.severity


def test_cli_refuses_an_unknown_tracker_before_any_work(workspace, tmp_path):
    result = run(["analyze", "-m", f"{workspace / 'models.py'}:toy", "-d", workspace / "test.npz",
                  "-o", tmp_path / "out", "--log-to", "neptune"])
    assert result.exit_code == 2
    assert "--log-to" in result.output and "unknown tracker" in result.output
    assert not (tmp_path / "out").exists()


def test_example_runs(tmp_path):
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    from tests.test_examples import load_module

    path = Path(__file__).resolve().parents[2] / "examples" / "trackers.py"
    out = load_module(path, "trackers_example").main(["--out", str(tmp_path), "--n", "400", "--epochs", "2"])
    report = out["report"]
    logged = only_run(mlflow_client((tmp_path / "mlruns").as_uri()))
    assert logged.data.metrics["shapley.audio"] == report.diagnostics["shapley"].per_modality["audio"]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_cli_rebalance_logs_history_and_reports(workspace, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    np.savez(workspace / "train.npz", **{k: v[:256] for k, v in toy_split(DOMINANT, 0)[0].items()})
    folder = tmp_path / "tb"
    result = run(["rebalance", "-m", f"{workspace / 'models.py'}:toy", "-c", workspace / "toy.pt", "-d",
                  workspace / "train.npz", "--val-data", workspace / "test.npz", "--fix", "ogm_ge", "--epochs", "2",
                  "--lr", "0.05", "--device", "cpu", "--bootstrap", "0", "--only", "unimodal,shapley",
                  "--format", "json", "--quiet", "-o", tmp_path / "out", "--log-to", f"tensorboard:{folder}"])
    assert result.exit_code == 0, result.output
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    history = np.genfromtxt(tmp_path / "out" / "history.csv", delimiter=",", names=True)
    losses = events.Scalars("train/loss")
    assert [s.step for s in losses] == [int(e) for e in history["epoch"]] == [0, 1]
    assert [s.value for s in losses] == pytest.approx(list(history["loss"]), rel=1e-6)
    from mmdiag.report import Report

    after = Report.load(tmp_path / "out" / "after" / "report.json")
    before = Report.load(tmp_path / "out" / "before" / "report.json")
    (shapley,) = events.Scalars("shapley.visual")
    assert shapley.value == pytest.approx(after.diagnostics["shapley"].per_modality["visual"], rel=1e-6)
    (old,) = events.Scalars("before/shapley.visual")
    assert old.value == pytest.approx(before.diagnostics["shapley"].per_modality["visual"], rel=1e-6)
    assert (folder / "artifacts" / "comparison.json").is_file()


def test_a_tracker_that_fails_says_so(analysed, tmp_path):
    pytest.importorskip("tensorboard")
    from mmdiag.errors import MmdiagError

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(MmdiagError, match="Logging to tensorboard:.* failed"):
        analysed[0].log_to(f"tensorboard:{blocker / 'tb'}")


def test_cli_log_to_from_the_config_file(workspace, tmp_path):
    pytest.importorskip("tensorboard")
    folder = tmp_path / "tb"
    (tmp_path / "mmdiag.toml").write_text(f'log_to = ["tensorboard:{folder.as_posix()}"]\n')
    result = run(["analyze", "-m", f"{workspace / 'models.py'}:toy", "-c", workspace / "toy.pt", "-d",
                  workspace / "test.npz", "--bootstrap", "0", "--only", "unimodal", "--device", "cpu",
                  "-o", tmp_path / "out"], cwd=tmp_path)
    assert result.exit_code == 0, result.output
    assert "logged to TensorBoard" in result.output
    assert list(folder.glob("events.out.tfevents.*"))


def test_an_mlflow_store_that_cannot_open_is_refused_before_the_work(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match="mlflow:file:///PATH/mlruns"):
        parse_target("mlflow:sqlite:///no/such/folder/mlflow.db")
    target = parse_target(f"mlflow:{(tmp_path / 'mlruns').as_uri()}")  # a local file store opens
    assert target.kind == "mlflow" and target.where.startswith("file:")
