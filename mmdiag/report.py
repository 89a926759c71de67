"""The report: pure data, the canonical artifact of an analysis.

``report.json`` is written from :class:`Report`; CSV, HTML and plots are renderings of it, and the
gate reads it without the model. Every value is JSON-safe (floats, strings, lists, dicts); NaN is
written as ``null``.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import numbers
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from mmdiag.errors import EvidenceError
from mmdiag.io import write_atomic

SCHEMA_VERSION = 1
#: the ``schema_version`` values this mmdiag reads; a report from a newer mmdiag may carry a higher one
SUPPORTED_SCHEMA_VERSIONS = (1,)


def json_safe(value: Any) -> Any:
    """Recursively convert numpy/torch scalars, tuples and NaN into plain JSON values."""
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors
        return json_safe(value.tolist())
    if hasattr(value, "item"):
        return json_safe(value.item())
    return str(value)


def interval(ci: Any) -> list[float] | None:
    """The ``[low, high]`` ends of a stored interval, or None where there is none.

    An interval is a pair of finite real numbers (a bool is not one). An analysis run with
    bootstrap 0 leaves null or NaN ends, which count as no interval.
    """
    if not isinstance(ci, (list, tuple)) or len(ci) != 2:
        return None
    if any(isinstance(c, bool) or not isinstance(c, numbers.Real) or not math.isfinite(c) for c in ci):
        return None
    return sorted((float(ci[0]), float(ci[1])))


@dataclass(frozen=True)
class Result:
    """What one diagnostic found.

    Attributes:
        name: registry name of the diagnostic.
        value: the headline number (its meaning is in the diagnostic's docstring), or None.
        per_modality: modality -> headline value for that modality.
        ci: modality -> [low, high] bootstrap interval of ``per_modality`` (95% by default).
        value_ci: [low, high] interval of ``value`` when one exists.
        higher_is_better: whether larger per-modality values mean a healthier modality (None: neither).
        params: the diagnostic's parameters as used.
        details: JSON-safe extras (per class, per combination, curves).
        summary: one line saying how to read the headline.
        headline: what ``value`` is, in a word or two ("spread": max - min over modalities).
        cells: what ``per_modality`` values are, when they are not "more of this modality" (the
            ``combinations`` cells are the accuracy *without* each modality).
    """

    name: str
    value: float | None
    per_modality: dict[str, float]
    ci: dict[str, list[float]] = field(default_factory=dict)
    value_ci: list[float] | None = None
    higher_is_better: bool | None = None
    params: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    summary: str = ""
    headline: str = ""
    cells: str = ""
    #: per-sample columns (name -> list, one entry per evaluated row); never written to report.json,
    #: only to ``per_sample.csv`` on request, so reports stay small and carry no raw data. Values are
    #: numpy arrays (8 bytes a float, against about 32 in a Python list).
    per_sample: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (without ``per_sample``)."""
        out = asdict(self)
        out.pop("per_sample", None)
        return json_safe(out)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Result":
        """Inverse of :meth:`to_dict` (``null`` values stay ``None``)."""
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def interval(self, modality: str | None = None) -> list[float] | None:
        """The interval of ``per_modality[modality]``, or of the headline when ``modality`` is None.

        None where no interval was computed; see :func:`interval`.
        """
        return interval(self.value_ci if modality is None else (self.ci or {}).get(modality))


@dataclass(frozen=True)
class Failure:
    """A diagnostic that did not produce a result: ``kind`` is ``error`` (it crashed) or ``skipped`` (not applicable)."""

    diagnostic: str
    error: str
    kind: str = "error"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Verdict:
    """The summary judgement of a report.

    Attributes:
        dominant: the modality the model leans on, or None when no dominance is claimed.
        underused: modalities contributing clearly less than their fair share.
        severity: ``none``, ``mild`` or ``strong``.
        recommended_fix: registry name of the fix that matches the diagnosis, or None.
        reasons: sentences naming the diagnostics and numbers behind the judgement.
    """

    dominant: str | None
    underused: list[str]
    severity: str
    recommended_fix: str | None
    reasons: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def headline(self) -> str:
        """A one-line reading of the verdict."""
        if self.severity == "none" or self.dominant is None:
            text = "No modality dominance detected: " + (self.reasons[0] if self.reasons else "the measures agree on balance.")
            # a fix without dominance answers a problem that stands alone (missing modalities)
            return text + (f"; recommended fix: {self.recommended_fix}." if self.recommended_fix else "")
        under = f"; under-used: {', '.join(self.underused)}" if self.underused else ""
        fix = f"; recommended fix: {self.recommended_fix}" if self.recommended_fix else ""
        return f"{self.severity.capitalize()} dominance of {self.dominant}{under}{fix}."


@dataclass
class Report:
    """All results of one analysis, plus how they were obtained and the verdict."""

    modalities: list[str]
    n_samples: int
    accuracy: float
    settings: dict[str, Any]
    diagnostics: dict[str, Result]
    failures: list[Failure]
    verdict: Verdict
    #: what changes how the numbers read: a change of method (input instead of feature masking, a
    #: black-box run), an accuracy at chance level, weights that were not loaded from a checkpoint
    notes: list[str] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION
    mmdiag_version: str = ""
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (key order fixed)."""
        return json_safe({
            "schema_version": self.schema_version,
            "mmdiag_version": self.mmdiag_version,
            "created": self.created,
            "modalities": self.modalities,
            "n_samples": self.n_samples,
            "accuracy": self.accuracy,
            "settings": self.settings,
            "diagnostics": {k: v.to_dict() for k, v in self.diagnostics.items()},
            "failures": [f.to_dict() for f in self.failures],
            "verdict": self.verdict.to_dict(),
            "notes": list(self.notes),
        })

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Report":
        """Build a report from its JSON document; EvidenceError when it is not one, or of a schema
        version this mmdiag does not read."""
        version = schema_version(data)
        try:
            return cls(
                schema_version=version,
                mmdiag_version=str(data.get("mmdiag_version", "")),
                created=str(data.get("created", "")),
                modalities=list(data["modalities"]),
                n_samples=int(data["n_samples"]),
                accuracy=float(data["accuracy"]) if data["accuracy"] is not None else float("nan"),
                settings=dict(data.get("settings", {})),
                diagnostics={k: Result.from_dict(v) for k, v in data["diagnostics"].items()},
                failures=[Failure(**f) for f in data.get("failures", [])],
                verdict=Verdict(**data["verdict"]),
                notes=[str(n) for n in data.get("notes", [])],
            )
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:  # int(inf): Overflow
            raise EvidenceError(f"Not an mmdiag report: missing or malformed field ({exc}).") from None

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``report.json`` atomically (temporary file, then rename)."""
        return write_atomic(path, self.to_json() + "\n")

    def summary(self) -> str:
        """The summary the terminal shows, as plain text: the table of diagnostics (verdict's
        evidence first), a legend, failures, and the verdict with its reasons."""
        from mmdiag.report_text import summary_text

        return summary_text(self)

    def to_html(self, path: str | os.PathLike[str]) -> Path:
        """Write the self-contained HTML report (plots embedded) to ``path``; returns the path."""
        import importlib

        # render sits above this layer (it imports report): load it when asked, not at import time
        html = importlib.import_module("mmdiag.render.html")
        dpi = importlib.import_module("mmdiag.render.canvas").DEFAULT_DPI
        plots = importlib.import_module("mmdiag.render.plots").report_plots(self, None, dpi=dpi)
        return html.write_html(self, Path(path), plots)

    def log_to(self, target: str, artifacts: str | os.PathLike[str] | None = None) -> str:
        """Log this report to an experiment tracker: ``tensorboard:DIR``, ``mlflow[:TRACKING_URI]`` or
        ``wandb[:PROJECT]`` (:func:`mmdiag.integrations.trackers.log_report`; ``artifacts``: the folder
        ``mmdiag analyze`` wrote). Returns where it went. Needs ``pip install mmdiag[trackers]``."""
        import importlib

        # integrations sit above this layer and import optional libraries: load them when asked
        return importlib.import_module("mmdiag.integrations.trackers").log_report(self, target, artifacts=artifacts)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Report":
        """Read a ``report.json``; EvidenceError naming the file when it cannot be read."""
        if Path(path).is_dir():
            inside = Path(path) / "report.json"
            hint = (f"did you mean {inside}?" if inside.is_file() else
                    "it holds no report.json either; pass the report.json that mmdiag analyze wrote.")
            raise EvidenceError(f"Report {path} is a folder, not a report.json file: {hint}")
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise EvidenceError(f"Report {path} does not exist.") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise EvidenceError(f"Report {path} is not readable JSON: {exc}.") from None
        if not isinstance(data, dict):
            raise EvidenceError(f"Report {path} is not an mmdiag report (expected a JSON object).")
        try:
            return cls.from_dict(data)
        except EvidenceError as exc:
            raise EvidenceError(f"Report {path}: {exc}") from None

    def to_frame(self) -> "Any":
        """Tidy table: diagnostic, modality, key, value, ci_low, ci_high (a pandas DataFrame)."""
        import pandas as pd

        rows: list[dict[str, Any]] = []
        for name, res in self.diagnostics.items():
            low, high = (res.value_ci or [None, None])
            rows.append({"diagnostic": name, "modality": "", "key": "value", "value": res.value,
                         "ci_low": low, "ci_high": high})
            for m, v in res.per_modality.items():
                lo, hi = res.ci.get(m, [None, None]) or [None, None]
                rows.append({"diagnostic": name, "modality": m, "key": "value", "value": v,
                             "ci_low": lo, "ci_high": hi})
        frame = pd.DataFrame(rows, columns=["diagnostic", "modality", "key", "value", "ci_low", "ci_high"])
        return frame


def schema_version(data: Mapping[str, Any]) -> int:
    """The document's ``schema_version``; EvidenceError when it is missing, malformed or not supported."""
    from mmdiag._version import __version__

    if "schema_version" not in data:
        raise EvidenceError("Not an mmdiag report: it has no schema_version field.")
    raw = data["schema_version"]
    ok = isinstance(raw, int) or (isinstance(raw, float) and math.isfinite(raw) and raw.is_integer())
    if isinstance(raw, bool) or not ok:
        raise EvidenceError(f"Not an mmdiag report: schema_version must be an integer; found {raw!r}.")
    version, supported = int(raw), ", ".join(map(str, SUPPORTED_SCHEMA_VERSIONS))
    if version in SUPPORTED_SCHEMA_VERSIONS:
        return version
    if version > max(SUPPORTED_SCHEMA_VERSIONS):
        writer = f"mmdiag {data['mmdiag_version']}" if data.get("mmdiag_version") else "a newer mmdiag"
        raise EvidenceError(
            f"the report has schema_version {version}, written by {writer}; this mmdiag ({__version__}) "
            f"reads schema versions {supported}. Upgrade mmdiag (pip install --upgrade mmdiag) to read it."
        )
    raise EvidenceError(f"the report has schema_version {version}, which no mmdiag release wrote; this mmdiag "
                        f"({__version__}) reads schema versions {supported}.")

