"""mmdiag.report: reading a stored interval (the one reader used by the gate, verdict and renderers)."""

from __future__ import annotations

import pytest

from mmdiag.report import Result, interval


@pytest.mark.parametrize("ci, expected", [
    ([0.1, 0.3], [0.1, 0.3]),
    ((1, 2), [1.0, 2.0]),
    ([0.3, 0.1], [0.1, 0.3]),  # ends come back in order
    ([None, None], None),  # bootstrap 0, as read back from report.json
    ([float("nan"), float("nan")], None),  # bootstrap 0, in memory
    ([0.1, float("inf")], None),
    ([True, False], None),
    ([0.1], None),
    ("0.1,0.2", None),
    (None, None),
])
def test_interval(ci, expected) -> None:
    assert interval(ci) == expected


def test_result_interval_reads_the_modality_or_the_headline() -> None:
    res = Result("x", 0.5, {"a": 0.4, "b": 0.6}, ci={"a": [0.3, 0.5]}, value_ci=[0.45, 0.55])
    assert res.interval() == [0.45, 0.55] and res.interval("a") == [0.3, 0.5]
    assert res.interval("b") is None and Result("y", None, {}).interval("a") is None
