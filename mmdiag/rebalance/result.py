"""What :func:`~mmdiag.rebalance.rebalance` returns, and the files it writes in ``out_dir``."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from mmdiag.compare import COMPARISON_COLUMNS
from mmdiag.io import write_atomic, write_atomic_with
from mmdiag.report import Report, json_safe
from mmdiag.train import History

__all__ = ["RebalanceResult", "write_json", "write_outputs"]


@dataclass
class RebalanceResult:
    """What :func:`rebalance` did.

    Attributes:
        fix: the fix trained; fix_params: its parameters; choice: how it was chosen
            (``requested``, ``used``, ``recommended``, ``reasons``, ``note``).
        model: the rebalanced model (eval mode); baseline_model: the plain one (or None).
        history, baseline_history: per-epoch training histories.
        before, after, baseline: the analyses (None when not run); every rank has them.
        comparison: rows of :func:`mmdiag.compare.compare_runs`.
        out_dir: where the outputs were written (None: nothing written, as on ranks other than 0).
        notes: things worth telling the user (fallbacks, resumes).
    """

    fix: str
    fix_params: dict[str, Any]
    choice: dict[str, Any]
    model: nn.Module
    history: History
    after: Report | None = None
    before: Report | None = None
    baseline: Report | None = None
    baseline_model: nn.Module | None = None
    baseline_history: History | None = None
    comparison: list[dict[str, Any]] = field(default_factory=list)
    out_dir: Path | None = None
    notes: list[str] = field(default_factory=list)

    def row(self, key: str) -> dict[str, Any]:
        """The comparison row of ``key`` (e.g. ``unimodal.visual``); KeyError when absent."""
        for r in self.comparison:
            if r["key"] == key:
                return r
        raise KeyError(key)


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON (JSON-safe values), written atomically."""
    write_atomic(path, json.dumps(json_safe(data), indent=2) + "\n")


def _comparison_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COMPARISON_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in COMPARISON_COLUMNS})
    return buf.getvalue()


def trained_translator(aux: nn.ModuleDict | None) -> Any:
    """The ``restore`` fix's trained translator among a training's auxiliary modules, or None."""
    from mmdiag.fixes.restore import Translator

    return next((m for m in (aux or {}).values() if isinstance(m, Translator) and m.trained), None)


def _save_translator(aux: nn.ModuleDict, out: Path) -> None:
    """The ``restore`` fix's translator as ``restore.safetensors`` + ``restore.json`` beside the model."""
    from mmdiag.deploy import save_restoration

    translator = trained_translator(aux)
    if translator is not None:
        save_restoration(translator, out)


def write_outputs(result: RebalanceResult, out: Path, cis: Mapping[str, Any], extra: Mapping[str, Any],
                   formats: str | Sequence[str] | None = None) -> None:
    from mmdiag.loading import save_state_dict
    from mmdiag.render import DEFAULT_FORMATS, write_outputs

    save_state_dict(result.model.state_dict(), out / "model.safetensors")
    if len(result.history.aux):
        aux_state = {k: v.detach().cpu() for k, v in result.history.aux.state_dict().items()}
        write_atomic_with(out / "aux.pt", lambda tmp: torch.save(aux_state, tmp))
        _save_translator(result.history.aux, out)
    result.history.to_csv(out / "history.csv")
    for stage, report in (("before", result.before), ("after", result.after), ("baseline", result.baseline)):
        if report is not None:
            write_outputs(report, out / stage, formats=formats if formats is not None else DEFAULT_FORMATS)
    if result.baseline_model is not None:
        save_state_dict(result.baseline_model.state_dict(), out / "baseline" / "model.safetensors")
        if result.baseline_history is not None:
            result.baseline_history.to_csv(out / "baseline" / "history.csv")
    write_atomic(out / "comparison.csv", _comparison_csv(result.comparison))
    write_json(out / "comparison.json", {
        "fix": result.fix,
        "fix_params": result.fix_params,
        "choice": result.choice,
        "verdicts": {stage: (r.verdict.to_dict() if r is not None else None)
                     for stage, r in (("before", result.before), ("after", result.after), ("baseline", result.baseline))},
        "accuracy_ci": dict(cis),
        "rows": result.comparison,
        "notes": result.notes,
        "settings": dict(extra),
        "columns": list(COMPARISON_COLUMNS),
    })
