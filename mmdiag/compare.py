"""Differences between two reports: every headline and per-modality value, side by side.

Pure data in, pure data out: :func:`compare` returns :class:`CompareRow` records (one per headline
and per modality of each diagnostic present in either report, plus the fused accuracy) with both
values, their difference ``B - A``, both intervals and whether the intervals are *separated* (do not
overlap: the change is larger than the run-to-run uncertainty the bootstrap sees).
:func:`compare_runs` lines up the same values for rebalance's before / after / baseline runs.
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Mapping

from mmdiag.report import Report, Result, interval, json_safe
from mmdiag.report_text import READING_ORDER

#: Columns of rebalance's ``comparison.csv`` (:func:`compare_runs`).
COMPARISON_COLUMNS = (
    "key", "diagnostic", "modality",
    "before", "before_low", "before_high",
    "after", "after_low", "after_high",
    "baseline", "baseline_low", "baseline_high",
    "after_minus_before", "separated_after_before",
    "after_minus_baseline", "separated_after_baseline",
)


@dataclass(frozen=True)
class CompareRow:
    """One compared value.

    Attributes:
        diagnostic: diagnostic name (``accuracy`` for the fused accuracy).
        modality: modality name, or ``""`` for the headline.
        value_a: value in report A (None when absent there).
        value_b: value in report B.
        diff: ``value_b - value_a`` (None when either is missing).
        ci_a_low, ci_a_high, ci_b_low, ci_b_high: the intervals, when the reports hold them.
        separated: True when both intervals exist and do not overlap, False when they overlap,
            None when an interval is missing.
    """

    diagnostic: str
    modality: str
    value_a: float | None
    value_b: float | None
    diff: float | None
    ci_a_low: float | None = None
    ci_a_high: float | None = None
    ci_b_low: float | None = None
    ci_b_high: float | None = None
    separated: bool | None = None

    @property
    def key(self) -> str:
        """The gate key of this value (``shapley.visual``, ``balance``)."""
        return f"{self.diagnostic}.{self.modality}" if self.modality else self.diagnostic

    def to_dict(self) -> dict[str, Any]:
        return json_safe({"key": self.key, **asdict(self)})


def _num(v: Any) -> float | None:
    """A real value (infinities included) as float; None when it is missing, NaN or not a number."""
    return float(v) if isinstance(v, numbers.Real) and not isinstance(v, bool) and v == v else None


def _row(diag: str, modality: str, a: tuple[Any, Any], b: tuple[Any, Any]) -> CompareRow:
    """The row comparing ``a`` and ``b``, each a (value, interval) pair."""
    (va, ci_a), (vb, ci_b) = a, b
    va, vb = _num(va), _num(vb)
    al, ah = interval(ci_a) or (None, None)
    bl, bh = interval(ci_b) or (None, None)
    sep = None
    if None not in (al, ah, bl, bh):
        sep = bool(ah < bl or bh < al)  # type: ignore[operator]
    return CompareRow(diag, modality, va, vb, None if va is None or vb is None else vb - va, al, ah, bl, bh, sep)


def _aligned(runs: Mapping[str, Report | None], accuracy_ci: Mapping[str, Any] | None = None
             ) -> Iterator[tuple[str, str, dict[str, tuple[Any, Any]]]]:
    """(diagnostic, modality, run -> (value, interval)) for every value in any of the runs.

    The fused accuracy comes first, then each diagnostic in reading order (``READING_ORDER``; others
    as the runs hold them) with its headline and its modalities, in the first run's modality order; a
    run that lacks a value gives
    ``(None, None)``. ``accuracy_ci`` maps a run to the interval of its fused accuracy.
    """
    reports = {label: r for label, r in runs.items() if r is not None}
    cis = dict(accuracy_ci or {})
    yield "accuracy", "", {label: (r.accuracy, cis.get(label)) for label, r in reports.items()}
    found = list(dict.fromkeys(n for r in reports.values() for n in r.diagnostics))
    names = [n for n in READING_ORDER if n in found] + [n for n in found if n not in READING_ORDER]
    order = next(iter(reports.values())).modalities if reports else ()
    empty = Result(name="", value=None, per_modality={})
    for name in names:
        res = {label: r.diagnostics.get(name, empty) for label, r in reports.items()}
        yield name, "", {label: (x.value, x.value_ci) for label, x in res.items()}
        present = [m for x in res.values() for m in x.per_modality]
        for m in dict.fromkeys([m for m in order if m in present] + present):
            yield name, m, {label: (x.per_modality.get(m), (x.ci or {}).get(m)) for label, x in res.items()}


def compare(a: Report, b: Report) -> list[CompareRow]:
    """Rows for the fused accuracy and every headline and per-modality value in either report."""
    return [_row(diag, m, v["a"], v["b"]) for diag, m, v in _aligned({"a": a, "b": b})]


def compare_runs(after: Report, before: Report | None = None, baseline: Report | None = None,
                 accuracy_ci: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Rebalance's table: one row per headline and per-modality value (see :data:`COMPARISON_COLUMNS`).

    ``separated_*`` is True when the two bootstrap intervals do not overlap, False when they do,
    None when an interval is missing. ``accuracy_ci`` maps ``before``/``after``/``baseline`` to the
    bootstrap interval of the fused accuracy.
    """
    rows = []
    for diag, m, v in _aligned({"after": after, "before": before, "baseline": baseline}, accuracy_ci):
        pairs = {run: _row(diag, m, v.get(run, (None, None)), v["after"]) for run in ("before", "baseline")}
        row: dict[str, Any] = {"key": pairs["before"].key, "diagnostic": diag, "modality": m}
        for run in ("before", "after", "baseline"):
            value, ci = v.get(run, (None, None))
            row[run] = _num(value)
            row[f"{run}_low"], row[f"{run}_high"] = interval(ci) or (None, None)
        for run, pair in pairs.items():
            row[f"after_minus_{run}"], row[f"separated_after_{run}"] = pair.diff, pair.separated
        rows.append(row)
    return rows


def compare_document(a: Report, b: Report, rows: list[CompareRow] | None = None,
                     label_a: str = "A", label_b: str = "B") -> dict[str, Any]:
    """The JSON document written as ``compare.json``: labels, both verdicts and every row."""
    rows = compare(a, b) if rows is None else rows
    return json_safe({
        "a": label_a,
        "b": label_b,
        "verdict": {"a": a.verdict.to_dict(), "b": b.verdict.to_dict()},
        "only_in_a": [n for n in a.diagnostics if n not in b.diagnostics],
        "only_in_b": [n for n in b.diagnostics if n not in a.diagnostics],
        "n_separated": sum(r.separated is True for r in rows),
        "rows": [r.to_dict() for r in rows],
    })


def compare_frame(rows: list[CompareRow]) -> Any:
    """The rows as a pandas DataFrame (``compare.csv``)."""
    import pandas as pd

    return pd.DataFrame([r.to_dict() for r in rows],
                        columns=["key", "diagnostic", "modality", "value_a", "value_b", "diff", "ci_a_low",
                                 "ci_a_high", "ci_b_low", "ci_b_high", "separated"])
