"""Send a report (and a rebalance run's history) to an experiment tracker: TensorBoard, MLflow, W&B.

Targets (``log_to``), as the command line's ``--log-to`` takes them:

* ``tensorboard:DIR``: event files in DIR (``torch.utils.tensorboard``, needs the ``tensorboard`` package);
* ``mlflow`` or ``mlflow:TRACKING_URI``: a run in experiment ``mmdiag`` (or ``$MLFLOW_EXPERIMENT_NAME``) of
  the tracking server or store; without a URI, MLflow's own default (``$MLFLOW_TRACKING_URI``...);
* ``wandb`` or ``wandb:PROJECT``: a Weights & Biases run (project ``mmdiag`` by default), *offline* (files
  under ``./wandb``, or ``$WANDB_DIR``) unless ``$WANDB_MODE`` says otherwise or ``$WANDB_API_KEY`` is set.

What is logged (:class:`Payload`):

* **metrics**, named as gate keys (:mod:`mmdiag.gate`): ``accuracy``, ``n_samples``, ``<diagnostic>`` (the
  headline), ``<diagnostic>.<modality>``, a diagnostic's named keys (``deployment.worst``), and
  ``verdict.severity`` as a number (0 none, 1 mild, 2 strong); each value is exactly what ``mmdiag gate``
  reads. A rebalance run logs the *after* report so, the *before* and *baseline* reports under
  ``before/`` and ``baseline/``, and the per-epoch history under ``train/`` (``baseline/train/``) with
  step = epoch;
* **params**: the report's settings (nested keys dotted) and each diagnostic's parameters
  (``<diagnostic>.<param>``); a rebalance run also its fix and the fix's parameters (``fix.<param>``);
* **tags**: the verdict: ``verdict.dominant``, ``verdict.severity``, ``verdict.underused`` (comma-separated),
  ``verdict.recommended_fix`` (``none`` when there is none), and ``mmdiag_version``;
* **artifacts**: the files of the output folder that describe the result (``report.json``, ``report.html``,
  ``metrics.csv``, ``plots/*.png``; for rebalance also ``comparison.*``, ``history.csv`` and the reports of
  ``before/``, ``after/``, ``baseline/``), not the weights. TensorBoard has no artifact store: the files are
  copied to ``DIR/artifacts/`` and the plots are also logged as images.

Needs ``pip install mmdiag[trackers]``; see docs/integrations.md.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from mmdiag.errors import ConfigError, MmdiagError
from mmdiag.gate import VERDICT_FIELDS, known_keys, measure
from mmdiag.integrations._diagnose import SEVERITY
from mmdiag.registry import closest
from mmdiag.report import Report

__all__ = ["KINDS", "Payload", "Target", "log_payload", "log_rebalance", "log_report", "parse_target",
           "rebalance_payload", "report_payload"]

#: tracker kind -> (the module it needs, the pip package that brings it)
KINDS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow-skinny"),
    "wandb": ("wandb", "wandb"),
}
#: files of an output folder that are logged as artifacts (globs, relative to the folder)
ARTIFACT_GLOBS = ("report.json", "report.html", "metrics.csv", "plots/*.png", "comparison.json", "comparison.csv",
                  "history.csv", "fix.json", "*/report.json", "*/report.html", "*/metrics.csv", "*/plots/*.png",
                  "*/history.csv")


@dataclass(frozen=True)
class Target:
    """A parsed ``log_to`` value: the tracker ``kind`` and its ``where`` (folder, URI, project, or None)."""

    kind: str
    where: str | None = None

    def __str__(self) -> str:
        return self.kind + (f":{self.where}" if self.where else "")


@dataclass
class Payload:
    """What one tracker run receives: ``metrics`` (logged at the last step), ``series`` (per-epoch
    rows as ``(step, values)``), ``params``, ``tags`` and ``artifacts`` (``(file, path in the run)``)."""

    metrics: dict[str, float] = field(default_factory=dict)
    series: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    artifacts: list[tuple[Path, str]] = field(default_factory=list)


def parse_target(text: str) -> Target:
    """``KIND[:WHERE]`` -> :class:`Target`; ConfigError for an unknown kind or a TensorBoard target without a
    folder, and when the library the tracker needs is not installed."""
    kind, _, where = str(text).strip().partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        near = closest(kind, list(KINDS))
        hint = f" Did you mean {near!r}?" if near else ""
        raise ConfigError(f"`log_to` {text!r}: unknown tracker {kind!r}; expected tensorboard:DIR, mlflow[:TRACKING_URI] "
                          f"or wandb[:PROJECT].{hint}")
    if kind == "tensorboard" and not where.strip():
        raise ConfigError("`log_to` tensorboard needs the folder of the event files: tensorboard:DIR.")
    module, package = KINDS[kind]
    try:
        importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"`log_to` {kind} needs the {package} package, which is not installed: "
                          "pip install mmdiag[trackers]") from None
    target = Target(kind, where.strip() or None)
    if kind == "mlflow":
        _check_mlflow_store(target)
    return target


def _check_mlflow_store(target: Target) -> None:
    """Open the MLflow tracking store now, so that a store MLflow cannot open stops the command before the
    work (MLflow 3's default, ``sqlite:///mlflow.db``, needs the full ``mlflow`` package, not ``mlflow-skinny``)."""
    from mlflow import MlflowClient

    try:
        with _file_store_allowed(target.where):
            MlflowClient(tracking_uri=target.where)
    except Exception as exc:  # noqa: BLE001 - any store MLflow cannot open is the same user error
        raise ConfigError(
            f"`log_to` {target}: MLflow cannot open its tracking store ({type(exc).__name__}: {str(exc)[:200]}). "
            "Name one: mlflow:file:///PATH/mlruns (a local folder) or mlflow:http://HOST:5000 (a server), or set "
            "MLFLOW_TRACKING_URI; MLflow's own default (a sqlite file) needs the full mlflow package.") from None


# ---------------------------------------------------------------------------------------------- payloads


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(float(value)) else None


def report_metrics(report: Report, prefix: str = "") -> dict[str, float]:
    """Every numeric gate key of ``report`` (no ``details`` entries) with the value the gate reads, and
    ``verdict.severity`` as a number."""
    out: dict[str, float] = {}
    for key in known_keys(report):
        if key.startswith("verdict.") or ".details." in key:
            continue
        value = _finite(measure(report, key).value)
        if value is not None:
            out[prefix + key] = value
    out[prefix + "verdict.severity"] = float(SEVERITY.get(report.verdict.severity, 0))
    return out


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in values.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif v is not None:
            out[f"{prefix}{k}"] = ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
    return out


def report_params(report: Report) -> dict[str, str]:
    params = _flatten(report.settings)
    params["modalities"] = ",".join(report.modalities)
    for name, result in report.diagnostics.items():
        params.update(_flatten(result.params or {}, f"{name}."))
    return params


def report_tags(report: Report) -> dict[str, str]:
    tags = {}
    for name in VERDICT_FIELDS:
        value = getattr(report.verdict, name)
        tags[f"verdict.{name}"] = ",".join(value) if isinstance(value, list) else str(value or "none")
    tags["mmdiag_version"] = report.mmdiag_version or "unknown"
    return tags


def folder_artifacts(folder: str | os.PathLike[str] | None) -> list[tuple[Path, str]]:
    """The files of ``folder`` matching :data:`ARTIFACT_GLOBS`, with their paths inside it."""
    if folder is None:
        return []
    root = Path(folder)
    found = {p for pattern in ARTIFACT_GLOBS for p in root.glob(pattern) if p.is_file()}
    return [(p, p.relative_to(root).as_posix()) for p in sorted(found)]


def report_payload(report: Report, artifacts: str | os.PathLike[str] | None = None) -> Payload:
    """The :class:`Payload` of one analysis (``artifacts``: the folder ``mmdiag analyze`` wrote)."""
    return Payload(metrics=report_metrics(report), params=report_params(report), tags=report_tags(report),
                   artifacts=folder_artifacts(artifacts))


def history_series(rows: Sequence[Mapping[str, Any]], prefix: str) -> list[tuple[int, dict[str, float]]]:
    """Per-epoch rows of a training history as ``(epoch, {prefix + column: value})`` (numbers only)."""
    series = []
    for i, row in enumerate(rows):
        values = {prefix + k: v for k, v in ((k, _finite(v)) for k, v in row.items() if k != "epoch") if v is not None}
        series.append((int(row.get("epoch", i)), values))
    return series


def rebalance_payload(result: Any, artifacts: str | os.PathLike[str] | None = None) -> Payload:
    """The :class:`Payload` of a :class:`~mmdiag.rebalance.RebalanceResult`."""
    payload = Payload(artifacts=folder_artifacts(artifacts))
    if result.after is not None:
        payload.metrics.update(report_metrics(result.after))
        payload.params.update(report_params(result.after))
        payload.tags.update(report_tags(result.after))
    for stage in ("before", "baseline"):
        report = getattr(result, stage)
        if report is not None:
            payload.metrics.update(report_metrics(report, f"{stage}/"))
    payload.params["fix"] = str(result.fix)
    payload.params.update(_flatten(result.fix_params or {}, "fix."))
    payload.series = history_series(result.history.rows, "train/")
    if result.baseline_history is not None:
        by_step = dict(payload.series)
        for step, values in history_series(result.baseline_history.rows, "baseline/train/"):
            by_step.setdefault(step, {}).update(values)
        payload.series = sorted(by_step.items())
    return payload


# ---------------------------------------------------------------------------------------------- writers


class _TensorBoard:
    """Scalars, a params table and a verdict table as text, plot images; files copied beside the events."""

    def __init__(self, target: Target, run_name: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.folder = Path(str(target.where))
        self.writer = SummaryWriter(log_dir=str(self.folder))
        self.where = f"TensorBoard event files in {self.folder}"

    def metrics(self, values: Mapping[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def texts(self, name: str, values: Mapping[str, str]) -> None:
        if values:
            table = "| key | value |\n| --- | --- |\n" + "\n".join(f"| {k} | {v} |" for k, v in values.items())
            self.writer.add_text(name, table, 0)

    def artifacts(self, files: Sequence[tuple[Path, str]]) -> None:
        import numpy as np
        from PIL import Image

        for path, name in files:
            dest = self.folder / "artifacts" / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)
            if path.suffix == ".png":
                with Image.open(path) as image:
                    self.writer.add_image(name, np.asarray(image.convert("RGB")), 0, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


@contextlib.contextmanager
def _file_store_allowed(uri: str | None) -> Iterator[None]:
    """MLflow 3 refuses its file store unless ``MLFLOW_ALLOW_FILE_STORE`` is set; a ``file:`` URI named in
    ``log_to`` is that choice, made by the user (the variable is restored afterwards)."""
    if not (uri or "").startswith("file:") or "MLFLOW_ALLOW_FILE_STORE" in os.environ:
        yield
        return
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        yield
    finally:
        os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)


class _MLflow:
    """One run through ``MlflowClient`` (no global MLflow state is touched); batched within MLflow's limits."""

    def __init__(self, target: Target, run_name: str) -> None:
        from mlflow import MlflowClient

        with _file_store_allowed(target.where):
            self.client = MlflowClient(tracking_uri=target.where)  # opens the store now
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "mmdiag")
        experiment = self.client.get_experiment_by_name(name)
        exp_id = experiment.experiment_id if experiment is not None else self.client.create_experiment(name)
        self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
        self.where = f"MLflow run {self.run_id} (experiment {name!r}, {self.client.tracking_uri})"

    def metrics(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def texts(self, name: str, values: Mapping[str, str]) -> None:
        from mlflow.entities import Param, RunTag

        if name == "params":
            items = [Param(k[:250], v[:6000]) for k, v in values.items()]
            for i in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[i:i + 100])
        else:
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in values.items()])

    def artifacts(self, files: Sequence[tuple[Path, str]]) -> None:
        for path, name in files:
            parent = str(Path(name).parent)
            self.client.log_artifact(self.run_id, str(path), artifact_path=None if parent == "." else parent)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class _WandB:
    """A W&B run: offline unless ``WANDB_MODE`` is set or ``WANDB_API_KEY`` is configured."""

    def __init__(self, target: Target, run_name: str) -> None:
        import wandb

        self.wandb = wandb
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        project = target.where or os.environ.get("WANDB_PROJECT") or "mmdiag"
        # reinit="create_new": a run of the user's own (training in this process) stays open beside this one
        self.run = wandb.init(project=project, name=run_name, mode=mode, reinit="create_new",  # type: ignore[arg-type]
                              settings=wandb.Settings(console="off", x_disable_stats=True))
        self.last_step = 0
        self.where = f"W&B run {self.run.id} (project {project!r}, {mode}, {self.run.dir})"

    def metrics(self, values: Mapping[str, float], step: int) -> None:
        self.run.log(dict(values), step=step)

    def texts(self, name: str, values: Mapping[str, str]) -> None:
        if name == "params":
            self.run.config.update(dict(values), allow_val_change=True)
        else:
            self.run.tags = tuple(f"{k}:{v}"[:64] for k, v in values.items())
            self.run.summary.update(dict(values))

    def artifacts(self, files: Sequence[tuple[Path, str]]) -> None:
        if files:
            artifact = self.wandb.Artifact("mmdiag-report", type="mmdiag-report")
            for path, name in files:
                artifact.add_file(str(path), name=name)
            self.run.log_artifact(artifact)

    def close(self) -> None:
        self.run.finish()
        if self.wandb.run is None:
            # the run's files are written by W&B's service process: stop it, when no other run of this
            # process needs it, so the files are complete on return
            self.wandb.teardown()


_WRITERS = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _WandB}


def log_payload(payload: Payload, target: str | Target, run_name: str = "mmdiag") -> str:
    """Send ``payload`` to ``target`` as one run; returns where it went (for the user)."""
    target = target if isinstance(target, Target) else parse_target(target)
    try:
        writer = _WRITERS[target.kind](target, run_name)
        try:
            writer.texts("params", payload.params)
            writer.texts("verdict", payload.tags)
            for step, values in payload.series:
                writer.metrics(values, step)
            last = payload.series[-1][0] if payload.series else 0  # trackers want steps that do not go back
            writer.metrics(payload.metrics, last)
            writer.artifacts(payload.artifacts)
        finally:
            writer.close()
    except MmdiagError:
        raise
    except Exception as exc:  # noqa: BLE001 - a tracker's own failure (server, store, permissions)
        raise MmdiagError(f"Logging to {target} failed: {type(exc).__name__}: {exc}. Check the tracker's address "
                          f"and store (`log_to`); the results themselves are not affected.") from exc
    return writer.where


def log_report(report: Report, target: str | Target, artifacts: str | os.PathLike[str] | None = None,
               run_name: str = "mmdiag analyze") -> str:
    """Log one analysis to ``target`` (``tensorboard:DIR``, ``mlflow[:URI]``, ``wandb[:PROJECT]``); the
    files of the folder ``artifacts`` (as ``mmdiag analyze`` writes it) become artifacts."""
    return log_payload(report_payload(report, artifacts), target, run_name)


def log_rebalance(result: Any, target: str | Target, artifacts: str | os.PathLike[str] | None = None,
                  run_name: str | None = None) -> str:
    """Log a rebalance run (its *after* report, *before*/*baseline* reports, per-epoch history) to ``target``."""
    return log_payload(rebalance_payload(result, artifacts), target, run_name or f"mmdiag rebalance {result.fix}")
