"""What a person reads after an analysis: the summary table, its order and labels, the verdict's
reasons, plain full-width text for CI logs, and the same text from ``Report.summary()``."""

from __future__ import annotations

import io

from rich.console import Console

from mmdiag.cli.summary import print_summary
from mmdiag.report_text import READING_ORDER, summary_rows
from tests.test_render import synthetic_report


def test_rows_follow_the_reading_order_and_label_the_mirrored_row():
    report = synthetic_report()
    names = [row[0] for row in summary_rows(report)[1:]]
    present = [n.split(" ")[0] for n in names if n.split(" ")[0] in report.diagnostics]
    assert present == [n for n in READING_ORDER if n in report.diagnostics]
    if "combinations" in report.diagnostics:
        assert "combinations (without)" in names



def test_results_say_what_their_headline_and_cells_are():
    from mmdiag.diagnostics import DIAGNOSTICS

    unimodal = DIAGNOSTICS.get("unimodal")(bootstrap=0).result(0.3, {"a": 0.5, "b": 0.2})
    combinations = DIAGNOSTICS.get("combinations")(bootstrap=0).result(0.2, {"a": 0.2, "b": 0.5})
    assert (unimodal.headline, unimodal.cells) == ("spread", "")
    assert (combinations.headline, combinations.cells) == ("weakest", "without")


def test_ci_logs_get_plain_full_width_text_with_the_verdict_reasons():
    report = synthetic_report(m_count=3)
    out = io.StringIO()
    print_summary(report, Console(file=out, width=80, force_terminal=False), html_path="r/report.html")
    text = out.getvalue()
    assert "…" not in text and "┃" not in text  # no cut keys, no box drawn one word a line
    for m in report.modalities:
        assert m in text.splitlines()[1]  # the header holds every modality on one line
    assert "verdict:" in text and "open r/report.html" in text
    for reason in report.verdict.reasons:
        assert reason in text
    assert report.summary().splitlines()[0] == text.splitlines()[0]


def test_a_narrow_terminal_puts_intervals_under_values_and_cuts_nothing():
    report = synthetic_report(m_count=3)
    out = io.StringIO()
    print_summary(report, Console(file=out, width=80, force_terminal=True, color_system=None))
    assert "…" not in out.getvalue()
    assert max(len(line) for line in out.getvalue().splitlines()) <= 80


def test_report_to_html_writes_a_page_with_its_plots(tmp_path):
    report = synthetic_report()
    path = report.to_html(tmp_path / "r.html")
    html = path.read_text()
    assert html.startswith("<!doctype html>") or "<html" in html
    assert "data:image/png;base64" in html
