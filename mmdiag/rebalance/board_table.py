"""The leaderboard table: one row per fix and one for the plain baseline, ranked by an objective.

Columns (:func:`leaderboard_columns`), the same in ``leaderboard.csv`` and ``leaderboard.json``:

* ``rank``: 1 is best by the objective (see :func:`rank_rows`);
* ``fix``: the fix (``none`` is the plain baseline);
* ``accuracy``, ``accuracy_low``, ``accuracy_high``: fused accuracy on the validation rows and its 95%
  percentile bootstrap interval;
* ``unimodal.<m>``: accuracy with only ``m`` present, for each modality;
* ``balance``: the normalised entropy of the modalities' contribution shares (1 = even);
* ``deployment``: expected accuracy under the deployment distribution (only when one is given);
* ``train_seconds``: training time (the batches and the fix's hooks; validation not included);
* ``step_overhead``: seconds per optimizer step relative to the baseline's (1.0 = as fast as plain
  training; 1.5 = each step takes half as long again);
* ``separated``: whether the fix's fused accuracy differs from the baseline's beyond noise, by a
  *paired* bootstrap on the same validation rows: the 95% interval of mean_i(c_i - b_i) (c, b the
  per-row correctness of the fix and the baseline, the same rows resampled for both) excludes 0.
  Empty for the baseline and without resamples.

Pure data: nothing here trains or evaluates; :mod:`~mmdiag.rebalance.board_run` does.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from mmdiag.errors import ConfigError
from mmdiag.io import write_atomic
from mmdiag.rebalance.result import write_json
from mmdiag.rebalance.scoring import OBJECTIVES, Scores, paired_separation

__all__ = ["Leaderboard", "Entry", "leaderboard_columns", "leaderboard_rows", "rank_rows", "write_leaderboard"]


@dataclass(frozen=True)
class Entry:
    """One trained candidate: its scores on the validation data and its training cost.

    ``steps`` is the number of optimizer steps it took (None when unknown)."""

    fix: str
    scores: Scores
    train_seconds: float
    steps: int | None


@dataclass
class Leaderboard:
    """What :func:`~mmdiag.rebalance.leaderboard` returns.

    Attributes:
        rows: the ranked rows (dicts with :attr:`columns` as keys, plus ``difference``,
            ``difference_low``, ``difference_high``: the paired accuracy difference to the baseline).
        columns: the CSV columns; objective: what the rows are ranked by; modalities: their order.
        notes: what is worth telling the user; warnings: changes of method (a fall-back during
            training or scoring); out_dir: where it was written (None: nowhere).
    """

    rows: list[dict[str, Any]]
    columns: list[str]
    objective: str
    modalities: tuple[str, ...]
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    out_dir: Path | None = None

    def row(self, fix: str) -> dict[str, Any]:
        """The row of ``fix``; KeyError when absent."""
        for r in self.rows:
            if r["fix"] == fix:
                return r
        raise KeyError(fix)

    @property
    def best(self) -> dict[str, Any]:
        """The row ranked first."""
        return self.rows[0]


def leaderboard_columns(modalities: Sequence[str], deployment: bool) -> list[str]:
    """The CSV columns for these modalities (``deployment`` only when a distribution is given)."""
    return (["rank", "fix", "accuracy", "accuracy_low", "accuracy_high"] + [f"unimodal.{m}" for m in modalities]
            + ["balance"] + (["deployment"] if deployment else []) + ["train_seconds", "step_overhead", "separated"])


def check_objective(objective: str, deployment: bool) -> None:
    """Refuse an unknown objective, and ``deployment`` without a deployment distribution."""
    if objective not in OBJECTIVES:
        raise ConfigError(f"`objective` must be one of {', '.join(OBJECTIVES)}; found {objective!r}.")
    if objective == "deployment" and not deployment:
        raise ConfigError("`objective='deployment'` ranks by the expected accuracy with missing modalities, "
                          "which needs their rates: give `missing` (e.g. audio=0.3) or rank by another objective.")


def _per_step(entry: Entry) -> float | None:
    return entry.train_seconds / entry.steps if entry.steps else None


def leaderboard_rows(entries: Sequence[Entry], baseline: Entry, modalities: Sequence[str], deployment: bool,
                     n_boot: int, seed: int) -> list[dict[str, Any]]:
    """Unranked rows (``rank`` None) for the baseline and every entry (see the module doc)."""
    base_step = _per_step(baseline)
    rows = []
    for e in [baseline, *entries]:
        s = e.scores
        low, high = s.interval if s.interval is not None else (None, None)
        row: dict[str, Any] = {"rank": None, "fix": e.fix, "accuracy": s.accuracy, "accuracy_low": low,
                               "accuracy_high": high}
        row.update({f"unimodal.{m}": s.unimodal[m] for m in modalities})
        row["balance"] = s.balance
        if deployment:
            row["deployment"] = s.deployment
        step = _per_step(e)
        row["train_seconds"] = e.train_seconds
        row["step_overhead"] = step / base_step if step is not None and base_step else None
        if e is baseline:
            row.update(separated=None, difference=0.0, difference_low=None, difference_high=None)
        else:
            diff, ci, sep = paired_separation(s.correct, baseline.scores.correct, n_boot, seed)
            row.update(separated=sep, difference=diff, difference_low=ci[0] if ci else None,
                       difference_high=ci[1] if ci else None)
        rows.append(row)
    return rows


def _value(row: Mapping[str, Any], key: str, modalities: Sequence[str]) -> float:
    """The row's value for an objective (higher is better); -inf when missing, so it ranks last."""
    if key == "fused":
        v = row["accuracy"]
    elif key == "weakest":
        v = min(row[f"unimodal.{m}"] for m in modalities)
    else:
        v = row.get(key)
    return -math.inf if v is None or v != v else float(v)


def rank_rows(rows: Sequence[Mapping[str, Any]], objective: str, modalities: Sequence[str]) -> list[dict[str, Any]]:
    """The rows sorted best first by ``objective`` (higher is better for every objective), with
    ``rank`` 1, 2, ... Ties: ``fused`` is broken by ``weakest``, every other objective by ``fused``
    and then ``weakest``; rows still tied keep the order given (the baseline first)."""
    tie = ("weakest",) if objective == "fused" else ("fused", "weakest")
    keys = (objective, *tie)
    ordered = sorted(rows, key=lambda r: tuple(-_value(r, k, modalities) for k in keys))
    return [{**r, "rank": i + 1} for i, r in enumerate(ordered)]


def _csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})
    return buf.getvalue()


def write_leaderboard(board: Leaderboard, out: Path, extra: Mapping[str, Any], formats: Sequence[str]) -> None:
    """``leaderboard.csv`` and ``leaderboard.json`` in ``out``; with ``png``/``html`` in ``formats``
    also ``leaderboard.png`` and ``leaderboard.html``."""
    write_atomic(out / "leaderboard.csv", _csv(board.rows, board.columns))
    write_json(out / "leaderboard.json", {
        "objective": board.objective, "columns": board.columns, "rows": board.rows,
        "baseline": "none", "separated": "paired bootstrap of the fused-accuracy difference to the baseline on the "
        "same validation rows; True when its 95% interval excludes 0 (difference, difference_low, difference_high)",
        "notes": board.notes, "warnings": board.warnings, "settings": dict(extra),
    })
    if "png" in formats or "html" in formats:
        from mmdiag.render.leaderboard import leaderboard_png, write_leaderboard_html

        png = leaderboard_png(board.rows, board.modalities, board.objective)
        if "png" in formats:
            write_atomic(out / "leaderboard.png", png)
        if "html" in formats:
            write_leaderboard_html(board.rows, board.columns, board.objective, board.warnings + board.notes, png,
                                   out / "leaderboard.html")
