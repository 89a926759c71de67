"""Differences between two reports: every headline and per-modality value, side by side.

Pure data in, pure data out: :func:`compare` returns :class:`CompareRow` records (one per headline
and per modality of each diagnostic present in either report, plus the fused accuracy) with both
values, their difference ``B - A``, both intervals and whether the intervals are *separated* (do not
overlap: the change is larger than the run-to-run uncertainty the bootstrap sees).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from mmdiag.report import Report, Result, json_safe


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


def _ci(ci: Any) -> tuple[float | None, float | None]:
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(c, (int, float)) for c in ci):
        return float(ci[0]), float(ci[1])
    return None, None


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v else None


def _row(diag: str, modality: str, a: Any, b: Any, ci_a: Any, ci_b: Any) -> CompareRow:
    va, vb = _num(a), _num(b)
    al, ah = _ci(ci_a)
    bl, bh = _ci(ci_b)
    sep = None
    if None not in (al, ah, bl, bh):
        sep = bool(ah < bl or bh < al)  # type: ignore[operator]
    return CompareRow(diag, modality, va, vb, None if va is None or vb is None else vb - va, al, ah, bl, bh, sep)


def compare(a: Report, b: Report) -> list[CompareRow]:
    """Rows for the fused accuracy and every headline and per-modality value in either report."""
    rows = [_row("accuracy", "", a.accuracy, b.accuracy, None, None)]
    names = list(a.diagnostics) + [n for n in b.diagnostics if n not in a.diagnostics]
    empty = Result(name="", value=None, per_modality={})
    for name in names:
        ra, rb = a.diagnostics.get(name, empty), b.diagnostics.get(name, empty)
        rows.append(_row(name, "", ra.value, rb.value, ra.value_ci, rb.value_ci))
        mods = [m for m in a.modalities if m in ra.per_modality or m in rb.per_modality]
        mods += [m for m in list(ra.per_modality) + list(rb.per_modality) if m not in mods]
        seen: set[str] = set()
        for m in mods:
            if m in seen:
                continue
            seen.add(m)
            rows.append(_row(name, m, ra.per_modality.get(m), rb.per_modality.get(m),
                             (ra.ci or {}).get(m), (rb.ci or {}).get(m)))
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
