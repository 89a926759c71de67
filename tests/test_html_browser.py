"""report.html in a real browser: a headless Chromium loads the page, the verdict is the first
section of the rendered DOM, and a screenshot at 1280 px shows the verdict panel at the top.

Skipped, with the reason, when no Chromium is installed (``apt-get install chromium``); nothing
mmdiag does depends on a browser.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from mmdiag.render.html import SEVERITY_COLOURS, render_html
from mmdiag.render.plots import report_plots
from tests.test_render import assert_real_png, conflict_result, synthetic_report

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
BROWSER = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(BROWSER is None, reason="no headless Chromium installed (e.g. apt-get install chromium); "
                                               f"looked for {', '.join(BROWSERS)}"),
]
WIDTH, HEIGHT = 1280, 1600


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [str(BROWSER), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
           "--disable-background-networking", "--disable-component-update", "--disable-extensions",
           f"--user-data-dir={tmp_path / 'profile'}", *args]
    return subprocess.run(cmd, check=True, timeout=120, capture_output=True, text=True)


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    report = synthetic_report(2)
    report.diagnostics = dict(reversed(list(report.diagnostics.items())))  # stored order must not matter
    report.failures = [f for f in report.failures if f.diagnostic != "gradient_conflict"]
    report.diagnostics["gradient_conflict"] = conflict_result()
    path = tmp_path_factory.mktemp("page") / "report.html"
    path.write_text(render_html(report, report_plots(report)))
    return path


def test_the_page_loads_with_the_verdict_as_its_first_section(page: Path, tmp_path: Path) -> None:
    dom = _chromium(tmp_path, "--dump-dom", page.as_uri()).stdout
    assert "<main>" in dom and "</html>" in dom  # parsed and laid out, not an error page
    sections = re.findall(r'<section[^>]*\bid="([^"]+)"', dom)
    assert sections[0] == "verdict"
    assert sections[1] == "overview"
    assert sections[2:5] == ["diag-unimodal", "diag-shapley", "diag-reliance"]
    assert "Too wide to read." in dom
    assert len(re.findall(r'<img src="data:image/png;base64,', dom)) >= 10


def test_a_1280px_screenshot_shows_the_verdict_panel_at_the_top(page: Path, tmp_path: Path) -> None:
    import matplotlib.image as mpimg

    shot = tmp_path / "shot.png"
    _chromium(tmp_path, f"--screenshot={shot}", f"--window-size={WIDTH},{HEIGHT}", page.as_uri())
    assert_real_png(shot.read_bytes(), min_size=20000)
    img = mpimg.imread(str(shot))[..., :3]
    assert img.shape[:2] == (HEIGHT, WIDTH)
    # the verdict's coloured left border (severity "mild") is drawn within the first 300 rows
    mild = np.array([int(SEVERITY_COLOURS["mild"][i:i + 2], 16) / 255 for i in (1, 3, 5)])
    close = np.abs(img[:300] - mild).max(axis=2) < 0.03
    assert close.sum() > 500, "no verdict panel near the top of the page"
